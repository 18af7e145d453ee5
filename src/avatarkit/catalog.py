"""Avatars: a logical likeness ("amelia") and the id it has at each provider."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .config import AvatarConfig
from .errors import ConfigError

__all__ = ["Avatar", "Catalog"]


@dataclass(frozen=True, slots=True)
class Avatar:
    """One likeness. ``provider_ids`` maps a provider name to that vendor's id for it."""

    name: str
    provider_ids: Mapping[str, str] = field(default_factory=dict)
    display_name: str | None = None
    consent_subject: str | None = None
    local: str | None = None

    def id_at(self, provider: str, *, vendor: str | None = None,
              remote: bool = False) -> str | None:
        """The avatar's id at ``provider`` (a configured provider name whose adapter is
        ``vendor``), or None when the avatar is not there.

        A self-hosted engine (vendor ``local``) without an id of its own configured renders
        the avatar's ``local`` media in this process, and knows it by its name on a remote
        engine server (``remote``), whose config lists its own avatars."""
        found = self.provider_ids.get(provider)
        if found is None and (vendor or provider) == "local":
            found = self.name if remote else self.local
        return found


class Catalog:
    """The configured avatars, by name."""

    def __init__(self, avatars: Mapping[str, Avatar]) -> None:
        self._avatars = dict(avatars)

    @classmethod
    def from_config(cls, avatars: Mapping[str, AvatarConfig]) -> Catalog:
        return cls(
            {
                name: Avatar(
                    name=name,
                    provider_ids=dict(cfg.provider_ids),
                    display_name=cfg.display_name,
                    consent_subject=cfg.consent_subject,
                    local=cfg.local,
                )
                for name, cfg in avatars.items()
            }
        )

    def get(self, name: str) -> Avatar:
        try:
            return self._avatars[name]
        except KeyError:
            known = ", ".join(sorted(self._avatars)) or "none configured"
            raise ConfigError(f"unknown avatar {name!r} (known: {known})", field="avatar") from None

    def __iter__(self) -> Iterator[Avatar]:
        return iter(self._avatars.values())

    def __len__(self) -> int:
        return len(self._avatars)
