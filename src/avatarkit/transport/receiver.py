"""A receive-only WebRTC peer: a vendor's avatar video (and audio) into this process.

Vendors that stream media peer-to-peer (Simli P2P, D-ID Agents streams) differ only in who
offers: Simli waits for our offer (:meth:`WebRTCReceiver.offer` then
:meth:`~WebRTCReceiver.accept_answer`), D-ID sends one (:meth:`~WebRTCReceiver.answer`). Either
way the received video is decoded to RGB :class:`~avatarkit.media.VideoFrame` values on
:meth:`~WebRTCReceiver.frames`; a slow reader loses the oldest frames, never memory. Received
audio is drained (the avatar's voice is the audio we sent).

A data channel the vendor opens (D-ID's offer carries one) is adopted: its text messages go to
the ``on_message`` callback and :meth:`~WebRTCReceiver.send_data` writes to it. ``on_closed``
reports, once, a connection that failed or that the vendor closed (never one closed by
:meth:`~WebRTCReceiver.aclose`).

aiortc gathers every ICE candidate before it returns a description, so the SDP we send already
holds them; :meth:`~WebRTCReceiver.local_candidates` lists them for vendors that want them
trickled as well. Needs the ``webrtc`` extra (aiortc); nothing here is imported by
``import avatarkit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, ProviderConnectionError
from ..media import VideoFrame

__all__ = ["IceCandidate", "WebRTCReceiver", "ice_servers_from"]

logger = logging.getLogger("avatarkit.providers.webrtc")


@dataclass(frozen=True, slots=True)
class IceCandidate:
    """One local ICE candidate as trickle signalling carries it."""

    candidate: str  # "candidate:..." (the SDP attribute value)
    sdp_mid: str | None
    sdp_mline_index: int


def ice_servers_from(raw: object) -> list[dict[str, Any]]:
    """Vendor ICE server lists (``[{urls, username, credential}]``, ``urls`` a string or a
    list) as plain dicts; malformed entries are skipped."""
    servers: list[dict[str, Any]] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, Mapping):
            continue
        urls = item.get("urls") or item.get("url")
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls) or not urls:
            continue
        server: dict[str, Any] = {"urls": urls}
        for key in ("username", "credential"):
            if isinstance(item.get(key), str):
                server[key] = item[key]
        servers.append(server)
    return servers


class WebRTCReceiver:
    """Receives one vendor stream. Call :meth:`aclose` (idempotent) when done."""

    def __init__(self, *, provider: str, ice_servers: Sequence[Mapping[str, Any]] = (),
                 max_queued_frames: int = 50,
                 on_failed: Callable[[str], None] | None = None,
                 on_message: Callable[[str], None] | None = None,
                 on_closed: Callable[[str], None] | None = None) -> None:
        """``on_failed`` is called when ICE/DTLS fails; ``on_closed`` once when the connection
        is lost (failed, or closed by the vendor); ``on_message`` with each text message (UTF-8
        decoded binary ones too) received on the vendor's data channel. Callbacks run on the
        event loop and must not block; an exception in one is logged, not raised."""
        try:
            from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
        except ImportError:
            raise ConfigError("peer-to-peer media needs aiortc: pip install "
                              "'avatarkit[webrtc]'", field=f"providers.{provider}") from None
        self.provider = provider
        config = RTCConfiguration(iceServers=[
            RTCIceServer(urls=list(s["urls"]), username=s.get("username"),
                         credential=s.get("credential")) for s in ice_servers
        ])
        self._pc = RTCPeerConnection(configuration=config)
        self._frames: asyncio.Queue[VideoFrame | None] = asyncio.Queue(max_queued_frames)
        self._tasks: set[asyncio.Task[None]] = set()
        self._first_pts: float | None = None
        self._closed = False
        self._on_failed = on_failed
        self._on_message = on_message
        self._on_closed = on_closed
        self._lost = False
        self._channel: Any = None
        #: frames decoded so far, and frames dropped because nobody read them in time
        self.frames_received = 0
        self.frames_dropped = 0
        #: data-channel messages received and sent
        self.messages_received = 0
        self.messages_sent = 0
        self.connected = asyncio.Event()
        #: set once the vendor's data channel is open (never, for vendors without one)
        self.data_channel_open = asyncio.Event()

        @self._pc.on("track")
        def on_track(track: Any) -> None:
            pump = self._pump_video(track) if track.kind == "video" else self._drain(track)
            task = asyncio.create_task(pump, name=f"{provider}-webrtc-{track.kind}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        @self._pc.on("connectionstatechange")
        def on_state() -> None:
            state = self._pc.connectionState
            if state == "connected":
                self.connected.set()
            elif state == "failed" and not self._closed:
                logger.warning("%s: WebRTC connection failed", provider)
                if self._on_failed is not None:
                    self._on_failed("WebRTC connection failed")
                self._report_lost("WebRTC connection failed")
            elif state == "closed" and not self._closed:
                logger.warning("%s: the vendor closed the WebRTC connection", provider)
                self._report_lost("the vendor closed the WebRTC connection")

        @self._pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self._adopt_channel(channel)

    def _report_lost(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        if self._on_closed is not None:
            self._call(self._on_closed, reason)

    def _call(self, callback: Callable[[str], None], value: str) -> None:
        try:
            callback(value)
        except Exception:  # a callback bug must not break aiortc's event dispatch
            logger.exception("%s: WebRTC callback failed", self.provider)

    def _adopt_channel(self, channel: Any) -> None:
        """Use the data channel the vendor opened (the first one; later ones are ignored)."""
        if self._channel is not None:
            logger.debug("%s: ignoring extra data channel %r", self.provider, channel.label)
            return
        self._channel = channel

        def opened() -> None:
            self.data_channel_open.set()

        def on_message(message: str | bytes) -> None:
            if self._closed:
                return
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            self.messages_received += 1
            if self._on_message is not None:
                self._call(self._on_message, text)

        channel.on("message", on_message)
        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    def send_data(self, text: str) -> None:
        """Send ``text`` on the vendor's data channel. Raises ``ProviderConnectionError`` when
        no data channel is open (none was offered, it is not open yet, or it closed)."""
        channel = self._channel
        if self._closed or channel is None or channel.readyState != "open":
            raise ProviderConnectionError("the WebRTC data channel is not open",
                                          provider=self.provider)
        channel.send(text)
        self.messages_sent += 1

    @staticmethod
    def available() -> bool:
        try:
            import aiortc  # noqa: F401
        except ImportError:
            return False
        return True

    # -- signalling -------------------------------------------------------------------------

    async def offer(self) -> str:
        """Our offer (receive-only audio + video), with every ICE candidate gathered."""
        self._pc.addTransceiver("audio", direction="recvonly")
        self._pc.addTransceiver("video", direction="recvonly")
        await self._pc.setLocalDescription(await self._pc.createOffer())
        return str(self._pc.localDescription.sdp)

    async def accept_answer(self, sdp: str) -> None:
        """Apply the vendor's answer to :meth:`offer`."""
        from aiortc import RTCSessionDescription

        await self._apply_remote(RTCSessionDescription(sdp=sdp, type="answer"))

    async def answer(self, offer_sdp: str) -> str:
        """Answer the vendor's offer; returns our answer SDP with its candidates."""
        from aiortc import RTCSessionDescription

        await self._apply_remote(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        for transceiver in self._pc.getTransceivers():
            transceiver.direction = "recvonly"
        await self._pc.setLocalDescription(await self._pc.createAnswer())
        return str(self._pc.localDescription.sdp)

    async def _apply_remote(self, description: Any) -> None:
        try:
            await self._pc.setRemoteDescription(description)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ProviderConnectionError(f"the vendor's SDP {description.type} was not "
                                          f"usable: {exc}", provider=self.provider) from None

    def local_candidates(self) -> list[IceCandidate]:
        """Our gathered candidates, per media section (for trickle signalling)."""
        description = self._pc.localDescription
        if description is None:
            return []
        candidates: list[IceCandidate] = []
        index, mid = -1, None
        for line in description.sdp.splitlines():
            if line.startswith("m="):
                index, mid = index + 1, None
            elif line.startswith("a=mid:"):
                mid = line.removeprefix("a=mid:")
            elif line.startswith("a=candidate:") and index >= 0:
                candidates.append(IceCandidate(candidate=line.removeprefix("a="),
                                               sdp_mid=mid, sdp_mline_index=index))
        return candidates

    # -- media ------------------------------------------------------------------------------

    async def _pump_video(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    break
                t = float(frame.time) if frame.time is not None else 0.0
                if self._first_pts is None:
                    self._first_pts = t
                video = VideoFrame(frame.to_ndarray(format="rgb24"),
                                   timestamp=max(0.0, t - self._first_pts))
                self.frames_received += 1
                if self._frames.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        self._frames.get_nowait()
                        self.frames_dropped += 1
                self._frames.put_nowait(video)
        finally:  # a decode error too: readers of frames() must not wait forever
            self._end_frames()

    async def _drain(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def _end_frames(self) -> None:
        if self._frames.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._frames.get_nowait()
        self._frames.put_nowait(None)

    async def frames(self) -> AsyncIterator[VideoFrame]:
        """Decoded video frames until the stream ends or :meth:`aclose` is called."""
        while (frame := await self._frames.get()) is not None:
            yield frame
        self._frames.put_nowait(None)  # later readers end too

    async def aclose(self) -> None:
        """Close the peer connection and stop every media task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._pc.close()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._end_frames()
