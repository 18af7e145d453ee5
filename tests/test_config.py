"""KitConfig: TOML + environment, env: secret references, typed errors naming the field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from avatarkit import AvatarKit, ConfigError, KitConfig

from .conftest import CONSENT, consent_config

SECRET = "tvs-live-9f8e7d6c5b4a"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "avatarkit.toml"
    path.write_text(text)
    return path


BASIC = """
[providers.tavus]
api_key = "env:TEST_TAVUS_KEY"
channel = "websocket"
price_per_minute = "0.32"
regions = ["us"]

[avatars.amelia]
display_name = "Amelia"
tavus = "r_amelia"

[session]
interrupt_ack_timeout = 1.5
"""


def test_toml_with_env_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TAVUS_KEY", SECRET)
    config = KitConfig.from_toml(write(tmp_path, BASIC))
    tavus = config.provider_settings()["tavus"]
    assert tavus.api_key is not None and tavus.api_key.get_secret_value() == SECRET
    assert tavus.price_per_minute == Decimal("0.32")
    assert tavus.regions == frozenset({"us"})
    assert config.session.interrupt_ack_timeout == 1.5
    assert config.avatars["amelia"].provider_ids == {"tavus": "r_amelia"}
    # The secret never shows in reprs.
    assert SECRET not in repr(config) and SECRET not in repr(tavus) and SECRET not in str(tavus)


def test_missing_env_variable_names_field_and_variable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_TAVUS_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        KitConfig.from_toml(write(tmp_path, BASIC))
    assert info.value.field == "providers.tavus.api_key"
    assert "TEST_TAVUS_KEY" in str(info.value)


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TAVUS_KEY", SECRET)
    monkeypatch.setenv("AVATARKIT_SESSION__INTERRUPT_ACK_TIMEOUT", "0.5")
    config = KitConfig.from_toml(write(tmp_path, BASIC))
    assert config.session.interrupt_ack_timeout == 0.5


def test_typo_in_provider_section_is_reported_with_its_path(tmp_path: Path) -> None:
    text = '[providers.tavus]\napi_key = "k"\nchannel = "websocket"\nprice_per_minuet = 1\n'
    with pytest.raises(ConfigError) as info:
        KitConfig.from_toml(write(tmp_path, text))
    assert info.value.field == "providers.tavus.price_per_minuet"
    assert "Extra inputs are not permitted" in str(info.value)


def test_bad_value_names_field_without_echoing_secret(tmp_path: Path) -> None:
    text = f'[providers.tavus]\napi_key = "{SECRET}"\nchannel = "websocket"\n' \
           'price_per_minute = "cheap"\n'
    with pytest.raises(ConfigError) as info:
        KitConfig.from_toml(write(tmp_path, text))
    assert info.value.field == "providers.tavus.price_per_minute"
    assert SECRET not in str(info.value) and "cheap" not in str(info.value)


def test_negative_price_rejected() -> None:
    with pytest.raises(ConfigError, match=r"providers\.tavus\.price_per_minute"):
        KitConfig(providers={"tavus": {"api_key": "k", "channel": "websocket",
                                       "price_per_minute": "-1"}})


def test_unknown_provider(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        KitConfig.from_toml(write(tmp_path, '[providers.tavsu]\napi_key = "k"\n'))
    assert info.value.field == "providers.tavsu"
    assert "tavus" in str(info.value)  # lists the known ones


def test_avatar_naming_unconfigured_provider() -> None:
    with pytest.raises(ConfigError) as info:
        KitConfig(providers={"tavus": {"api_key": "k", "channel": "websocket"}},
                  avatars={"amelia": {"tavus": "r1", "simli": "f1"}})
    assert info.value.field == "avatars.amelia.simli"


def test_avatar_id_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match=r"avatars\.amelia"):
        KitConfig(providers={"tavus": {"api_key": "k", "channel": "websocket"}},
                  avatars={"amelia": {"tavus": 5}})


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        KitConfig.from_toml(write(tmp_path, "[sesion]\nx = 1\n"))
    assert info.value.field == "sesion"


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        KitConfig.from_toml(write(tmp_path, "[providers\n"))
    with pytest.raises(ConfigError, match="not found"):
        KitConfig.from_toml(tmp_path / "nope.toml")


def test_tavus_requires_api_key_at_kit_construction() -> None:
    config = KitConfig(providers={"tavus": {"channel": "websocket"}})
    with pytest.raises(ConfigError) as info:
        AvatarKit(config)
    assert info.value.field == "providers.tavus.api_key"


def test_empty_env_reference() -> None:
    with pytest.raises(ConfigError, match="variable name"):
        KitConfig(providers={"tavus": {"api_key": "env:", "channel": "websocket"}})


def test_unknown_policy_fails_closed() -> None:
    config = KitConfig(providers={"tavus": {"api_key": "k", "channel": "websocket"}},
                       avatars={"amelia": {"tavus": "r1"}}, consent=consent_config())
    kit = AvatarKit(config)
    with pytest.raises(ConfigError) as info:
        kit.session("amelia", consent=CONSENT, purpose="support", policy="eu-strict")
    assert info.value.field == "policy"
    with pytest.raises(ConfigError, match="unknown avatar"):
        kit.session("bob", consent=CONSENT, purpose="support")
    with pytest.raises(ConfigError, match="positive"):
        kit.session("amelia", consent=CONSENT, purpose="support", interrupt_ack_timeout=0)


def test_environment_sets_a_provider_secret(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TAVUS_KEY", "from-file-ref")
    monkeypatch.setenv("AVATARKIT_PROVIDERS__TAVUS__API_KEY", SECRET)
    config = KitConfig.from_toml(write(tmp_path, BASIC))
    tavus = config.provider_settings()["tavus"]
    assert tavus.api_key is not None and tavus.api_key.get_secret_value() == SECRET
    assert tavus.price_per_minute == Decimal("0.32")  # the rest of the file still applies
