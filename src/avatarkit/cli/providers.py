"""``avatarkit providers``: the provider support matrix, as Markdown."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    providers = sub.add_parser("providers", help="the provider support matrix (Markdown)")
    providers.set_defaults(run=run)
    providers.add_argument("--config", help="show the providers of this config file (prices "
                           "and regions as configured) instead of the built-in defaults")


def run(args: argparse.Namespace) -> int:
    from ..config import KitConfig
    from ..providers.matrix import support_matrix

    configured = KitConfig.from_toml(args.config).providers if args.config else None
    print(support_matrix(configured), end="")
    return 0
