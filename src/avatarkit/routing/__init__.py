"""Choosing a provider for a session: candidates, exclusions, the decision record."""

from .router import RouteCandidate, RouteDecision, Router

__all__ = ["RouteCandidate", "RouteDecision", "Router"]
