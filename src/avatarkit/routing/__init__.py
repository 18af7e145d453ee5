"""Choosing a provider for a session: policies (``policy.py``) and the router with its
decision record (``router.py``). Import from those modules; this package imports nothing so
that the config can use the policy model without pulling in the router."""
