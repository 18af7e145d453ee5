"""Sessions: one talking-avatar session, whichever provider renders it.

Modules, each one concern:

- ``avatar_session``: :class:`AvatarSession`, its state machine and public methods (speaking,
  interrupting, events, video, closing);
- ``attempts``: one vendor attempt (ledger row -> create -> open, or settled) and its end;
- ``failover``: switching bookkeeping and the replay of unplayed audio;
- ``metering``: billed time and cost, usage events and budget caps;
- ``settling``: creates and starts whose outcome is unknown, settled in the background;
- ``utterances``: what was sent and played, and the audio kept for a replay;
- ``services``: :class:`SessionServices`, what the kit gives a session.
"""

from .avatar_session import AvatarSession, SessionState
from .services import SessionServices

__all__ = ["AvatarSession", "SessionServices", "SessionState"]
