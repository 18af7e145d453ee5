"""``avatarkit serve``: the self-hosted engine server (:mod:`avatarkit.engine_server.server`).

    avatarkit serve --config avatarkit.toml [--host 127.0.0.1] [--port 8080]
                    [--engine auto|lite|musetalk] [--weights DIR]
                    [--device D] [--precision P] [--backend torch|onnx] [--batch-size N]
                    [--api-key env:VAR | --api-key-env VAR] [--max-sessions N]
                    [--region LABEL] [--cache-dir DIR] [--idle-timeout SECONDS]

The config must have a ``[consent]`` section (the server verifies every session's consent
token itself: a server that shows faces must) and the avatars it may render as
``[avatars.NAME] local = "path"`` (relative to the config file). Listening on anything but
loopback needs an API key, read from the environment (``--api-key env:VAR`` or
``--api-key-env VAR``); a literal key on the command line works but warns, since the process
list and shell history show it. Prints the URL and the engine chosen (and why), serves until
SIGINT or SIGTERM, then ends every session and exits 0; configuration errors exit 2.

This module builds the parser without importing the server (``avatarkit --help`` stays fast).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AvatarKitError, ConfigError, describe_error
from .render import add_musetalk_arguments, musetalk_options

if TYPE_CHECKING:
    from ..engine_server.server import EngineServer

__all__ = ["add_parser", "build_server", "run"]

_EXIT_OK = 0
_EXIT_ERROR = 2


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the TOML config: [consent] (required) and "
                        "[avatars.NAME] local = \"path\"")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; anything else needs "
                             "an API key)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port "
                        "(default 8080)")
    parser.add_argument("--engine", default="auto", choices=("auto", "lite", "musetalk"),
                        help="which engine renders (default auto: MuseTalk when --weights "
                             "are given and available, else lite)")
    parser.add_argument("--weights", metavar="DIR", help="MuseTalk weights directory")
    add_musetalk_arguments(parser)
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="env:VAR",
                     help="the bearer key clients must send, as env:VAR (a literal key "
                          "is accepted with a warning)")
    key.add_argument("--api-key-env", metavar="VAR",
                     help="read the bearer key from environment variable VAR")
    parser.add_argument("--max-sessions", type=int, default=4,
                        help="sessions rendered at once (default 4)")
    parser.add_argument("--region", metavar="LABEL",
                        help="the region label consent grants are checked against")
    parser.add_argument("--cache-dir", metavar="DIR", help="where prepared avatars are cached")
    parser.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="end a session with no audio connection for this long "
                             "(default 300)")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` on the main CLI's subparsers (``args.run`` is :func:`run`)."""
    serve = sub.add_parser("serve", help="serve the local engine to remote clients "
                           "(REST + audio WebSocket + WHEP)", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(serve)
    serve.set_defaults(run=run)


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_env:
        value = os.environ.get(args.api_key_env)
        if not value:
            raise ConfigError(f"environment variable {args.api_key_env} is not set or empty",
                              field="api_key")
        return value
    raw: str | None = args.api_key
    if raw is None:
        return None
    if raw.startswith("env:"):
        var = raw[4:]
        if not var:
            raise ConfigError("'env:' needs a variable name, as in env:AVATARKIT_SERVE_KEY",
                              field="api_key")
        value = os.environ.get(var)
        if not value:
            raise ConfigError(f"environment variable {var} is not set or empty",
                              field="api_key")
        return value
    print("avatarkit serve: warning: an API key on the command line is visible in the process "
          "list and shell history; use --api-key env:VAR or --api-key-env VAR",
          file=sys.stderr)
    return raw


def build_server(args: argparse.Namespace) -> EngineServer:
    """The server ``args`` describe (raises ``ConfigError``)."""
    from ..config import KitConfig
    from ..engine_server.server import EngineServer

    if not args.config:
        raise ConfigError("--config is required: the server verifies every session's consent "
                          "token, so it needs a config with a [consent] section (and the "
                          "avatars it may render, [avatars.NAME] local = \"path\")",
                          field="config")
    config = KitConfig.from_toml(args.config)
    return EngineServer(config, host=args.host, port=args.port, engine=args.engine,
                        weights=args.weights, musetalk=musetalk_options(args),
                        api_key=_api_key(args),
                        max_sessions=args.max_sessions, region=args.region,
                        cache_dir=args.cache_dir, idle_timeout_s=args.idle_timeout,
                        avatar_dir=Path(args.config).resolve().parent)


async def _serve(server: EngineServer) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        try:
            await server.start()
        except OSError as exc:
            print(f"avatarkit serve: error: cannot listen on {server.host}:{server.port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return _EXIT_ERROR
        try:
            print(f"avatarkit serve: listening on {server.url}", flush=True)
            print(f"engine     {server.choice.name}: {server.choice.reason}", flush=True)
            print(f"sessions   at most {server.max_sessions}; api key "
                  f"{'required' if server.requires_key else 'not required (loopback)'}",
                  flush=True)
            await stop.wait()
            print("avatarkit serve: stopping (ending every session)", flush=True)
        finally:
            await server.aclose()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return _EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run ``avatarkit serve`` until SIGINT/SIGTERM; 0 on a clean stop, 2 on config errors."""
    try:
        server = build_server(args)
    except AvatarKitError as exc:
        print(f"avatarkit serve: error: {describe_error(exc)}", file=sys.stderr)
        return _EXIT_ERROR
    try:
        return asyncio.run(_serve(server))
    except AvatarKitError as exc:
        print(f"avatarkit serve: error: {describe_error(exc)}", file=sys.stderr)
        return _EXIT_ERROR
    except KeyboardInterrupt:
        return 130

