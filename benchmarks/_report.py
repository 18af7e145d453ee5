"""What every benchmark shares: the machine description, percentiles, and replacing its own
section of docs/performance.md (and nothing else)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE_MD = ROOT / "docs" / "performance.md"


def machine() -> str:
    """CPU model, core count, Python and OS: results mean little without them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def write_section(heading: str, section: str, path: Path = PERFORMANCE_MD) -> None:
    """Replace the section that starts with ``heading`` (a ``## `` line prefix), or append it."""
    text = path.read_text() if path.exists() else "# Performance\n"
    pattern = re.compile(re.escape(heading) + r".*?(?=\n## |\Z)", re.S)
    body = section.rstrip("\n")
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + body
    path.write_text(text.rstrip("\n") + "\n")
