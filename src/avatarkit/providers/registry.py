"""Which provider class serves which name.

Lookup order: classes passed to :func:`register`, then the built-in adapters, then the
``avatarkit.providers`` entry-point group (so an installed third-party package is found without
importing it until it is asked for). Aliases (``heygen`` -> ``liveavatar``) resolve to the
canonical name.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..contract import Provider
from ..errors import ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_providers",
    "canonical_name",
    "get_provider_class",
    "register",
]

ENTRY_POINT_GROUP = "avatarkit.providers"

# Built-in adapters, imported only when asked for.
_BUILTIN: dict[str, str] = {
    "tavus": "avatarkit.providers.tavus:TavusProvider",
    "liveavatar": "avatarkit.providers.liveavatar:LiveAvatarProvider",
    "simli": "avatarkit.providers.simli:SimliProvider",
    "did": "avatarkit.providers.did:DIDProvider",
    "local": "avatarkit.providers.local:LocalProvider",
}
_BUILTIN_ALIASES: dict[str, str] = {"heygen": "liveavatar", "d-id": "did"}

_registered: dict[str, type[Provider]] = {}
_aliases: dict[str, str] = {}


def register(provider_class: type[Provider], *, replace: bool = False) -> type[Provider]:
    """Register a provider class under its ``name`` and ``aliases``. Usable as a decorator."""
    if not (isinstance(provider_class, type) and issubclass(provider_class, Provider)):
        raise TypeError(f"{provider_class!r} is not a Provider subclass")
    name = getattr(provider_class, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{provider_class.__name__}.name must be a non-empty string")
    if not replace and name in _registered and _registered[name] is not provider_class:
        raise ValueError(f"provider {name!r} is already registered; pass replace=True")
    _registered[name] = provider_class
    for alias in provider_class.aliases:
        _aliases[alias] = name
    return provider_class


def canonical_name(name: str) -> str:
    """Resolve an alias to the provider's registered name."""
    return _aliases.get(name) or _BUILTIN_ALIASES.get(name) or name


def _load(target: str, name: str) -> type[Provider]:
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"{target} is not a Provider subclass", field=f"providers.{name}")
    return cls


def get_provider_class(name: str) -> type[Provider]:
    """The class registered for ``name`` (or an alias of it)."""
    key = canonical_name(name)
    if key in _registered:
        return _registered[key]
    if key in _BUILTIN:
        return register(_load(_BUILTIN[key], key))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == key:
            return register(_load(ep.value, key))
    raise ConfigError(
        f"unknown provider {name!r}; known: {', '.join(available_providers())}",
        field=f"providers.{name}",
    )


def available_providers() -> list[str]:
    """Every name that :func:`get_provider_class` can resolve (canonical names)."""
    names = set(_registered) | set(_BUILTIN)
    names |= {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)
