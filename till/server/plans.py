"""Tenant plans: how many live keys a tenant may hold and how many activations per month."""

from __future__ import annotations

from typing import Final, NamedTuple


class Plan(NamedTuple):
    name: str
    max_keys: int
    max_activations_per_month: int


PLANS: Final[dict[str, Plan]] = {
    p.name: p
    for p in (
        Plan("free", max_keys=10, max_activations_per_month=1_000),
        Plan("pro", max_keys=1_000, max_activations_per_month=1_000_000),
        Plan("enterprise", max_keys=100_000, max_activations_per_month=100_000_000),
    )
}

# Self-hosted operators create tenants for their own teams: a free-plan ceiling of 1,000
# activations a month would surprise them, so the CLI starts tenants on "pro".
DEFAULT_PLAN: Final = "pro"
