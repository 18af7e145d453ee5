"""The benchmarks still run (tiny sizes, nothing written): a benchmark that rots is found here,
not on the day someone needs its numbers. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("script", "args", "expect"), [
    ("send_audio.py", ["--chunks", "60"], "send_audio (back-to-back)"),
    ("consent_tokens.py", ["--iterations", "20"], "token length"),
    ("watermark.py", ["--repeat", "5"], "PSNR"),
    ("face_analysis.py", ["--repeat", "2"], "512x512 portrait | 1 |"),
    ("route.py", ["--decisions", "300", "--sessions", "5"], "concurrent sessions: 5/5 live"),
    ("whep_first_frame.py", ["--trials", "2"], "first frame after speech"),
    ("offline_render.py", ["--seconds", "1", "--runs", "1"], "offline render of 1 s"),
    ("offline_render.py", ["--seconds", "1", "--runs", "1", "--canvas", "1280x720"],
     "1280x720, lite engine"),
    ("musetalk_throughput.py", ["--size", "ci", "--batches", "2", "--frames", "4",
                                "--baseline-batch", "2", "--baseline-frames", "4",
                                "--threads", "1"], "musetalk throughput on CPU"),
])
def test_benchmark_runs(script: str, args: list[str], expect: str) -> None:
    before = (ROOT / "docs" / "performance.md").read_text()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout
    assert (ROOT / "docs" / "performance.md").read_text() == before  # only --write writes
