"""How a viewer reaches the avatar's media: ``JoinInfo``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr

from .disclosure.metadata import DisclosureMetadata

__all__ = ["JoinInfo", "JoinKind"]

JoinKind = Literal["livekit", "daily", "webrtc", "whep", "none"]


class JoinInfo(BaseModel):
    """Where and how a viewer joins the session's media.

    ``kind`` says which client to use: a LiveKit room (``url`` + ``token``), a Daily room
    (``url``, ``token`` only for private rooms), a WHEP endpoint, raw WebRTC handled in-process
    (frames reach :meth:`AvatarSession.video`), or ``"none"``. ``token`` is the *viewer's*
    credential (a secret: it shows as ``**********`` in reprs); it is never the agent's token.
    ``disclosure`` is the AI-disclosure notice the viewer's UI must show.
    """

    model_config = ConfigDict(frozen=True)

    kind: JoinKind
    url: str | None = None
    token: SecretStr | None = None
    disclosure: DisclosureMetadata
    #: ``disclosure`` as a signed JWS (``typ`` ``avk-disclosure+jwt``): a viewer app verifies
    #: it with the deployment's published keys before showing the notice
    disclosure_notice: str | None = None
