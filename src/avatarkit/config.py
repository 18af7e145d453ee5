"""``KitConfig``: the kit's configuration, from a TOML file, the environment and code.

Precedence, highest first: values passed in code, ``AVATARKIT_*`` environment variables
(``AVATARKIT_PROVIDERS__TAVUS__API_KEY`` sets ``providers.tavus.api_key``), the TOML file.
Any string value ``"env:NAME"`` is replaced by the environment variable ``NAME``, so secrets
stay out of the file. Secrets are ``SecretStr``. Every validation problem raises
:class:`~avatarkit.ConfigError` naming the field's dotted path and what was expected, never the
value (it may be a secret).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .contract import ProviderSettings
from .disclosure.label_config import LabelConfig
from .disclosure.metadata import DEFAULT_NOTICE
from .errors import ConfigError
from .metering.budget import BudgetConfig
from .providers.registry import available_providers, canonical_name, get_provider_class
from .routing.health import HealthSettings
from .routing.policy import RoutingPolicy

__all__ = [
    "AvatarConfig",
    "ConsentConfig",
    "DisclosureConfig",
    "KitConfig",
    "MeteringConfig",
    "SessionDefaults",
    "default_state_dir",
]

_toml_path: ContextVar[Path | None] = ContextVar("avatarkit_toml_path", default=None)


class SessionDefaults(BaseModel):
    """``[session]``: defaults for every session."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interrupt_ack_timeout: float = Field(
        default=2.0, gt=0, le=30, description="Seconds interrupt() waits for the vendor's ack."
    )
    max_duration_s: float = Field(
        default=1800, gt=0, le=86_400, description="Hard cap passed to the vendor (leak guard)."
    )
    close_timeout: float = Field(
        default=20.0, gt=0, description="Seconds aclose() spends ending the vendor session."
    )
    failover_after_send_failures: int = Field(
        default=3, ge=1, description="Consecutive failed sends that count as a dead vendor "
        "session (failover, when the policy allows it).")
    replay_buffer_s: float = Field(
        default=60.0, gt=0, le=600, description="Audio of an unfinished utterance kept for "
        "replay after a failover (the oldest is dropped beyond this).")


def default_state_dir() -> Path:
    """``$AVATARKIT_STATE_DIR``, else ``$XDG_STATE_HOME`` (or ``~/.local/state``)
    ``/avatarkit``: where files that outlive the process live."""
    if state := os.environ.get("AVATARKIT_STATE_DIR"):
        return Path(state)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "avatarkit"


def _default_ledger_path() -> Path:
    """``sessions.db`` in :func:`default_state_dir`: a file that outlives the process, so
    that a crash leaves rows the reaper can find."""
    return default_state_dir() / "sessions.db"


class MeteringConfig(BaseModel):
    """``[metering]``: the session ledger and usage reporting.

    ``ledger`` is the SQLite file every vendor session is recorded in before its create call
    (``":memory:"`` keeps it in the process: nothing to reap after a crash). Processes that
    share the file share usage and budgets, and can reap each other's orphans.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ledger: Path = Field(default_factory=_default_ledger_path)
    usage_interval_s: float = Field(default=30.0, gt=0, le=3600,
                                    description="How often live sessions send UsageUpdated.")
    heartbeat_interval_s: float = Field(
        default=15.0, gt=0, description="How often an open kit marks its sessions alive.")
    stale_after_s: float = Field(
        default=120.0, gt=0, description="A session on another host whose owner has not "
        "sent a heartbeat for this long is an orphan the reaper may end.")


class ConsentConfig(BaseModel):
    """``[consent]``: whose consent tokens this deployment trusts, and how it checks them.

    Every session needs a token of one of ``issuers``, signed with a key pinned *for that
    issuer* in ``jwks``, and addressed to ``audience``. ``jwks`` is one JWKS (a file, or
    inline) when there is one issuer; with several, a table giving each issuer its own
    (``[consent.jwks]`` ``"https://consent.acme.example" = "keys/acme.jwks.json"``): one set
    shared by several issuers would let each sign in the others' names. Revocation status
    comes from signed status lists: a URI listed in ``status_lists`` is read from that local
    file (offline deployments); any other ``http(s)`` URI is fetched. ``store`` is the SQLite
    consent ledger and generation log; without it the log is kept in memory only (a warning
    says so).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    audience: str = Field(min_length=1, description="This deployment's id (the tokens' aud).")
    issuers: list[str] = Field(min_length=1, description="Trusted consent registries (iss).")
    jwks: Path | dict[str, Any] = Field(
        description="The issuers' pinned Ed25519 public keys: a JWKS file or inline JWKS (one "
        "issuer), or a table issuer -> JWKS file or inline JWKS.")
    status_lists: dict[str, Path] = Field(
        default_factory=dict, description="Status list URI -> local file holding the signed "
        "statuslist+jwt.")
    max_status_age_s: float = Field(
        default=86_400, gt=0, description="Older status lists fail closed.")
    recheck_interval_s: float = Field(
        default=60, gt=0, le=3600, description="Live sessions re-check consent this often.")
    leeway_s: float = Field(default=5, ge=0, le=300, description="Clock skew allowed.")
    store: Path | None = Field(
        default=None, description="SQLite consent ledger + generation log (file path).")

    @field_validator("jwks", mode="after")
    @classmethod
    def _jwks_paths(cls, value: Path | dict[str, Any]) -> Path | dict[str, Any]:
        if isinstance(value, Path) or _is_jwks(value):
            return value
        out: dict[str, Any] = {}
        for issuer, keys in value.items():
            if isinstance(keys, str) and keys:
                out[issuer] = Path(keys)
            elif _is_jwks(keys):
                out[issuer] = keys
            else:
                raise ValueError(f"{issuer}: expected a JWKS file path or an inline JWKS "
                                 "({keys = [...]})")
        return out

    @model_validator(mode="after")
    def _keys_per_issuer(self) -> ConsentConfig:
        if len(set(self.issuers)) != len(self.issuers):
            raise ConfigError("lists an issuer twice", field="consent.issuers")
        if isinstance(self.jwks, Path) or _is_jwks(self.jwks):
            if len(self.issuers) > 1:
                raise ConfigError(
                    f"one key set for {len(self.issuers)} issuers would let each sign in the "
                    "others' names: give each issuer its own ([consent.jwks] "
                    "\"<issuer>\" = \"<jwks file>\")", field="consent.jwks")
            return self
        named, listed = set(self.jwks), set(self.issuers)
        if named != listed:
            missing, extra = sorted(listed - named), sorted(named - listed)
            problem = f"no key set for {', '.join(missing)}" if missing else \
                f"{', '.join(extra)} not in consent.issuers"
            raise ConfigError(f"must give exactly the issuers their key sets: {problem}",
                              field="consent.jwks")
        return self

    def jwks_by_issuer(self) -> dict[str, Path | dict[str, Any]]:
        """Each trusted issuer's pinned JWKS (a file path or the JWKS itself)."""
        if isinstance(self.jwks, Path) or _is_jwks(self.jwks):
            return {self.issuers[0]: self.jwks}
        return dict(self.jwks)


