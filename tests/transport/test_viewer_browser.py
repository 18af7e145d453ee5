"""The viewer page in a real headless Chromium: it verifies the signed disclosure notice with
WebCrypto Ed25519, shows it, and plays the stream over WHEP; the burned-in label is checked in
a screenshot of the playing video.

Needs Debian's ``/usr/bin/chromium`` and the ``playwright`` package (its browsers are not
used, so ``playwright install`` is never needed). Without them the tests are skipped, unless
``AVATARKIT_BROWSER_TESTS=required`` (CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from avatarkit.consent.keys import IssuerKey, KeySet
from avatarkit.disclosure.label import FrameLabeler
from avatarkit.disclosure.metadata import DisclosureMetadata
from avatarkit.disclosure.notice import sign_disclosure_notice
from avatarkit.transport.webrtc import ViewerConfig

from ..conftest import eventually
from . import Served, serve_stream

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    # real host addresses instead of mDNS names in the offer: aioice resolves .local names
    # under a per-thread asyncio.Lock bound to the first event loop that contends for it, so
    # a second test (a new loop) would fail to apply the offer
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
VIEWER_TOKEN = "viewer-token-0c93d1"
# polled with page.evaluate: wait_for_function would need 'unsafe-eval', which the page's
# Content-Security-Policy (rightly) forbids
PLAYING = ("!!(window.avatarkitViewer && window.avatarkitViewer.state === 'playing' && "
           "document.getElementById('avatar').videoWidth > 0)")


def _unavailable(reason: str) -> None:
    if os.environ.get("AVATARKIT_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required (AVATARKIT_BROWSER_TESTS=required) but "
                    f"{reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    return CHROMIUM


@pytest.fixture
async def page(chromium: Path) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 800, "height": 760},
                                                device_scale_factor=1)
            yield await context.new_page()
        finally:
            await browser.close()


def notice_and_jwks(key: IssuerKey) -> tuple[DisclosureMetadata, str, dict[str, Any]]:
    metadata = DisclosureMetadata(generation_id="gen-browser-test", provider="local",
                                  avatar="astronaut", label_policy="burned-in")
    return metadata, sign_disclosure_notice(metadata, key), KeySet.of(key).to_jwks()


def speech_like(seconds: float, rate: int = 16_000) -> NDArray[np.int16]:
    """Vowel-ish syllables: harmonics of 140 Hz under a 4 Hz envelope, -16 dBFS-ish."""
    t = np.arange(round(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    envelope = np.abs(np.sin(2 * np.pi * 2.0 * t)) ** 0.7
    signal = voiced * envelope
    signal *= 0.3 / np.abs(signal).max()
    return np.round(signal * 32767).astype(np.int16)


async def open_viewer(page: Any, served: Served) -> None:
    await page.goto(f"{served.base_url}/viewer/avatar")
    for _ in range(200):
        if await page.evaluate(PLAYING):
            return
        await asyncio.sleep(0.05)
    state = await page.evaluate("[window.avatarkitViewer && window.avatarkitViewer.state, "
                                "document.getElementById('status').textContent]")
    raise AssertionError(f"the page did not start playing in 10 s: {state}")


async def test_the_page_verifies_the_notice_and_plays_the_labelled_stream(
        page: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from avatarkit import AudioChunk
    from avatarkit.local_engine.avatar import prepare_avatar
    from avatarkit.local_engine.lite import LiteEngine

    from ..local_engine import astronaut

    caplog.set_level(logging.INFO, logger="avatarkit.transport.webrtc")
    engine = LiteEngine(prepare_avatar(astronaut(), cache_dir=tmp_path / "cache",
                                       progress=False))
    labeler = FrameLabeler()
    metadata, notice, jwks = notice_and_jwks(IssuerKey.generate())
    config = ViewerConfig(whep_url="/whep/avatar", disclosure_notice=notice, jwks=jwks,
                          token=VIEWER_TOKEN)

    def authorize(stream: str, token: str | None) -> bool:
        return token == VIEWER_TOKEN

    async with serve_stream(engine, post=labeler.apply_inplace, authorize=authorize,
                            viewer=config) as served:
        await served.runner.push_audio(AudioChunk(speech_like(6.0), 16_000))
        await open_viewer(page, served)
        assert served.endpoint.sessions == 1
        state = await page.evaluate("window.avatarkitViewer")
        assert state["verified"] is True
        assert state["notice"]["notice"] == metadata.notice
        assert state["notice"]["label"] == metadata.label
        assert await page.inner_text("#notice") == metadata.notice
        assert await page.inner_text("#label") == metadata.label.upper()  # CSS uppercase
        assert await page.inner_text("#verification") == "verified"
        assert await page.is_visible("#disclosure")

        video = await page.evaluate(
            "(() => { const v = document.getElementById('avatar');"
            " return [v.videoWidth, v.videoHeight, v.currentTime]; })()")
        assert video[:2] == [engine.width, engine.height]
        await asyncio.sleep(1.0)
        later = await page.evaluate("document.getElementById('avatar').currentTime")
        assert later - video[2] > 0.6  # it plays, in real time

        shot_path = tmp_path / "viewer.png"
        box = await page.locator("#avatar").bounding_box()
        await page.screenshot(path=str(shot_path))
        await page.close()  # pagehide: the page DELETEs its resource (keepalive fetch)
        await eventually(lambda: served.endpoint.sessions == 0, within=5)
        assert any("deleted" in r.getMessage() for r in caplog.records), caplog.text
        assert VIEWER_TOKEN not in caplog.text

    shot = np.asarray(Image.open(shot_path).convert("RGB"), dtype=np.int16)
    assert box is not None
    assert round(box["width"]) == engine.width and round(box["height"]) == engine.height
    top, left = round(box["y"]), round(box["x"])
    plain = engine.render(np.zeros(engine.samples_per_frame, np.int16), source_index=0,
                          speaking=False)
    labelled = labeler.apply(plain)
    y0, y1, x0, x1 = labeler.region(plain.shape)
    seen = shot[top + y0:top + y1, left + x0:left + x1]
    with_label = float(np.abs(seen - labelled[y0:y1, x0:x1]).mean())
    without_label = float(np.abs(seen - plain[y0:y1, x0:x1].astype(np.int16)).mean())
    # the screenshot's corner is the labelled picture, not the bare one
    print(f"label crop: {with_label:.1f} from the labelled frame, {without_label:.1f} from "
          "the bare one")
    assert with_label < 12 and with_label * 3 < without_label, (with_label, without_label)
    # control: the same rectangle at the top left (no label there) is the bare picture,
    # so the mapping from frame to screenshot is right
    w = x1 - x0
    control = shot[top + y0:top + y1, left:left + w]
    assert float(np.abs(control - plain[y0:y1, :w].astype(np.int16)).mean()) < 12


def tampered(token: str, **changes: str) -> str:
    """``token`` with its payload changed and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return ".".join([header, base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), signature])


async def test_a_tampered_notice_is_shown_with_a_could_not_verify_warning(page: Any) -> None:
    metadata, notice, jwks = notice_and_jwks(IssuerKey.generate())
    forged = tampered(notice, notice="Nothing synthetic here.")
    config = ViewerConfig(whep_url="/whep/avatar", disclosure_notice=forged, jwks=jwks)
    async with serve_stream(viewer=config) as served:
        await open_viewer(page, served)  # the stream still plays
        state = await page.evaluate("window.avatarkitViewer")
        assert state["verified"] is False
        assert await page.is_visible("#disclosure")
        assert await page.inner_text("#label") == metadata.label.upper()
        warning = await page.inner_text("#verification")
        assert "could not verify" in warning and "bad signature" in warning
        classes = await page.get_attribute("#disclosure", "class")
        assert classes is not None and "unverified" in classes

