"""The Tavus echo messages on the wire: the template-built hot path must produce exactly the
JSON a plain encoder would, for any ids, and channels without a text path must still work."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avatarkit import AudioChunk, DisclosureMetadata, JoinInfo
from avatarkit.providers._tavus_channel import AppMessageChannel
from avatarkit.providers.tavus import TavusProvider, TavusSession, TavusSettings

BYTES_PER_MS = 48  # 24 kHz mono int16


class RecordingChannel(AppMessageChannel):
    """A channel with only the dict path: ``send_encoded`` falls back to the base class."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._closed = asyncio.Event()

    async def connect(self, conversation_url: str, meeting_token: str | None) -> None:
        return None

    async def send(self, message: Mapping[str, Any]) -> None:
        self.sent.append(dict(message))

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        await self._closed.wait()
        return
        yield {}

    async def aclose(self) -> None:
        self._closed.set()


def expected_echo(conversation_id: str, audio: bytes, utterance_id: str,
                  done: bool) -> dict[str, Any]:
    return {
        "message_type": "conversation",
        "event_type": "conversation.echo",
        "conversation_id": conversation_id,
        "properties": {"modality": "audio", "audio": base64.b64encode(audio).decode(),
                       "inference_id": utterance_id, "sample_rate": 24_000, "done": done},
    }


async def make_session(conversation_id: str, chunk_ms: int = 100,
                       ) -> tuple[TavusSession, RecordingChannel, httpx.AsyncClient]:
    http = httpx.AsyncClient()
    provider = TavusProvider(TavusSettings(api_key="k", chunk_ms=chunk_ms, channel="websocket"),
                             http=http)
    channel = RecordingChannel()
    disclosure = DisclosureMetadata(generation_id="gen_1", provider="tavus", avatar="a")
    join = JoinInfo(kind="daily", url="https://example.invalid/room", token=None,
                    disclosure=disclosure)
    session = TavusSession(provider, conversation_id=conversation_id, join=join,
                           channel=channel)
    return session, channel, http


async def close(session: TavusSession, channel: RecordingChannel,
                http: httpx.AsyncClient) -> None:
    await channel.aclose()
    session._closing = True
    await session._reader
    await http.aclose()


@settings(max_examples=60, deadline=None)
@given(conversation_id=st.text(min_size=1, max_size=40),
       utterance_id=st.text(min_size=1, max_size=40),
       audio=st.binary(min_size=0, max_size=64),
       done=st.booleans())
def test_template_encoding_equals_plain_json(conversation_id: str, utterance_id: str,
                                             audio: bytes, done: bool) -> None:
    async def run() -> None:
        session, channel, http = await make_session(conversation_id)
        try:
            raw = session._echo(audio, utterance_id, done)
            assert json.loads(raw) == expected_echo(conversation_id, audio, utterance_id, done)
            raw.decode("utf-8")  # valid UTF-8 text frame
        finally:
            await close(session, channel, http)

    asyncio.run(run())


async def test_utterance_is_rechunked_and_done_carries_the_held_back_audio() -> None:
    session, channel, http = await make_session("c_1", chunk_ms=100)
    try:
        pcm = bytes(range(256)) * 47  # 12032 bytes = 250.7 ms at 24 kHz
        for start in range(0, len(pcm), 960):  # 20 ms pieces
            piece = pcm[start:start + 960]
            await session.send_audio(AudioChunk.from_pcm16(piece, sample_rate=24_000),
                                     utterance_id="utt_a")
        await session.end_utterance(utterance_id="utt_a")
        size = 100 * BYTES_PER_MS
        assert [m["properties"]["done"] for m in channel.sent] == [False, False, True]
        audio = b"".join(base64.b64decode(m["properties"]["audio"]) for m in channel.sent)
        assert audio == pcm, "audio was lost, reordered or padded"
        assert [len(base64.b64decode(m["properties"]["audio"])) for m in channel.sent] == \
            [size, size, len(pcm) - 2 * size]
        assert all(m == expected_echo("c_1", base64.b64decode(m["properties"]["audio"]),
                                      "utt_a", m["properties"]["done"])
                   for m in channel.sent)
    finally:
        await close(session, channel, http)


async def test_empty_utterance_ends_with_40_ms_of_silence() -> None:
    session, channel, http = await make_session("c_2")
    try:
        await session.end_utterance(utterance_id="utt_empty")
        assert channel.sent == [expected_echo("c_2", bytes(40 * BYTES_PER_MS), "utt_empty",
                                              True)]
    finally:
        await close(session, channel, http)


@pytest.mark.parametrize("utterances", [2, 200])
async def test_each_utterance_gets_its_own_inference_id(utterances: int) -> None:
    session, channel, http = await make_session("c_3")
    try:
        for n in range(utterances):
            await session.end_utterance(utterance_id=f"utt_{n}")
        assert [m["properties"]["inference_id"] for m in channel.sent] == \
            [f"utt_{n}" for n in range(utterances)]
    finally:
        await close(session, channel, http)
