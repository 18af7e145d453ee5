"""``avatarkit consent ...``: issuer keys, consent tokens and status lists, from files.

    avatarkit consent keygen --out KEY.json [--jwks JWKS.json] [--force]
    avatarkit consent issue --key KEY.json --grant GRANT.json --audience AUD
                            [--single-use] [--expires-at ISO]
    avatarkit consent verify --jwks JWKS.json --issuer ISS --audience AUD
                             (several issuers: --jwks ISS=JWKS.json for each)
                             [--status-list FILE_OR_DIR ... | --no-status]
                             [--avatar A --purpose P --channel C --modality M ...
                              --language L --provider X --region R --vendor-id V] TOKEN|-
    avatarkit consent init-list --list LIST.json --uri URI [--size N] [--bits B]
    avatarkit consent revoke|suspend|reinstate --list LIST.json --idx N
    avatarkit consent status --list LIST.json [--idx N]
    avatarkit consent publish --list LIST.json --key KEY.json --out LIST.jwt [--ttl S]
                              [--issuer ISS]

The status-list state file is JSON ``{uri, bits, size, lst}``: the registry's working copy,
published as a signed ``statuslist+jwt`` with ``publish``. ``issue`` prints only the token on
stdout, so it can be piped; ``verify`` prints the verified consent as JSON (never the token)
and exits 3 on a refusal, with ``refused: <check>: <message>`` on stderr. Other errors (bad
files, bad arguments) exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from ..consent.grant import ConsentGrant
from ..consent.keys import IssuerKey, KeySet, TrustedIssuers
from ..consent.status import (
    FileStatusListSource,
    HttpStatusListSource,
    StatusChecker,
    StatusList,
    StatusListSource,
    TokenStatus,
    issue_status_list_token,
)
from ..consent.tokens import ConsentRequest, ConsentVerifier, issue_consent_token
from ..errors import AvatarKitError, ConfigError, ConsentViolation, describe_error

__all__ = ["add_parser", "run"]

#: exit status of a consent refusal (distinct from 2, usage and file errors)
_EXIT_REFUSED = 3

_SET_STATUS = {"revoke": TokenStatus.INVALID, "suspend": TokenStatus.SUSPENDED,
               "reinstate": TokenStatus.VALID}

#: what an operator calls each status value (the draft's INVALID is our "revoked")
_NAMES = {TokenStatus.VALID: "valid", TokenStatus.INVALID: "revoked",
          TokenStatus.SUSPENDED: "suspended",
          TokenStatus.APPLICATION_SPECIFIC: "application-specific"}


def _name(value: int) -> str:
    return _NAMES[TokenStatus(value)] if value in _NAMES else f"value {value}"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``consent`` and its subcommands on the main CLI's subparsers."""
    consent = sub.add_parser("consent", help="issuer keys, consent tokens, status lists",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    consent.set_defaults(run=run)
    cmds = consent.add_subparsers(dest="consent_command", required=True, metavar="ACTION")

    keygen = cmds.add_parser("keygen", help="create an Ed25519 issuer key")
    keygen.add_argument("--out", required=True, type=Path, help="private JWK file (0600)")
    keygen.add_argument("--jwks", type=Path,
                        help="public JWKS to create or add the key to (rotation keeps old kids)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing --out")

    issue = cmds.add_parser("issue", help="sign a consent token for a grant (stdout)")
    issue.add_argument("--key", required=True, type=Path)
    issue.add_argument("--grant", required=True, type=Path, help="ConsentGrant JSON")
    issue.add_argument("--audience", required=True, action="append",
                       help="deployment id the token is for (repeatable)")
    issue.add_argument("--single-use", action="store_true")
    issue.add_argument("--expires-at", help="ISO 8601 with offset; not after the grant's")

    verify = cmds.add_parser("verify", help="verify a consent token")
    verify.add_argument("token", metavar="TOKEN", help="the token, or - to read stdin")
    verify.add_argument("--jwks", required=True, action="append", metavar="[ISS=]JWKS",
                        help="the JWKS pinned for the issuer; with several issuers, "
                             "ISS=JWKS for each (a key trusted for one issuer never verifies "
                             "another's tokens)")
    verify.add_argument("--issuer", required=True, action="append",
                        help="trusted issuer (repeatable)")
    verify.add_argument("--audience", required=True, help="this deployment's id")
    status = verify.add_mutually_exclusive_group()
    status.add_argument("--status-list", action="append", type=Path, metavar="FILE_OR_DIR",
                        help="signed status list file(s), or a directory of *.jwt "
                             "(default: fetch the token's status URI over HTTP)")
    status.add_argument("--no-status", action="store_true",
                        help="do not check revocation status (explicit opt-out)")
    verify.add_argument("--avatar")
    verify.add_argument("--purpose")
    verify.add_argument("--channel", choices=("live", "recorded"), default="live")
    verify.add_argument("--modality", action="append", choices=("face_video", "voice"),
                        help="repeatable (default: face_video and voice)")
    verify.add_argument("--language")
    verify.add_argument("--provider")
    verify.add_argument("--region")
    verify.add_argument("--vendor-id")

    init = cmds.add_parser("init-list", help="create a status-list state file")
    init.add_argument("--list", required=True, type=Path, dest="list_path")
    init.add_argument("--uri", required=True, help="where the signed list will be published")
    init.add_argument("--size", type=int, default=131_072,
                      help="entries (default 131072, the group-privacy minimum)")
    init.add_argument("--bits", type=int, choices=(1, 2, 4, 8), default=2)

    for name, text in (("revoke", "mark an index revoked (final)"),
                       ("suspend", "mark an index suspended"),
                       ("reinstate", "mark a suspended index valid again")):
        change = cmds.add_parser(name, help=text)
        change.add_argument("--list", required=True, type=Path, dest="list_path")
        change.add_argument("--idx", required=True, type=int)

    show = cmds.add_parser("status", help="show an index's status, or the list's counts")
    show.add_argument("--list", required=True, type=Path, dest="list_path")
    show.add_argument("--idx", type=int)

    publish = cmds.add_parser("publish", help="sign the list as a statuslist+jwt")
    publish.add_argument("--list", required=True, type=Path, dest="list_path")
    publish.add_argument("--key", required=True, type=Path)
    publish.add_argument("--out", required=True, type=Path)
    publish.add_argument("--ttl", type=int, default=300, help="cache lifetime in seconds")
    publish.add_argument("--expires-in", type=int, default=86400,
                         help="seconds until the signed list expires")
    publish.add_argument("--issuer", help="the issuer (iss) of the tokens the list answers "
                                          "for; verifiers refuse it for another issuer")


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``consent`` command; returns the exit status."""
    try:
        command = args.consent_command
        if command == "keygen":
            return _keygen(args)
        if command == "issue":
            return _issue(args)
        if command == "verify":
            return asyncio.run(_verify(args))
        if command == "init-list":
            return _init_list(args)
        if command in _SET_STATUS:
            return _set_status(args, _SET_STATUS[command])
        if command == "status":
            return _show_status(args)
        if command == "publish":
            return _publish(args)
        raise ConfigError(f"unknown consent command {command!r}")
    except ConsentViolation as exc:
        print(f"refused: {exc.check.value}: {exc}", file=sys.stderr)
        return _EXIT_REFUSED
    except (AvatarKitError, ValueError, OSError) as exc:
        print(f"avatarkit consent: error: {describe_error(exc)}", file=sys.stderr)
        return 2


# -- keys and tokens ---------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.force:
        raise ConfigError("exists; pass --force to overwrite a signing key", field=str(out))
    key = IssuerKey.generate()
    keys = KeySet.load(args.jwks) if args.jwks is not None and args.jwks.exists() \
        else KeySet({})
    key.save(out)
    if args.jwks is not None:
        keys.with_key(key).save(args.jwks)
    print(key.kid)
    return 0


def _issue(args: argparse.Namespace) -> int:
    key = IssuerKey.load(args.key)
    try:
        grant = ConsentGrant.model_validate_json(Path(args.grant).read_bytes())
    except ValidationError as exc:
        raise ConfigError(f"not a valid consent grant: {_errors(exc)}",
                          field=str(args.grant)) from None
    expires_at = None
    if args.expires_at is not None:
        try:
            expires_at = datetime.fromisoformat(args.expires_at)
        except ValueError:
            raise ConfigError("not an ISO 8601 date-time", field="--expires-at") from None
        if expires_at.tzinfo is None:
            raise ConfigError("needs a UTC offset (e.g. 2027-01-01T00:00:00+00:00)",
                              field="--expires-at")
    audience: list[str] = args.audience
    token = issue_consent_token(grant, key, audience=audience[0] if len(audience) == 1
                                else audience, expires_at=expires_at,
                                single_use=args.single_use)
    print(token)
    return 0


def _read_token(arg: str) -> str:
    return sys.stdin.read().strip() if arg == "-" else arg.strip()


def _trusted(issuers: list[str], jwks: list[str]) -> TrustedIssuers:
    """``--issuer``/``--jwks`` as per-issuer key sets: one plain JWKS for one issuer, else an
    ``ISS=JWKS`` pair for each issuer (split at the last ``=``)."""
    if len(issuers) == 1 and len(jwks) == 1 and not jwks[0].startswith(f"{issuers[0]}="):
        return TrustedIssuers({issuers[0]: KeySet.load(jwks[0])})
    sets: dict[str, KeySet] = {}
    for pair in jwks:
        issuer, sep, path = pair.rpartition("=")
        if not sep or not issuer or not path:
            raise ConfigError("with several issuers, give each its key set as ISS=JWKS",
                              field="--jwks")
        if issuer in sets:
            raise ConfigError(f"two key sets for {issuer}", field="--jwks")
        sets[issuer] = KeySet.load(path)
    if set(sets) != set(issuers):
        raise ConfigError("needs exactly one ISS=JWKS for each --issuer", field="--jwks")
    return TrustedIssuers(sets)


async def _verify(args: argparse.Namespace) -> int:
    keys = _trusted(args.issuer, args.jwks)
    token = _read_token(args.token)
    request = _request(args)
    async with httpx.AsyncClient(timeout=10.0) as client:
        checker: StatusChecker | None = None
        if not args.no_status:
            source: StatusListSource = FileStatusListSource.discover(*args.status_list) \
                if args.status_list else HttpStatusListSource(client)
            checker = StatusChecker(keys, source)
        verifier = ConsentVerifier(keys, audience=args.audience, status=checker,
                                   require_status=not args.no_status)
        verified = await verifier.verify(token, request)
    out: dict[str, Any] = verified.model_dump(mode="json")
    out["status"] = None if verified.status is None else _name(verified.status)
    print(json.dumps(out, indent=2))
    return 0


def _request(args: argparse.Namespace) -> ConsentRequest | None:
    scoped = (args.avatar, args.purpose, args.language, args.provider, args.region,
              args.vendor_id, args.modality)
    if all(value is None for value in scoped):
        return None  # token-only verification: signature, issuer, audience, time, status
    if args.avatar is None or args.purpose is None:
        raise ConfigError("checking scope needs both --avatar and --purpose", field="--avatar")
    fields: dict[str, Any] = {"avatar": args.avatar, "purpose": args.purpose,
                              "channel": args.channel, "language": args.language,
                              "provider": args.provider, "region": args.region,
                              "vendor_id": args.vendor_id}
    if args.modality:
        fields["modalities"] = frozenset(args.modality)
    try:
        return ConsentRequest(**fields)
    except ValidationError as exc:
        raise ConfigError(_errors(exc), field="request") from None


def _errors(exc: ValidationError) -> str:
    """Pydantic's errors without the offending input values (a grant holds personal data
    such as the display name, which must not end up in terminal logs)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                     for e in exc.errors(include_input=False, include_url=False))


