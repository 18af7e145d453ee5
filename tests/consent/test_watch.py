"""ConsentWatch: the one live re-check, its end reasons, and failing closed on any error."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from avatarkit.consent import (
    ConsentAuthority,
    ConsentEndReason,
    ConsentLapse,
    ConsentVerifier,
    ConsentWatch,
    SQLiteConsentStore,
    StatusChecker,
    TokenStatus,
    VerifiedConsent,
)
from avatarkit.errors import (
    ConsentCheck,
    ConsentExpired,
    ConsentOutOfScope,
    ConsentStatusUnavailable,
    ConsentWithdrawn,
)

from ..conftest import AUDIENCE, ISSUER, ISSUER_KEY, grant_fields


class Gate:
    """The part of a ConsentGate the watch uses, answering from a script."""

    def __init__(self, *answers: TokenStatus | BaseException,
                 recheck_interval_s: float = 0.05) -> None:
        self.recheck_interval_s = recheck_interval_s
        self.answers = list(answers)
        self.calls = 0

    async def recheck(self, verified: VerifiedConsent, *,
                      fresh_within_s: float | None = None) -> TokenStatus:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


async def verified_consent(**overrides: Any) -> VerifiedConsent:
    """A real VerifiedConsent, issued and verified by a test registry."""
    authority = ConsentAuthority(ISSUER_KEY, issuer=ISSUER, store=SQLiteConsentStore(":memory:"))
    async with authority:
        fields = grant_fields(avatars=["amelia"], purposes=["support"])
        fields.update(overrides)
        _, token = await authority.grant(audience=AUDIENCE, **fields)
        verifier = ConsentVerifier(authority.trusted, audience=AUDIENCE,
                                   status=StatusChecker(authority.trusted, authority.source))
        return await verifier.verify(token)


def watch(gate: Gate, verified: VerifiedConsent, **kwargs: Any
          ) -> tuple[list[str], list[ConsentLapse], ConsentWatch]:
    checks: list[str] = []
    lapses: list[ConsentLapse] = []

    async def on_check(status_check: str) -> None:
        checks.append(status_check)

    w = ConsentWatch(gate, verified, on_lapse=lapses.append,  # type: ignore[arg-type]
                     on_check=on_check, **kwargs)
    return checks, lapses, w


async def wait_until(predicate: Any, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("error", "reason", "withdrawn"), [
    (ConsentWithdrawn("revoked", check=ConsentCheck.REVOKED), ConsentEndReason.REVOKED,
     "revoked"),
    (ConsentWithdrawn("suspended", check=ConsentCheck.SUSPENDED), ConsentEndReason.SUSPENDED,
     "suspended"),
    (ConsentExpired("expired", check=ConsentCheck.EXPIRED), ConsentEndReason.EXPIRED, None),
    (ConsentStatusUnavailable("down", check=ConsentCheck.STATUS_STALE),
     ConsentEndReason.UNVERIFIABLE, None),
    (ConsentOutOfScope("odd", check=ConsentCheck.REGION), ConsentEndReason.UNVERIFIABLE, None),
], ids=["revoked", "suspended", "expired", "stale", "other-consent-error"])
async def test_a_lapse_ends_the_watch_with_one_reason(
        error: Exception, reason: ConsentEndReason, withdrawn: str | None) -> None:
    gate = Gate(TokenStatus.VALID, TokenStatus.VALID, error)
    checks, lapses, w = watch(gate, await verified_consent())
    async with w:
        await wait_until(lambda: bool(lapses))
        await asyncio.sleep(0.15)  # it stopped: no further re-checks
    assert gate.calls == 3
    assert checks == ["valid", "valid", str(error.check)]  # type: ignore[attr-defined]
    assert [lapse.reason for lapse in lapses] == [reason]
    assert lapses[0].error is error and lapses[0].withdrawn == withdrawn
    assert w.lapse is lapses[0] and not w.running


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("x"), OSError("disk")])
async def test_any_unexpected_error_fails_closed(error: Exception) -> None:
    verified = await verified_consent()
    checks, lapses, w = watch(Gate(error), verified)
    async with w:
        await wait_until(lambda: bool(lapses))
    lapse = lapses[0]
    assert lapse.reason is ConsentEndReason.UNVERIFIABLE
    assert isinstance(lapse.error, ConsentStatusUnavailable)
    assert lapse.error.check is ConsentCheck.STATUS_UNAVAILABLE
    assert lapse.error.consent_id == verified.consent_id
    assert type(error).__name__ in str(lapse.error)
    assert checks == ["status_unavailable"]


async def test_the_watch_wakes_at_expiry_and_a_real_gate_says_expired() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1.2)
    verified = await verified_consent(expires_at=soon)
    class Expiring(Gate):
        async def recheck(self, verified: VerifiedConsent, *,
                          fresh_within_s: float | None = None) -> TokenStatus:
            self.calls += 1
            if time.time() >= verified.expires_at.timestamp():
                raise ConsentExpired("expired", check=ConsentCheck.EXPIRED)
            return TokenStatus.VALID

    gate = Expiring(TokenStatus.VALID, recheck_interval_s=3600)  # the interval never fires
    checks, lapses, w = watch(gate, verified)
    started = time.monotonic()
    async with w:
        await wait_until(lambda: bool(lapses), within=4.0)
    assert lapses[0].reason is ConsentEndReason.EXPIRED
    assert time.monotonic() - started < 3.0
    assert gate.calls == 1 and checks == ["expired"]


async def test_a_failing_report_does_not_stop_the_watch() -> None:
    gate = Gate(TokenStatus.VALID)
    calls = 0

    async def broken_log(status_check: str) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("log store down")

    lapses: list[ConsentLapse] = []
    async with ConsentWatch(gate, await verified_consent(),  # type: ignore[arg-type]
                            on_lapse=lapses.append, on_check=broken_log) as w:
        await wait_until(lambda: gate.calls >= 3)
        assert w.running
    assert calls >= 3 and not lapses


async def test_aclose_is_idempotent_and_leaves_no_task() -> None:
    gate = Gate(TokenStatus.VALID)
    _, lapses, w = watch(gate, await verified_consent())
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    w.start()
    w.start()  # once
    await wait_until(lambda: gate.calls >= 1)
    await w.aclose()
    await w.aclose()
    assert not w.running and not lapses
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == before
    with pytest.raises(RuntimeError):
        w.start()
