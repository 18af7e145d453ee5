"""The support matrix is generated from the adapters' profiles, and docs/providers.md holds
exactly what the generator prints (so the published matrix cannot drift from the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from avatarkit import KitConfig
from avatarkit.cli import main
from avatarkit.providers.matrix import BUILTIN_ADAPTERS, support_matrix
from avatarkit.providers.registry import get_provider_class

DOC = Path(__file__).resolve().parents[2] / "docs" / "providers.md"
BEGIN, END = "<!-- BEGIN generated: avatarkit providers -->", "<!-- END generated -->"


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_docs_hold_the_generated_matrix() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, "docs/providers.md lost its generated block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert block == support_matrix(), (
        "docs/providers.md is stale: regenerate the block with `avatarkit providers`")


def test_every_builtin_adapter_is_listed_with_its_real_format() -> None:
    rows = _rows(support_matrix())
    adapters = {cells[1] for cells in rows.values()}
    assert adapters == set(BUILTIN_ADAPTERS)
    for cells in rows.values():
        cls = get_provider_class(cells[1])
        assert cls.wire, f"{cls.name} has no wire notes"
        # no vendor adapter invents a price: unknown reads "unknown", never 0; the
        # self-hosted engine's default is a known 0 (your own hardware, set your GPU cost)
        assert cells[8] == ("0 USD" if cells[1] == "local" else "unknown")
    assert rows["tavus"][3] == "PCM16 24 kHz mono"
    assert rows["local (in process)"][6:] == ["yes", "none", "0 USD", "self-hosted", "unknown",
                                              "yes"]
    assert rows["local (remote)"][7] == "whep"


def test_configured_prices_and_regions_show_as_configured() -> None:
    config = KitConfig(providers={
        "tavus": {"api_key": "k", "channel": "websocket", "price_per_minute": "0.30",
                  "regions": ["us"]},
        "tavus-eu": {"kind": "tavus", "api_key": "k", "channel": "websocket",
                     "regions": ["eu"], "currency": "EUR", "price_per_minute": "0.28"}})
    rows = _rows(support_matrix(config.providers))
    assert rows["tavus"][8:10] == ["0.30 USD", "us"]
    assert rows["tavus-eu"][1] == "tavus" and rows["tavus-eu"][8:10] == ["0.28 EUR", "eu"]
    # the secret never reaches the output
    assert "k |" not in support_matrix(config.providers)


def test_cli_prints_the_matrix(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["providers"]) == 0
    assert capsys.readouterr().out == support_matrix()
    config = tmp_path / "kit.toml"
    config.write_text('[providers.tavus]\napi_key = "secret-key-123"\nchannel = "websocket"\n'
                      'price_per_minute = "0.31"\n')
    assert main(["providers", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| `tavus` \| tavus \|.*\| 0\.31 USD \|", out)
    assert "secret-key-123" not in out
