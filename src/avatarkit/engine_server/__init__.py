"""The self-hosted engine server (``avatarkit serve``) and its wire protocol.

- ``protocol``: the REST + WebSocket messages (pydantic models) clients and server share;
- ``server``: :class:`~avatarkit.engine_server.server.EngineServer`, the aiohttp application;
- ``audio``: a served session and its audio WebSocket;
- ``metrics``: Prometheus counters; ``responses``: auth checks and JSON bodies.

Nothing is imported here, so that clients (``avatarkit.providers.local``) load only the
protocol.
"""
