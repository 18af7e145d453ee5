"""The ``local`` provider in process: routing by config, the session contract (playback
events, interrupts with a position, frames in process), and the disclosure marks on every
frame (burned-in label, watermark of the session's generation)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from avatarkit import AvatarKit, ConfigError, KitConfig, NoRouteError
from avatarkit.consent.authority import ConsentAuthority
from avatarkit.disclosure.label import FrameLabeler
from avatarkit.disclosure.watermark import WatermarkDetector, payload_for
from avatarkit.errors import NoFaceError
from avatarkit.events import Interrupted, SpeechEnded, SpeechStarted
from avatarkit.media import VideoFrame
from avatarkit.providers.local import LocalProvider
from avatarkit.routing.router import RouteDecision

from ..conftest import CONSENT, consent_config, next_event, sdk_tasks, send_speech
from ..local_engine import astronaut, portrait_file


@pytest.fixture(scope="module")
def portrait(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return portrait_file(tmp_path_factory.mktemp("avatars"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prepared")


def local_kit(authority: ConsentAuthority, portrait: Path, cache_dir: Path,
              **local: Any) -> AvatarKit:
    disclosure = local.pop("disclosure", {})
    policies = local.pop("policies", {"private": {"self_hosted_only": True}})
    config = KitConfig(
        providers={"local": {"cache_dir": str(cache_dir), **local}},
        avatars={"amelia": {"local": str(portrait)}},
        policies=policies,
        consent=consent_config(), disclosure=disclosure, metering={"ledger": ":memory:"})
    return AvatarKit(config, status_source=authority.source, consent_store=authority.store)


async def first_frames(frames: AsyncIterator[VideoFrame], count: int) -> list[VideoFrame]:
    out = []
    async with asyncio.timeout(10):
        async for frame in frames:
            out.append(frame)
            if len(out) == count:
                break
    return out


async def test_a_private_policy_routes_to_the_local_engine_and_frames_carry_the_marks(
        consent_authority: ConsentAuthority, portrait: Path, cache_dir: Path) -> None:
    before = asyncio.all_tasks()
    async with local_kit(consent_authority, portrait, cache_dir) as kit:
        decision = kit.route("amelia", purpose="support", policy="private")
        assert decision.chosen == "local"
        async with kit.session("amelia", consent=CONSENT, purpose="support",
                               policy="private") as s:
            assert s.provider == "local"
            assert s.join.kind == "none"
            assert s.join.disclosure.label_policy == "burned-in"
            assert s.join.disclosure.provider == "local"
            video = s.video()
            idle = await first_frames(video, 3)
            assert idle[0].width == 512 and idle[0].height == 512
            events = s.events()
            await send_speech(s, 1.0, rate=16_000)
            await s.end_utterance()
            started = await next_event(events, "speech_started")
            spoken = await first_frames(video, 12)
            ended = await next_event(events, "speech_ended", within=5)
            assert isinstance(started, SpeechStarted) and isinstance(ended, SpeechEnded)
            assert started.utterance_id == ended.utterance_id
        assert s.billed_seconds > 0

    source = astronaut()
    labeler = FrameLabeler()
    y0, y1, x0, x1 = labeler.region(source.shape)
    for frame in idle + spoken:
        # label: the region differs from the source; far from it and the mouth, the
        # frame is the source plus the watermark's small changes
        assert np.abs(frame.data[y0:y1, x0:x1].astype(int) - source[y0:y1, x0:x1]).mean() > 20
        assert np.abs(frame.data[:64, :64].astype(int) - source[:64, :64]).max() <= 12
    detected = WatermarkDetector(expected=payload_for(s.generation_id)).detect(
        [f.data for f in idle + spoken])
    assert detected.matched and detected.payload == payload_for(s.generation_id)
    # the mouth moved while speaking and never while idle
    still = idle[0].data.astype(int)
    assert max(np.abs(f.data.astype(int) - still).max() for f in spoken) > 60
    assert all(np.array_equal(f.data, idle[0].data) for f in idle)
    assert sdk_tasks(before) == []


async def test_interrupt_returns_the_position_reached(
        consent_authority: ConsentAuthority, portrait: Path, cache_dir: Path) -> None:
    async with local_kit(consent_authority, portrait, cache_dir) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        assert await s.interrupt() == 0.0  # nothing playing: at once
        events = s.events()
        await send_speech(s, 3.0, rate=16_000)
        await next_event(events, "speech_started")
        await asyncio.sleep(0.5)
        position = await s.interrupt()
        interrupted = await next_event(events, "interrupted")
        assert isinstance(interrupted, Interrupted) and interrupted.acknowledged
        assert 0.3 < position < 1.5
        assert interrupted.playback_position == pytest.approx(position)
        # the engine is idle again: a new utterance plays from its start
        await send_speech(s, 0.4, rate=16_000)
        await s.end_utterance()
        await next_event(events, "speech_ended")


async def test_an_empty_utterance_ends_at_once(
        consent_authority: ConsentAuthority, portrait: Path, cache_dir: Path) -> None:
    async with local_kit(consent_authority, portrait, cache_dir) as kit, \
            kit.session("amelia", consent=CONSENT, purpose="support") as s:
        events = s.events()
        await s.end_utterance()
        await s.end_utterance()
        async with asyncio.timeout(3):
            await send_speech(s, 0.2, rate=16_000)
            await s.end_utterance()
            await next_event(events, "speech_ended")


async def test_a_disabled_label_leaves_frames_unlabelled_but_watermarked(
        consent_authority: ConsentAuthority, portrait: Path, cache_dir: Path) -> None:
    kit = local_kit(consent_authority, portrait, cache_dir,
                    disclosure={"burned_label": {"enabled": False}})
    async with kit, kit.session("amelia", consent=CONSENT, purpose="support") as s:
        assert s.join.disclosure.label_policy == "disabled"
        frames = await first_frames(s.video(), 3)
    source = astronaut()
    y0, y1, x0, x1 = FrameLabeler().region(source.shape)
    assert np.abs(frames[0].data[y0:y1, x0:x1].astype(int) - source[y0:y1, x0:x1]).max() <= 12
    result = WatermarkDetector(expected=payload_for(s.generation_id)).detect(
        [f.data for f in frames])
    assert result.matched


async def test_media_without_a_face_is_a_typed_error_and_nothing_runs(
        consent_authority: ConsentAuthority, cache_dir: Path, tmp_path: Path) -> None:
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 180, np.uint8)).save(blank)
    before = asyncio.all_tasks()
    async with local_kit(consent_authority, blank, cache_dir) as kit:
        with pytest.raises(NoFaceError):
            async with kit.session("amelia", consent=CONSENT, purpose="support"):
                pass
    assert sdk_tasks(before) == []


async def test_profile_is_self_hosted_with_a_known_price(
        consent_authority: ConsentAuthority, portrait: Path, cache_dir: Path) -> None:
    async with local_kit(consent_authority, portrait, cache_dir) as kit:
        provider = kit.providers["local"]
        assert isinstance(provider, LocalProvider)
        profile = provider.profile
        assert profile.self_hosted and profile.regions == frozenset({"self-hosted"})
        assert profile.price_per_minute == Decimal(0)  # known, not unknown
        assert profile.capabilities.frames_in_process
        assert not provider.remote
    priced = local_kit(consent_authority, portrait, cache_dir, price_per_minute="0.05",
                       regions=["eu-onprem"],
                       policies={"eu": {"residency": ["eu", "self-hosted"]}})
    async with priced:
        profile = priced.providers["local"].profile
        assert profile.price_per_minute == Decimal("0.05")
        with pytest.raises(NoRouteError) as refused:
            priced.route("amelia", purpose="support", policy="eu")
        assert isinstance(refused.value.decision, RouteDecision)
        assert "eu-onprem" in refused.value.decision.explain()


@pytest.mark.parametrize(("settings", "field"), [
    ({"url": "gpu-box:8080"}, "url"),
    ({"engine": "wav2lip"}, "engine"),
    ({"fps": 0}, "fps"),
])
def test_bad_settings_name_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        KitConfig(providers={"local": settings})
    assert field in str(raised.value)


async def test_the_musetalk_engine_without_weights_is_refused_with_the_reason(
        consent_authority: ConsentAuthority, portrait: Path, cache_dir: Path) -> None:
    async with local_kit(consent_authority, portrait, cache_dir, engine="musetalk") as kit:
        with pytest.raises(ConfigError) as raised:
            async with kit.session("amelia", consent=CONSENT, purpose="support"):
                pass
    assert raised.value.field == "weights" and "weights folder" in str(raised.value)
