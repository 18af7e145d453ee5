"""``avatarkit weights``: check a MuseTalk weights folder before serving or rendering with it.

    avatarkit weights check DIR [--version auto|v1.0|v1.5] [--json]

DIR is MuseTalk's ``models/`` folder (``musetalkV15/`` or ``musetalk/``, ``sd-vae/``,
``whisper/``). Each component's file is checked against the network its config describes
(every key present, none unexpected, same shapes, float32/float16/bfloat16) without loading
the networks, and read with ``weights_only=True`` (nothing is unpickled). Prints one line per
component (file, tensors, parameters, dtype, OK or the problem); ``--json`` prints the report
as JSON instead. Exit status: 0 when every component is OK, 1 when one is not, 2 when a file
is missing (the message shows the expected layout).

This module builds the parser without importing torch (``avatarkit --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..local_engine.musetalk.weights import WeightsReport

__all__ = ["add_parser", "format_report", "run"]

_EXIT_OK = 0
_EXIT_FAILED = 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    weights = sub.add_parser("weights", help="check a MuseTalk weights folder",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    weights.set_defaults(run=run)
    actions = weights.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="check every file of a weights folder against "
                               "the networks (keys, shapes, dtypes) without loading them")
    check.add_argument("dir", type=Path, metavar="DIR",
                       help="MuseTalk's models/ folder")
    check.add_argument("--version", default="auto", choices=("auto", "v1.0", "v1.5"),
                       help="which UNet to check (default auto: v1.5 when present)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``avatarkit weights ACTION``. A missing file raises ``WeightsError`` (the caller
    prints it and exits 2)."""
    if args.action != "check":
        raise AssertionError(f"unhandled weights action {args.action}")
    from ..local_engine.musetalk.weights import check_weights

    report = check_weights(args.dir, version=args.version)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    return _EXIT_OK if report.ok else _EXIT_FAILED


def format_report(report: WeightsReport) -> str:
    """The report as a table: component, file (relative to the folder), tensors, parameters
    in millions, dtype, OK or the problem; then a summary line."""
    root = report.layout.root
    header = ("component", "file", "tensors", "params (M)", "dtype", "status")
    rows = [header]
    for component in report.components:
        try:
            name = str(component.file.relative_to(root))
        except ValueError:
            name = str(component.file)
        status = "OK" if component.error is None else f"FAILED: {component.error}"
        rows.append((component.component, name, str(component.tensors),
                     f"{component.parameters / 1e6:.2f}", component.dtype or "-", status))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    numeric = {2, 3}
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                 for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]))
    failed = sum(1 for component in report.components if not component.ok)
    total = len(report.components)
    if failed:
        lines.append(f"{failed} of {total} components failed ({report.layout.version} weights "
                     f"in {root})")
    else:
        lines.append(f"all {total} components OK ({report.layout.version} weights in {root})")
    return "\n".join(lines)