# -- status-list state files -------------------------------------------------------------


@dataclass
class _ListState:
    """The registry's working copy of one status list."""

    uri: str
    size: int
    entries: StatusList

    @classmethod
    def load(cls, path: Path) -> _ListState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            uri, bits, size, lst = data["uri"], data["bits"], data["size"], data["lst"]
            if not isinstance(uri, str) or not isinstance(size, int) or \
                    not isinstance(bits, int) or not isinstance(lst, str):
                raise TypeError
            entries = StatusList.decode(lst, bits=bits)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"not a status-list state file ({type(exc).__name__})",
                              field=str(path)) from None
        if not 0 < size <= len(entries):
            raise ConfigError("size does not match the list data", field=str(path))
        return cls(uri, size, entries)

    def save(self, path: Path) -> None:
        data = {"uri": self.uri, "bits": self.entries.bits, "size": self.size,
                "lst": self.entries.encode()}
        _atomic_write(path, json.dumps(data, indent=2) + "\n")

    def check_idx(self, idx: int) -> None:
        if not 0 <= idx < self.size:
            raise ConfigError(f"index {idx} is outside the list (size {self.size})",
                              field="--idx")


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` in one step: a crash mid-write must not leave a truncated list
    (which would decode as "everything valid")."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _init_list(args: argparse.Namespace) -> int:
    path: Path = args.list_path
    if path.exists():
        raise ConfigError("exists; a status list is never re-initialised (it would "
                          "un-revoke every revoked consent)", field=str(path))
    _ListState(args.uri, args.size, StatusList(args.size, bits=args.bits)).save(path)
    print(f"{path}: {args.size} entries, {args.bits} bits, uri {args.uri}")
    return 0


def _set_status(args: argparse.Namespace, value: TokenStatus) -> int:
    state = _ListState.load(args.list_path)
    state.check_idx(args.idx)
    if value > (1 << state.entries.bits) - 1:
        raise ConfigError(f"a {state.entries.bits}-bit list cannot hold {value.name}",
                          field=str(args.list_path))
    if state.entries[args.idx] == TokenStatus.INVALID and value is not TokenStatus.INVALID:
        raise ConfigError(f"index {args.idx} is revoked; revocation is final (issue a new "
                          "grant instead)", field="--idx")
    state.entries[args.idx] = int(value)
    state.save(args.list_path)
    print(f"{args.idx}: {_name(value)} (publish the list for verifiers to see it)")
    return 0


def _show_status(args: argparse.Namespace) -> int:
    state = _ListState.load(args.list_path)
    if args.idx is not None:
        state.check_idx(args.idx)
        print(f"{args.idx}: {_name(state.entries[args.idx])}")
        return 0
    counts: dict[int, int] = {}
    for i in range(state.size):
        counts[state.entries[i]] = counts.get(state.entries[i], 0) + 1
    print(json.dumps({"uri": state.uri, "bits": state.entries.bits, "size": state.size,
                      "counts": {_name(v): n for v, n in sorted(counts.items())}},
                     indent=2))
    return 0


def _publish(args: argparse.Namespace) -> int:
    state = _ListState.load(args.list_path)
    key = IssuerKey.load(args.key)
    token = issue_status_list_token(state.entries, key, uri=state.uri, ttl_s=args.ttl,
                                    expires_in_s=args.expires_in, issuer=args.issuer)
    _atomic_write(args.out, token + "\n")
    print(f"{args.out}: {state.uri} signed by {key.kid}")
    return 0