def _is_jwks(value: object) -> bool:
    """An inline JWKS (``{"keys": [...]}``) rather than a table of issuers."""
    return isinstance(value, dict) and "keys" in value


class DisclosureConfig(BaseModel):
    """``[disclosure]``: the AI notice every JoinInfo carries and the marking of produced media.

    ``notice_key`` is an Ed25519 private JWK file that signs the disclosure notice viewers can
    verify; without it the kit signs with a key made at start-up (``kit.disclosure_jwks()``
    publishes it). ``burned_label`` is the label drawn into frames the SDK renders itself
    (self-hosted engines; vendors render their own video, so viewer UIs label it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(default="AI-generated", min_length=1)
    notice: str = Field(default=DEFAULT_NOTICE, min_length=1)
    burned_label: LabelConfig = Field(default_factory=LabelConfig)
    notice_key: Path | None = None


class AvatarConfig(BaseModel):
    """``[avatars.NAME]``: a logical likeness and its id at each provider.

    Keys other than the named fields are provider names mapped to the vendor-side id
    (``tavus = "r79e1c033f"``).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    display_name: str | None = None
    consent_subject: str | None = None
    local: str | None = None

    @property
    def provider_ids(self) -> dict[str, str]:
        return {canonical_name(k): v for k, v in (self.model_extra or {}).items()}

    @model_validator(mode="after")
    def _ids_are_strings(self) -> AvatarConfig:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key}: expected the provider's avatar id as a non-empty string")
        return self


