"""Provider registry: explicit register(), built-ins, the avatarkit.providers entry points."""

from __future__ import annotations

from importlib.metadata import entry_points

import httpx
import pytest

from avatarkit import AudioFormat, Capabilities, ConfigError, ProviderProfile
from avatarkit.providers import (
    Provider,
    ProviderSession,
    SessionRequest,
    available_providers,
    get_provider_class,
    register,
)
from avatarkit.providers.registry import _registered, canonical_name
from avatarkit.providers.tavus import TavusProvider


class EchoLabProvider(Provider):
    name = "echolab"
    aliases = ("echo-lab",)

    @property
    def profile(self) -> ProviderProfile:
        return self._build_profile(capabilities=Capabilities(), audio_format=AudioFormat(16_000))

    async def start(self, request: SessionRequest) -> ProviderSession:
        raise NotImplementedError("not started in these tests")


def test_register_and_resolve_alias() -> None:
    register(EchoLabProvider)
    try:
        assert get_provider_class("echolab") is EchoLabProvider
        assert get_provider_class("echo-lab") is EchoLabProvider
        assert canonical_name("echo-lab") == "echolab"
        assert "echolab" in available_providers()
    finally:
        _registered.pop("echolab", None)


def test_register_refuses_silent_replacement() -> None:
    register(EchoLabProvider)
    try:
        other = type("EchoLab2", (EchoLabProvider,), {})
        with pytest.raises(ValueError, match="already registered"):
            register(other)
        assert register(other, replace=True) is other
    finally:
        _registered.pop("echolab", None)


def test_register_rejects_non_providers() -> None:
    with pytest.raises(TypeError):
        register(int)  # type: ignore[arg-type]


def test_tavus_is_published_as_an_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group="avatarkit.providers")}
    assert names.get("tavus") == "avatarkit.providers.tavus:TavusProvider"
    assert get_provider_class("tavus") is TavusProvider


def test_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'nobody'"):
        get_provider_class("nobody")


def test_profile_takes_operator_settings() -> None:
    settings = TavusProvider.settings_model.model_validate(
        {"api_key": "k", "channel": "websocket", "price_per_minute": "0.25",
         "regions": ["us"]})
    provider = TavusProvider(settings, http=httpx.AsyncClient())
    profile = provider.profile
    assert profile.price_per_minute is not None and str(profile.price_per_minute) == "0.25"
    assert profile.regions == frozenset({"us"})
    assert profile.audio_format == AudioFormat(24_000, 1)
    assert profile.capabilities.join_kinds == frozenset({"daily"})
    unknown = TavusProvider(TavusProvider.settings_model.model_validate(
        {"api_key": "k", "channel": "websocket"}), http=httpx.AsyncClient()).profile
    assert unknown.price_per_minute is None and unknown.regions is None  # unknown, not 0/anywhere
