"""``avatarkit demo --live``: the demo avatar streamed to a browser.

An ``avatarkit serve`` engine server runs in this process on loopback, trusting the demo
consent registry; the kit reaches it as a remote ``local`` provider (the same path a GPU box
takes), so the session's viewers join over WHEP. The bundled speech clip is spoken in a loop
at real-time pace, with a pause between repetitions, until Ctrl-C (or ``seconds``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from ..media import AudioChunk

if TYPE_CHECKING:
    from ..consent.demo import DemoConsent
    from ..session import AvatarSession

__all__ = ["serve_live"]


async def serve_live(*, demo: DemoConsent, weights: Path | None, cache_dir: Path, host: str,
                     port: int, speech: list[AudioChunk], seconds: float | None) -> None:
    """Serve until cancelled (Ctrl-C) or for ``seconds``."""
    from ..consent.demo import DEMO_PURPOSE
    from ..engine_server.server import EngineServer
    from ..kit import AvatarKit
    from ..samples import SAMPLE_AVATAR, SAMPLE_POLICY, sample_avatar_path, sample_config

    server_config = sample_config(demo.consent_config(), weights=weights, cache_dir=cache_dir,
                                subject=demo.subject_ref)
    server = EngineServer(server_config, host=host, port=port, engine="auto",
                          weights=str(weights) if weights is not None else None,
                          cache_dir=str(cache_dir), status_source=demo.authority.source,
                          consent_store=demo.authority.store,
                          avatar_dir=sample_avatar_path().parent)
    async with server:
        # the kit talks to the server as it would to a GPU box: `url = ...`
        config = sample_config(demo.consent_config(), weights=None, cache_dir=None,
                             subject=demo.subject_ref, url=server.url)
        kit = AvatarKit(config, status_source=demo.authority.source,
                        consent_store=demo.authority.store)
        async with kit, kit.session(SAMPLE_AVATAR, consent=demo.token, purpose=DEMO_PURPOSE,
                                    policy=SAMPLE_POLICY) as session:
            async with httpx.AsyncClient(base_url=server.url) as http:
                listed = (await http.get("/v1/sessions")).json()["sessions"]
            viewer = server.url + listed[0]["viewer_url"]
            print(f"live       engine server {server.url} ({server.choice.name} engine)")
            print(f"           WHEP endpoint {session.join.url}")
            print(f"           open {viewer} in a browser (Ctrl-C ends)", flush=True)
            await _speak_in_a_loop(session, speech, seconds)


async def _speak_in_a_loop(session: AvatarSession, speech: list[AudioChunk],
                           seconds: float | None) -> None:
    step = 320  # 20 ms at 16 kHz
    deadline = time.monotonic() + seconds if seconds is not None else None
    audio = np.concatenate([c.samples.reshape(-1) for c in speech])
    while deadline is None or time.monotonic() < deadline:
        started = time.monotonic()
        for i, offset in enumerate(range(0, len(audio), step)):
            if deadline is not None and time.monotonic() >= deadline:
                break
            await session.send_audio(AudioChunk(audio[offset:offset + step], 16_000))
            await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 - time.monotonic()))
        await session.end_utterance()
        pause = 2.0 if deadline is None else min(2.0, max(0.0, deadline - time.monotonic()))
        await asyncio.sleep(pause)
