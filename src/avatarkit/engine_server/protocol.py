"""The self-hosted engine server's wire protocol (``avatarkit serve``), shared by the server
(:mod:`avatarkit.engine_server.server`) and its client, the ``local`` provider's remote mode.

HTTP, JSON bodies, ``Authorization: Bearer <api key>`` on every ``/v1`` route when the server
has a key (always when it is bound to anything but loopback):

=========================================  ===================================================
``GET  /health``                           :class:`Health` (no key needed)
``GET  /metrics``                          Prometheus text: sessions, fps, first-frame latency
``POST /v1/sessions``                      :class:`CreateSession` -> 201 :class:`SessionInfo`;
                                           the server verifies the consent token itself
``GET  /v1/sessions[?idempotency_key=K]``  ``{"sessions": [SessionInfo...]}`` (open ones)
``GET  /v1/sessions/{id}``                 :class:`SessionInfo` (410 with the end reason once
                                           ended)
``DELETE /v1/sessions/{id}``               :class:`SessionEnded` (200 again for one already
                                           ended; 404 only for an id never seen)
``GET  /v1/sessions/{id}/audio``           WebSocket: :data:`ClientMessage` text frames and
                                           binary PCM16LE mono audio at the session's
                                           ``sample_rate``; :data:`ServerMessage` back
``POST /whep/{id}``                        WHEP (RFC 9725), ``Bearer <viewer_token>`` or the key
``GET  /viewer/{id}``                      the browser viewer page
=========================================  ===================================================

Audio binary frames belong to the current utterance: the one named by the last
:class:`Speak`, or a new one the server names when none is open. Every message the server
sends is JSON text with a ``type``.

Error bodies and ``error`` messages quote client input only through :func:`quoted` (at most
``MAX_QUOTED`` characters, escaped) and describe validation failures with
:func:`validation_problem`, so a client cannot make the server echo megabytes or control
characters back (into its own logs, or another client's terminal).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError

from ..disclosure.metadata import DisclosureMetadata

__all__ = [
    "API_PREFIX",
    "MAX_QUOTED",
    "ClearBuffer",
    "Cleared",
    "ClientMessage",
    "CreateSession",
    "EndUtterance",
    "ErrorMessage",
    "Health",
    "PlaybackFinishedMessage",
    "PlaybackStartedMessage",
    "ServerMessage",
    "SessionEnded",
    "SessionEndedMessage",
    "SessionInfo",
    "Speak",
    "client_message",
    "quoted",
    "server_message",
    "validation_problem",
]

API_PREFIX = "/v1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateSession(_Model):
    """``POST /v1/sessions``: start rendering ``avatar`` for ``purpose`` under a consent token."""

    avatar: str = Field(min_length=1, max_length=200,
                        description="The avatar's name at the server.")
    consent_token: SecretStr = Field(description="Verified by the server itself.")
    purpose: str = Field(min_length=1, max_length=200)
    disclosure: DisclosureMetadata = Field(
        description="The client's disclosure record; its generation_id is watermarked into "
        "every frame.")
    idempotency_key: str | None = Field(default=None, max_length=200, description="A retried "
                                        "create with the same key returns the same session.")
    max_duration_s: float | None = Field(default=None, gt=0)
    sample_rate: int = Field(default=16_000, description="The PCM16 mono rate of the audio the "
                             "client sends over the audio WebSocket; one of "
                             "avatarkit.media.SUPPORTED_SAMPLE_RATES.")


class SessionInfo(_Model):
    """A session at the server and where its media is."""

    session_id: str
    avatar: str
    engine: str
    width: int
    height: int
    fps: float
    sample_rate: int
    audio_url: str = Field(description="The audio WebSocket (path or absolute URL).")
    whep_url: str = Field(description="The WHEP endpoint of the session's media.")
    viewer_url: str = Field(description="The browser viewer page; when the server has a key "
                            "it carries ?token=<viewer_token>, so it opens as it is.")
    viewer_token: str | None = Field(default=None, description="A bearer credential for the "
                                     "WHEP endpoint and viewer only; None when the server has "
                                     "no key.")
    idempotency_key: str | None = None
    region: str | None = None
    created_at: datetime
    consent_id: str


class SessionEnded(_Model):
    """``DELETE /v1/sessions/{id}``: the session is over (``duration_s`` it ran)."""

    session_id: str
    ended: Literal[True] = True
    reason: str
    duration_s: float


class Health(_Model):
    status: Literal["ok"] = "ok"
    engine: str
    sessions: int
    max_sessions: int
    version: str


# -- audio WebSocket messages -----------------------------------------------------------------


class Speak(_Model):
    """Binary audio after this belongs to ``utterance_id`` (a new id ends the open one)."""

    type: Literal["speak"] = "speak"
    utterance_id: str = Field(min_length=1, max_length=200)


class EndUtterance(_Model):
    """The open utterance is complete: play what is buffered, then report it finished."""

    type: Literal["end_utterance"] = "end_utterance"


class ClearBuffer(_Model):
    """Interrupt: drop queued audio; answered with :class:`Cleared`."""

    type: Literal["clear_buffer"] = "clear_buffer"


ClientMessage = Annotated[Speak | EndUtterance | ClearBuffer, Field(discriminator="type")]


class PlaybackStartedMessage(_Model):
    type: Literal["playback_started"] = "playback_started"
    utterance_id: str
    latency_s: float = Field(description="From the utterance's first audio to its first frame.")


class PlaybackFinishedMessage(_Model):
    type: Literal["playback_finished"] = "playback_finished"
    utterance_id: str
    position_s: float
    interrupted: bool


class Cleared(_Model):
    """The answer to :class:`ClearBuffer` (after any ``playback_finished`` it caused)."""

    type: Literal["cleared"] = "cleared"
    position_s: float


class SessionEndedMessage(_Model):
    type: Literal["session_ended"] = "session_ended"
    reason: str
    recoverable: bool = Field(description="False when the server ended it on purpose (max "
                              "duration, consent revoked, DELETE, idle); True when it failed "
                              "or the server shut down (another server may take over).")


class ErrorMessage(_Model):
    """A message the server could not act on; the connection stays open."""

    type: Literal["error"] = "error"
    message: str


ServerMessage = Annotated[
    PlaybackStartedMessage | PlaybackFinishedMessage | Cleared | SessionEndedMessage
    | ErrorMessage, Field(discriminator="type")]

_CLIENT: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_SERVER: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


#: the most characters of a client's input an error message quotes
MAX_QUOTED = 64


def quoted(value: object, limit: int = MAX_QUOTED) -> str:
    """``repr`` of a client's string cut to ``limit`` characters (``...`` marks the cut);
    ``repr`` escapes control characters and quotes, so the result is one printable line."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def validation_problem(exc: ValidationError) -> tuple[str, str]:
    """``(where, what)`` of the first problem pydantic found in a client's input, quoting
    no more of that input than :func:`quoted` does: ``where`` is the dotted location (``""``
    for the whole body, each part of it quoted when it is long), ``what`` pydantic's
    message, with a discriminator's tag replaced by the tags it expected."""
    err = exc.errors(include_input=False, include_url=False)[0]
    parts = [str(p) if len(str(p)) <= MAX_QUOTED and str(p).isprintable() else quoted(p)
             for p in err["loc"]]
    ctx = err.get("ctx") or {}
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        what = f"{ctx.get('discriminator', 'type')} must be one of {ctx.get('expected_tags')}"
    else:
        what = err["msg"]
    if len(what) > 4 * MAX_QUOTED:
        what = what[:4 * MAX_QUOTED] + "..."
    return ".".join(parts), what


def client_message(text: str | bytes) -> ClientMessage:
    """Parse a client's text frame (raises pydantic's ``ValidationError``)."""
    return _CLIENT.validate_json(text)


def server_message(text: str | bytes) -> ServerMessage:
    """Parse a server's text frame (raises pydantic's ``ValidationError``)."""
    return _SERVER.validate_json(text)
