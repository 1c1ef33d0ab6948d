"""``_component_`` names -> the objects they build.

MiroTrain configs name torchtune classes (``torchtune.training.FullModelHFCheckpointer``) and MiroTrain's
own builders (``mirotrain.models.qwen3.qwen3_8b_instruct``). Both resolve here, lazily, to our
implementations, so a user's existing YAML works unchanged and nothing imports torchtune.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

_QWEN3_SIZES = ["0_6b", "1_7b", "4b", "8b", "14b"]

# name -> "module:attribute". Names under our own packages resolve directly; this table holds aliases.
ALIASES: dict[str, str] = {
    # optimizers / schedules
    "torch.optim.AdamW": "torch.optim:AdamW",
    "torch.optim.Adam": "torch.optim:Adam",
    "torch.optim.SGD": "torch.optim:SGD",
    "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup": "mirotrain.training.lr_schedule:get_cosine_schedule_with_warmup",
    "mirotrain.training.get_cosine_schedule_with_warmup": "mirotrain.training.lr_schedule:get_cosine_schedule_with_warmup",
    # losses
    "torchtune.modules.loss.LinearCrossEntropyLoss": "mirotrain.modules.loss:LinearCrossEntropyLoss",
    "torchtune.modules.loss.CEWithChunkedOutputLoss": "mirotrain.modules.loss:LinearCrossEntropyLoss",
    "mirotrain.modules.loss.LinearCrossEntropyLoss": "mirotrain.modules.loss:LinearCrossEntropyLoss",
    "mirotrain.modules.loss.LigerLinearCrossEntropyLoss": "mirotrain.modules.loss:LigerLinearCrossEntropyLoss",
    "mirotrain.modules.loss.DPOLoss": "mirotrain.modules.loss.dpo:DPOLoss",
    "torchtune.rlhf.loss.DPOLoss": "mirotrain.modules.loss.dpo:DPOLoss",
    # checkpointing / logging
    "torchtune.training.FullModelHFCheckpointer": "mirotrain.checkpoint.hf_checkpointer:FullModelHFCheckpointer",
    "mirotrain.training.FullModelHFCheckpointer": "mirotrain.checkpoint.hf_checkpointer:FullModelHFCheckpointer",
    "torchtune.training.metric_logging.DiskLogger": "mirotrain.training.metric_logging:DiskLogger",
    "torchtune.training.metric_logging.StdoutLogger": "mirotrain.training.metric_logging:StdoutLogger",
    "torchtune.training.metric_logging.TensorBoardLogger": "mirotrain.training.metric_logging:TensorBoardLogger",
    "torchtune.training.metric_logging.WandBLogger": "mirotrain.training.metric_logging:WandBLogger",
    # profiler (the ``profiler`` section; its default component, see DEFAULT_COMPONENTS)
    "torchtune.training.setup_torch_profiler": "mirotrain.training.torch_profiler:setup_torch_profiler",
    "mirotrain.training.setup_torch_profiler": "mirotrain.training.torch_profiler:setup_torch_profiler",
    # tokenizer
    "mirotrain.models.qwen3.qwen3_tokenizer_auto": "mirotrain.models.qwen3.tokenizer:qwen3_tokenizer_auto",
    # datasets
    "mirotrain.datasets.odr_chat_dataset": "mirotrain.data.datasets:odr_chat_dataset",
    "torchtune.datasets.chat_dataset": "mirotrain.data.datasets:chat_dataset",
    "mirotrain.datasets.chat_dataset": "mirotrain.data.datasets:chat_dataset",
    "mirotrain.datasets.alpaca_dataset": "mirotrain.data.datasets:alpaca_dataset",
    "torchtune.datasets.alpaca_dataset": "mirotrain.data.datasets:alpaca_dataset",
    "torchtune.datasets.alpaca_cleaned_dataset": "mirotrain.data.datasets:alpaca_cleaned_dataset",
    "torchtune.datasets.instruct_dataset": "mirotrain.data.datasets:alpaca_dataset",
    "torchtune.datasets.preference_dataset": "mirotrain.data.datasets:preference_dataset",
    "mirotrain.datasets.preference_dataset": "mirotrain.data.datasets:preference_dataset",
    # collate (accepted for compatibility; the engine picks its collate from the data mode)
    "torchtune.data.padded_collate_sft": "mirotrain.data.collate:padded_collate_sft",
    "torchtune.data.padded_collate_packed": "mirotrain.data.collate:collate_packed",
    "mirotrain.data.padded_collate_packed": "mirotrain.data.collate:collate_packed",
    "torchtune.data.padded_collate_dpo": "mirotrain.data.collate:padded_collate_dpo",
}

# sections whose ``_component_`` may be left out: this one is meant
DEFAULT_COMPONENTS: dict[str, str] = {"profiler": "torchtune.training.setup_torch_profiler"}

for _size in _QWEN3_SIZES:
    for _kind in ("base", "instruct"):
        for _suffix in ("", "_yarn"):
            _name = f"qwen3_{_size}_{_kind}{_suffix}"
            ALIASES[f"mirotrain.models.qwen3.{_name}"] = f"mirotrain.models.qwen3.builders:{_name}"
for _name in ("qwen3_32b", "qwen3_32b_yarn"):
    ALIASES[f"mirotrain.models.qwen3.{_name}"] = f"mirotrain.models.qwen3.builders:{_name}"
ALIASES["mirotrain.models.qwen3.qwen3"] = "mirotrain.models.qwen3.builders:qwen3"
for _name in ("qwen3_30b_a3b", "qwen3_235b_a22b", "qwen3_moe"):
    ALIASES[f"mirotrain.models.qwen3_moe.{_name}"] = f"mirotrain.models.qwen3_moe.builders:{_name}"


def known_components() -> list[str]:
    return sorted(ALIASES)


def resolve_component(name: str) -> Callable[..., Any]:
    """Return the callable a ``_component_`` name stands for, or raise with the closest names."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"_component_ must be a non-empty string, got {name!r}")
    target = ALIASES.get(name)
    if target is None:
        hint = difflib.get_close_matches(name, ALIASES, n=3, cutoff=0.6)
        suggestion = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise ValueError(f"unknown _component_ {name!r}{suggestion}")
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def instantiate(node: dict, *args: Any, **kwargs: Any) -> Any:
    """Build ``node['_component_']`` with the node's other keys as keyword arguments (kwargs win)."""
    if not isinstance(node, dict) or "_component_" not in node:
        raise ValueError(f"cannot instantiate {node!r}: it has no _component_ key")
    params = {k: v for k, v in node.items() if k != "_component_"}
    params.update(kwargs)
    return resolve_component(node["_component_"])(*args, **params)