class KitConfig(BaseSettings):
    """The whole configuration. Build with ``KitConfig.from_toml(path)`` or keyword arguments."""

    model_config = SettingsConfigDict(
        env_prefix="AVATARKIT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    providers: dict[str, ProviderSettings] = Field(
        default_factory=dict, description="By canonical provider name, each validated by the "
        "provider's own settings model.")
    avatars: dict[str, AvatarConfig] = Field(default_factory=dict)
    session: SessionDefaults = Field(default_factory=SessionDefaults)
    disclosure: DisclosureConfig = Field(default_factory=DisclosureConfig)
    policies: dict[str, RoutingPolicy] = Field(
        default_factory=dict, description="Routing policies by name ([policies.NAME]).")
    consent: ConsentConfig | None = Field(
        default=None, description="Trusted consent issuers; sessions cannot start without it.")
    health: HealthSettings = Field(default_factory=HealthSettings)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    budgets: BudgetConfig = Field(default_factory=BudgetConfig)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> KitConfig:
        """Load a TOML file (environment variables and ``overrides`` take precedence)."""
        file = Path(path)
        try:
            with file.open("rb") as fh:
                tomllib.load(fh)  # surface syntax errors with the file's name
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file} is not valid TOML: {exc}") from None
        token = _toml_path.set(file)
        try:
            return cls(**overrides)
        finally:
            _toml_path.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _resolve_env_references(cls, data: Any) -> Any:
        return _resolve_env(data, "") if isinstance(data, Mapping) else data

    @field_validator("providers", mode="before")
    @classmethod
    def _validate_providers(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        settings: dict[str, ProviderSettings] = {}
        for raw_name, section in raw.items():
            kind = (section.kind if isinstance(section, ProviderSettings)
                    else section.get("kind") if isinstance(section, Mapping) else None)
            if kind is not None and not isinstance(kind, str):
                raise ConfigError("expected an adapter name (a string)",
                                  field=f"providers.{raw_name}.kind")
            # A section named after an adapter (or alias) is that adapter; any other name
            # needs ``kind`` (several accounts or plans of one vendor).
            name = canonical_name(str(raw_name)) if kind is None else str(raw_name)
            if name in settings:
                raise ConfigError(f"configured twice (as {name!r} and an alias)",
                                  field=f"providers.{raw_name}")
            try:
                model = get_provider_class(kind or str(raw_name)).settings_model
            except ConfigError:
                known = ", ".join(available_providers())
                if kind is not None:
                    raise ConfigError(f"unknown adapter {kind!r}; known: {known}",
                                      field=f"providers.{raw_name}.kind") from None
                raise ConfigError(
                    f"unknown provider {name!r}: name the section after an adapter ({known}) "
                    "or set kind = \"ADAPTER\"", field=f"providers.{raw_name}") from None
            if isinstance(section, model):
                settings[name] = section
                continue
            try:
                settings[name] = model.model_validate(section)
            except ValidationError as exc:
                raise _config_error(exc, prefix=f"providers.{raw_name}") from None
        return settings

    @model_validator(mode="after")
    def _avatars_name_configured_providers(self) -> KitConfig:
        for avatar_name, avatar in self.avatars.items():
            for provider in avatar.provider_ids:
                if provider not in self.providers:
                    raise ConfigError(
                        f"names provider {provider!r}, which is not configured under [providers]",
                        field=f"avatars.{avatar_name}.{provider}",
                    )
        return self

    @model_validator(mode="after")
    def _policies_name_configured_providers(self) -> KitConfig:
        for policy_name, policy in self.policies.items():
            for key in ("providers_allowed", "providers_denied"):
                for provider in getattr(policy, key) or ():
                    if canonical_name(provider) not in self.providers:
                        raise ConfigError(
                            f"names provider {provider!r}, which is not configured under "
                            "[providers]", field=f"policies.{policy_name}.{key}")
        return self

    @model_validator(mode="after")
    def _budgets_name_configured_providers(self) -> KitConfig:
        for provider in self.budgets.provider_monthly:
            if provider not in self.providers:
                raise ConfigError(f"names provider {provider!r}, which is not configured "
                                  "under [providers]",
                                  field=f"budgets.provider_monthly.{provider}")
        return self

    @model_validator(mode="after")
    def _paths_relative_to_the_file(self) -> KitConfig:
        """Relative paths in a TOML file are relative to that file, not the working dir."""
        base = _toml_path.get()
        if base is None:
            return self
        root = base.parent

        def fix(path: Path | None) -> Path | None:
            return root / path if path is not None and not path.is_absolute() else path

        if self.consent is not None:
            jwks = self.consent.jwks
            consent = self.consent.model_copy(update={
                "jwks": fix(jwks) if isinstance(jwks, Path) else jwks if _is_jwks(jwks)
                else {iss: fix(v) if isinstance(v, Path) else v for iss, v in jwks.items()},
                "store": fix(self.consent.store),
                "status_lists": {k: fix(v) for k, v in self.consent.status_lists.items()},
            })
            object.__setattr__(self, "consent", consent)
        disclosure = self.disclosure.model_copy(update={
            "notice_key": fix(self.disclosure.notice_key)})
        object.__setattr__(self, "disclosure", disclosure)
        if str(self.metering.ledger) != ":memory:":
            object.__setattr__(self, "metering", self.metering.model_copy(
                update={"ledger": fix(self.metering.ledger)}))
        return self

    def provider_settings(self) -> dict[str, ProviderSettings]:
        """Each configured provider's validated settings, by canonical name, in file order."""
        return dict(self.providers)


def _resolve_env(value: Any, path: str) -> Any:
    if isinstance(value, str) and value.startswith("env:"):
        var = value[4:]
        if not var:
            raise ConfigError("'env:' needs a variable name, as in env:TAVUS_API_KEY", field=path)
        if var not in os.environ:
            raise ConfigError(f"environment variable {var} is not set", field=path)
        return os.environ[var]
    if isinstance(value, Mapping):
        return {k: _resolve_env(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    """A ConfigError listing each problem as ``path: message`` (inputs left out: secrets)."""
    problems: list[str] = []
    first_field: str | None = None
    for err in exc.errors(include_input=False, include_url=False):
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ConfigError):
            return ctx_error
        loc = ".".join(str(p) for p in err["loc"])
        field = ".".join(p for p in (prefix, loc) if p)
        first_field = first_field or field
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {msg}" if field else msg)
    message = "; ".join(problems)
    config_error = ConfigError(message)
    config_error.field = first_field
    return config_error
