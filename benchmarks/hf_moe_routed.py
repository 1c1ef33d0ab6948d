"""Runs the shared HF MoE baseline (../shared/baselines/hf_moe_single_gpu.py) unchanged, with its routers metered
and, with ``--routing balanced``, forced to balanced routing (benchmarks/moe_routing.py).

The baseline is a script that builds ``Qwen3MoeForCausalLM`` and trains at import; this wrapper wraps that
class's ``__init__`` so every model it builds gets the routing and the meter, then runs the script as
``__main__`` with its own arguments. After the baseline's JSON line it prints one more:
``{"max_over_mean_load": ...}`` (the worst layer's busiest expert over the mean, over all forwards).

Usage: python benchmarks/hf_moe_routed.py --routing balanced|random LAYERS SEQ IMPL
"""

from __future__ import annotations

import argparse
import functools
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import baseline_script  # noqa: E402
from benchmarks.moe_routing import LoadMeter, install_balanced_routing  # noqa: E402


def instrument_hf_moe(routing: str) -> list[LoadMeter]:
    """Wrap ``Qwen3MoeForCausalLM.__init__``: each model built afterwards is metered (and balanced); the
    returned list receives one meter per model."""
    from transformers import Qwen3MoeForCausalLM

    meters: list[LoadMeter] = []
    original = Qwen3MoeForCausalLM.__init__

    @functools.wraps(original)
    def init(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        meters.append(LoadMeter(self, config.num_experts, config.num_experts_per_tok))
        if routing == "balanced":
            install_balanced_routing(self, config.num_experts, config.num_experts_per_tok)

    Qwen3MoeForCausalLM.__init__ = init
    return meters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routing", choices=("random", "balanced"), default="random")
    parser.add_argument("baseline_args", nargs=3, metavar="LAYERS SEQ IMPL")
    ns = parser.parse_args()
    meters = instrument_hf_moe(ns.routing)
    script = baseline_script("hf_moe_single_gpu.py")
    sys.argv = [str(script), *ns.baseline_args]
    runpy.run_path(str(script), run_name="__main__")
    if len(meters) != 1:
        raise RuntimeError(f"the baseline built {len(meters)} Qwen3MoeForCausalLM models, expected 1")
    print(json.dumps(dict(routing=ns.routing, max_over_mean_load=round(meters[0].max_over_mean(), 3))), flush=True)


if __name__ == "__main__":
    main()
