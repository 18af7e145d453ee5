"""Tests of the WebRTC egress (tracks, WHEP server and client, viewer page); shared helpers.

Streams are served for real: an aiohttp app on ``127.0.0.1`` (port 0), real aiortc peers on
both sides, an :class:`~avatarkit.local_engine.runner.AvatarRunner` drained into an
:class:`~avatarkit.transport.webrtc.AvatarBroadcast` by a task, as an application would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from aiohttp import web
from numpy.typing import NDArray

from avatarkit import AudioChunk
from avatarkit.local_engine.engine import LipSyncEngine
from avatarkit.local_engine.runner import AvatarRunner, RunnerFrame
from avatarkit.transport.webrtc import (
    AvatarBroadcast,
    ViewerConfig,
    WhepEndpoint,
    add_viewer_routes,
)

RATE = 16_000
FPS = 25.0
SPF = 640
WIDTH, HEIGHT = 160, 120  # even sizes: VP8 wants them
IDLE_RGB = (20, 40, 200)  # blue
SPEAKING_RGB = (220, 30, 30)  # red


class ColourEngine(LipSyncEngine):
    """A cheap synthetic engine whose colour says what it was given: idle frames blue,
    speaking frames red when the audio is loud (peak above 1000), blue otherwise."""

    name = "colour"

    def __init__(self) -> None:
        self.sample_rate = RATE
        self.fps = FPS
        self.width = WIDTH
        self.height = HEIGHT
        self.source_frames = 1

    def render(self, audio: NDArray[np.int16], *, source_index: int,
               speaking: bool) -> NDArray[np.uint8]:
        loud = speaking and int(np.abs(audio.astype(np.int32)).max()) > 1000
        frame = np.empty((self.height, self.width, 3), np.uint8)
        frame[...] = SPEAKING_RGB if loud else IDLE_RGB
        return frame


def tone(seconds: float, freq: float = 440.0, rate: int = RATE,
         amplitude: int = 12_000) -> AudioChunk:
    n = round(seconds * rate)
    t = np.arange(n) / rate
    return AudioChunk((amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16), rate)


def runner_frame(index: int, *, width: int = WIDTH, height: int = HEIGHT, rate: int = RATE,
                 fps: float = FPS, fill: int | None = None,
                 samples: NDArray[np.int16] | None = None) -> RunnerFrame:
    """A RunnerFrame as the runner makes them: frame ``index`` at ``index / fps``."""
    from avatarkit.media import VideoFrame

    value = index % 256 if fill is None else fill
    picture = np.full((height, width, 3), value, np.uint8)
    if samples is None:
        samples = np.full(round(rate / fps), index, np.int16)
    return RunnerFrame(video=VideoFrame(picture, index / fps),
                       audio=AudioChunk(samples, rate), segment_id=None, index=index)


async def drain(runner: AvatarRunner, broadcast: AvatarBroadcast) -> None:
    """What an application does: every frame of the runner goes to the broadcast."""
    async for item in runner.frames():
        if isinstance(item, RunnerFrame):
            broadcast.publish(item)


@dataclass
class Served:
    base_url: str
    runner: AvatarRunner
    broadcast: AvatarBroadcast
    endpoint: WhepEndpoint

    def whep(self, stream_id: str = "avatar") -> str:
        return f"{self.base_url}/whep/{stream_id}"


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port); yields its base URL."""
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    host, port = app_runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await app_runner.cleanup()


@contextlib.asynccontextmanager
async def serve_stream(engine: LipSyncEngine | None = None, *, stream_id: str = "avatar",
                       max_viewers: int = 4,
                       authorize: Callable[[str, str | None], bool] | None = None,
                       cors_origins: Sequence[str] = ("*",), connect_timeout: float = 30.0,
                       post: Callable[[NDArray[np.uint8]], None] | None = None,
                       viewer: ViewerConfig | None = None) -> AsyncIterator[Served]:
    """A real-time runner (the ColourEngine unless given) published under ``stream_id``;
    with ``viewer``, the viewer page of that stream is served too."""
    engine = engine if engine is not None else ColourEngine()
    runner = AvatarRunner(engine, realtime=True, post=post)
    broadcast = AvatarBroadcast(fps=engine.fps, sample_rate=engine.sample_rate,
                                width=engine.width, height=engine.height,
                                max_viewers=max_viewers)
    endpoint = WhepEndpoint(lambda s: broadcast if s == stream_id else None,
                            authorize=authorize, cors_origins=cors_origins,
                            connect_timeout=connect_timeout)
    app = web.Application()
    endpoint.add_routes(app)
    if viewer is not None:
        add_viewer_routes(app, lambda s: viewer if s == stream_id else None)
    pump = asyncio.create_task(drain(runner, broadcast))
    try:
        async with serve_app(app) as base_url:
            try:
                yield Served(base_url, runner, broadcast, endpoint)
            finally:
                await endpoint.aclose()
    finally:
        await runner.aclose()
        await broadcast.aclose()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
