"""The provider support matrix, built from the adapters' own profiles (``docs/providers.md``).

Every row comes from a :class:`~avatarkit.contract.ProviderProfile` of a real adapter
instance, so the table cannot drift from the code: capabilities, the audio format the adapter
sends, how viewers join, whether frames reach this process, and price, regions and declared
latency as configured (a missing value reads "unknown", never 0 or "anywhere"). With no config,
each built-in adapter is shown with its defaults (and each of its documented variants).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from ..contract import Provider, ProviderProfile, ProviderSettings
from .registry import get_provider_class

__all__ = ["BUILTIN_ADAPTERS", "support_matrix"]

#: The adapters shipped with avatarkit, in the order the matrix lists them.
BUILTIN_ADAPTERS = ("tavus", "liveavatar", "simli", "did", "local")

_PLACEHOLDER_KEY = "documentation-only"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _row(label: str, provider: type[Provider], profile: ProviderProfile) -> str:
    caps = profile.capabilities
    inputs = [kind for kind, on in (("audio", caps.audio_input), ("text", caps.text_input))
              if on]
    fmt = profile.audio_format
    channels = "mono" if fmt.channels == 1 else f"{fmt.channels} channels"
    audio = f"PCM16 {fmt.sample_rate / 1000:g} kHz {channels}"
    joins = ", ".join(sorted(caps.join_kinds)) or "none"
    price = (f"{profile.price_per_minute} {profile.currency}"
             if profile.price_per_minute is not None else "unknown")
    regions = ", ".join(sorted(profile.regions)) if profile.regions is not None else "unknown"
    latency = (f"{profile.first_frame_latency_ms:.0f} ms"
               if profile.first_frame_latency_ms is not None else "unknown")
    cells = [f"`{label}`", provider.name, " + ".join(inputs) or "none", audio,
             _yes(caps.interrupt), _yes(caps.playback_events), _yes(caps.frames_in_process),
             joins, price, regions, latency, _yes(profile.self_hosted)]
    return "| " + " | ".join(cells) + " |"


_HEADER = ("| provider | adapter | input | audio sent | interrupt | playback events | "
           "frames here | viewers join | price / min | regions | first frame (declared) | "
           "self-hosted |\n|" + " --- |" * 12)


def _profiles(sections: Mapping[str, ProviderSettings | Mapping[str, Any]]
              ) -> list[tuple[str, type[Provider], ProviderProfile]]:
    rows: list[tuple[str, type[Provider], ProviderProfile]] = []
    http = httpx.AsyncClient()  # never sends: a profile is built without calling the vendor
    for label, raw in sections.items():
        kind = raw.kind if isinstance(raw, ProviderSettings) else raw.get("kind")
        cls = get_provider_class(str(kind or label))
        settings = raw if isinstance(raw, ProviderSettings) else \
            cls.settings_model.model_validate({"api_key": _PLACEHOLDER_KEY, **raw})
        rows.append((label, cls, cls(settings, http=http, instance_name=label).profile))
    return rows


def _default_sections() -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for name in BUILTIN_ADAPTERS:
        cls = get_provider_class(name)
        variants = cls.documented_variants or {"": {}}
        for variant, overrides in variants.items():
            label = f"{name} ({variant})" if variant else name
            sections[label] = {"kind": name, **overrides}
    return sections


def support_matrix(providers: Mapping[str, ProviderSettings | Mapping[str, Any]] | None = None,
                   *,
                   adapters: Iterable[str] | None = None) -> str:
    """The support matrix as Markdown.

    ``providers`` are ``[providers.*]`` sections, validated (``KitConfig.providers``) or raw
    (prices and regions as configured); without
    them every built-in adapter is listed with its defaults. ``adapters`` picks whose wire
    notes and unverified points follow the table (default: the adapters in the table).
    """
    sections: Mapping[str, ProviderSettings | Mapping[str, Any]] = (
        providers if providers is not None else _default_sections())
    rows = _profiles(sections)
    lines = [_HEADER, *(_row(label, cls, profile) for label, cls, profile in rows), ""]
    seen: list[type[Provider]] = []
    wanted = set(adapters) if adapters is not None else None
    for _, cls, _ in rows:
        if cls not in seen and (wanted is None or cls.name in wanted):
            seen.append(cls)
    for cls in seen:
        aliases = f" (alias {', '.join(f'`{a}`' for a in cls.aliases)})" if cls.aliases else ""
        lines += [f"### `{cls.name}`{aliases}", "", cls.wire or "(no wire notes)", ""]
        if cls.unverified:
            lines += ["Not confirmed by the vendor (the adapter and its emulator make these "
                      "configurable):", ""]
            lines += [f"- {point}" for point in cls.unverified]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
