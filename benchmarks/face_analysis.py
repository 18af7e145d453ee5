"""Face analysis per frame (mediapipe detection + 468-point mesh), as avatar preparation runs it.

Measures ``FaceAnalyzer.analyze`` on the public-domain astronaut portrait: at 512x512 (the
size prepared avatars are usually cut to), and on a 1920x1080 canvas with the portrait
shrunk so the face is small (about 74 px), at two places: one where the whole-frame detector
finds it, one where it misses it and the search goes on in tiles; ``thorough=True`` (the
first frame of a preparation) always searches the tiles. p50/p99 over repeated calls after
a warm-up.

    python benchmarks/face_analysis.py [--repeat 30] [--write]

``--write`` records the result in docs/performance.md (machine and date included).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from _report import machine, percentile, write_section
from skimage import data

from avatarkit.local_engine.face import FaceAnalyzer, open_face_analyzer

Frame = npt.NDArray[np.uint8]
HEADING = "## Face analysis per frame"


def portrait() -> Frame:
    return np.asarray(data.astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]


def small_face_canvas(y: int, x: int) -> Frame:
    """The portrait shrunk to 200x200 at (y, x) on a grey 1920x1080 canvas (a face of about
    74 px)."""
    canvas = np.full((1080, 1920, 3), 128, np.uint8)
    small = cv2.resize(portrait(), (200, 200), interpolation=cv2.INTER_AREA)
    canvas[y:y + 200, x:x + 200] = small
    return canvas


def timed(analyzer: FaceAnalyzer, frame: Frame, repeat: int, *,
          thorough: bool) -> dict[str, Any]:
    found = analyzer.analyze(frame, thorough=thorough)
    ms: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        analyzer.analyze(frame, thorough=thorough)
        ms.append((time.perf_counter_ns() - start) / 1e6)
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99),
            "faces": found.face_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    cases = [("512x512 portrait", portrait(), False),
             ("1920x1080, 74 px face the whole frame shows", small_face_canvas(600, 1400), False),
             ("1920x1080, 74 px face found in tiles", small_face_canvas(300, 500), False),
             ("1920x1080, 74 px face, thorough", small_face_canvas(300, 500), True)]
    rows = []
    with open_face_analyzer() as analyzer:
        for name, frame, thorough in cases:
            rows.append((name, timed(analyzer, frame, args.repeat, thorough=thorough)))
    lines = ["| frame | faces found | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['faces']} | {r['p50']:.1f} | {r['p99']:.1f} |" for name, r in rows]
    table = "\n".join(lines)
    print(f"face analysis per frame ({args.repeat} calls each)\n{table}")
    if args.write:
        write_section(HEADING, f"{HEADING}\n\n{machine()}; {datetime.now(UTC):%Y-%m-%d}; "
                      f"`python benchmarks/face_analysis.py --repeat {args.repeat}`.\n\n"
                      f"{table}\n")


if __name__ == "__main__":
    main()
