"""Mixture-of-experts blocks: top-k router (fp32), stacked experts (grouped GEMM), router losses."""

from mirotrain.modules.moe.experts import BACKENDS, GroupedExperts, copy_rows_into
from mirotrain.modules.moe.losses import expert_load, router_losses
from mirotrain.modules.moe.moe import MoE, local_dispatch
from mirotrain.modules.moe.router import RouterStats, TopKRouter

__all__ = ["BACKENDS", "GroupedExperts", "MoE", "RouterStats", "TopKRouter", "copy_rows_into", "expert_load",
           "local_dispatch", "router_losses"]
