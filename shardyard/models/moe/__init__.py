"""Mixture-of-Experts: routers, grouped experts, token permutation and the MoE layer."""

from shardyard.models.moe.layer import MoELayer
from shardyard.models.moe.router import ROUTERS, Routing, build_router

__all__ = ["MoELayer", "ROUTERS", "Routing", "build_router"]
