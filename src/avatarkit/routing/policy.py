"""``RoutingPolicy``: what a platform team writes under ``[policies.NAME]``.

A policy is hard constraints (which providers may serve at all) plus an objective (how to
order the rest). Unknown is never a pass: a provider whose region, price or first-frame
latency is unknown is excluded by any constraint on that value, never read as "anywhere",
0 or "fast" (LiteLLM prices unknown models at $1 and lets region tags fail open; we do not).

    [policies.eu-strict]
    residency = ["eu", "self-hosted"]     # every region the provider renders in must be listed
    max_price_per_minute = "0.40"
    require = ["interrupt"]
    objective = "weighted"
    weights = { latency = 1.0, price = 2.0 }
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..metering.budget import BudgetCap

__all__ = ["Capability", "Metric", "ObjectiveWeights", "RoutingPolicy"]

#: capability names a policy can require (fields of ``Capabilities`` that are booleans)
Capability = Literal["audio_input", "text_input", "interrupt", "playback_events",
                     "frames_in_process"]
Metric = Literal["latency", "price"]


class ObjectiveWeights(BaseModel):
    """Weights of the normalised metrics in a weighted objective (higher = matters more)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency: float = Field(default=1.0, ge=0)
    price: float = Field(default=1.0, ge=0)


class RoutingPolicy(BaseModel):
    """Hard constraints and an objective for choosing a provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(default=1, ge=1, description="Recorded in every RouteDecision.")
    description: str | None = None

    # -- hard constraints --------------------------------------------------------------------
    residency: list[str] | None = Field(
        default=None, min_length=1, description="Allowed region labels ('eu', 'us', "
        "'self-hosted'...): every region a provider renders in must be listed; a provider "
        "with unknown regions is excluded.")
    self_hosted_only: bool = False
    max_price_per_minute: Decimal | None = Field(
        default=None, ge=0, description="Unknown prices are excluded.")
    max_first_frame_latency_ms: float | None = Field(
        default=None, gt=0, description="Observed (EWMA) when measured, else declared; "
        "unknown latency is excluded.")
    require: list[Capability] = Field(default_factory=list)
    providers_allowed: list[str] | None = Field(default=None, min_length=1)
    providers_denied: list[str] = Field(default_factory=list)

    # -- objective -----------------------------------------------------------------------------
    objective: Literal["weighted", "lexicographic", "config-order"] = "weighted"
    weights: ObjectiveWeights = Field(default_factory=ObjectiveWeights)
    order: list[Metric] = Field(
        default_factory=lambda: list[Metric](["price", "latency"]),
        description="Metric order for the lexicographic objective.")

    # -- behaviour -----------------------------------------------------------------------------
    fallback: bool = Field(default=True, description="Try the next candidate if start fails.")
    failover: bool = Field(default=True, description="Switch provider if a live session dies.")
    budget: BudgetCap | None = Field(
        default=None, description="Per-session cap for sessions under this policy (with "
        "[budgets.session], the tighter one binds).")

    @model_validator(mode="after")
    def _coherent(self) -> RoutingPolicy:
        clash = set(self.providers_allowed or ()) & set(self.providers_denied)
        if clash:
            raise ValueError(f"providers both allowed and denied: {sorted(clash)}")
        if self.objective == "lexicographic" and (
                not self.order or len(set(self.order)) != len(self.order)):
            raise ValueError("order must list distinct metrics for a lexicographic objective")
        if self.objective == "weighted" and self.weights.latency == self.weights.price == 0:
            raise ValueError("weights are all zero: use objective = 'config-order' instead")
        return self
