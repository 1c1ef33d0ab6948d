"""The config's sections: one frozen dataclass per section, each field a key with its type, range, default
and meaning.

A config file is written in MiroTrain's flat form (``batch_size: 1``, ``optimizer: {...}``); each top-level key
belongs to exactly one section here, under the same name (component nodes, such as ``model:``, under the
section's ``component`` field). :mod:`mirotrain.config.tree` turns a resolved file into the tree of sections
once; everything downstream reads typed attributes (``cfg.optim.gradient_accumulation_steps``), so a key that
is not written holds its default here and nowhere else.

Each section owns the rules that relate its own keys (``check``), and its docstring lists its keys (generated
from the fields, so it never drifts). Keys we accept only for compatibility say what happens to them
(``note`` / ``only``). ``KEYS`` (flat name -> spec) and ``SECTION_KEYS`` (keys the engine itself reads inside a
component section) are derived from the sections for the generic checks of :mod:`mirotrain.config.validation`.

Over ~400 lines because it is the whole key table: splitting it by section would scatter the one place a user
reads to learn what a key means.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, TypeVar

from mirotrain.config.loader import ConfigError

NUMBER = (int, float)
SECTION = (dict,)
OPTIONAL_INT = (int, type(None))
# sources the dataset builders read themselves; any other source is a Hub dataset read with datasets.load_dataset
LOCAL_FORMATS = ("json", "jsonl", "parquet")
# master_weights modes (mirotrain/optim/precision.py: MODES) and the AdamW keys the bf16 mode's optimizer takes
MASTER_WEIGHTS = ("fp32", "bf16", "bf16_plain")
COMPENSATED_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
# fp8_recipe_name's values: torchao's float8 recipe names (mirotrain/parallel/float8.py applies them)
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
LOG_LEVELS = tuple(level for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for level in (name, name.lower()))


@dataclass(frozen=True)
class Key:
    """What one key accepts: types, default, meaning, and optional range or allowed values."""

    types: tuple[type, ...]
    default: Any = None
    doc: str = ""
    # Value that is accepted; any other value raises "not supported" (for keys kept for compatibility).
    only: tuple[Any, ...] | None = None
    note: str = ""
    # Inclusive bounds for numbers (None: unbounded); ``low_open`` makes the lower bound exclusive (> low).
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    # Allowed values; any other value is an error listing them.
    choices: tuple[Any, ...] | None = None


def key(types: tuple[type, ...], default: Any = None, doc: str = "", *, flat: str | None = None, **spec: Any) -> Any:
    """A section field declaring one config key; ``flat`` is its name in the file when the field's differs."""
    metadata = {"key": Key(types, default, doc, **spec), "flat": flat}
    return field(default=default, metadata=metadata)


S = TypeVar("S")


def section(cls: type[S]) -> type[S]:
    """Freeze the section and append the list of its keys, from the fields, to its docstring."""
    cls = dataclass(frozen=True)(cls)
    lines = [f"    {flat_name(f)}: {f.metadata['key'].doc}" for f in dataclasses.fields(cls) if "key" in f.metadata]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Keys:\n" + "\n".join(lines) + "\n"
    return cls


def flat_name(f: dataclasses.Field) -> str:
    """The key's name in a config file."""
    return f.metadata.get("flat") or f.name


def key_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "key" in f.metadata]


# ------------------------------------------------------------------------------------------------ sections


@section
class RunConfig:
    """Where the run writes and what it computes in."""

    output_dir: str | None = key((str,), None, "Where checkpoints, HF exports, metrics and logs go (required).")
    device: str = key((str,), "cuda", "cuda | cpu (cpu runs in fp32, for tests and the demo).", choices=("cuda", "cpu"))
    dtype: str = key((str,), "bf16", "Compute dtype: bf16 | fp32 (fp16 is rejected). What the weights and "
                     "optimizer state are kept in: master_weights.", only=("bf16", "fp32"))
    master_weights: str = key((str,), "fp32", "What the sharded state is kept in between steps: fp32 (fp32 master "
                              "weights, gradients and AdamW moments: 16 bytes/param) | bf16 (bf16 weights, gradients "
                              "and AdamW moments plus a bf16 compensation that keeps small updates: 10) | bf16_plain "
                              "(bf16, updates rounded to nearest as MiroTrain did: 8). bf16 modes need dtype: bf16.",
                              choices=MASTER_WEIGHTS)
    optimizer_state_offload: bool = key((bool,), False, "master_weights: bf16 only: keep the AdamW moments and "
                                        "compensation (6 of its 10 bytes/param) in pinned host memory and stream them "
                                        "through the GPU chunk by chunk at each optimizer step; the weights and "
                                        "gradients (4 bytes/param) stay on the GPU. Bitwise equal to keeping them on "
                                        "the GPU; costs the copies of 6 bytes/param each way per step. Excludes "
                                        "fsdp_cpu_offload.")
    seed: int | None = key((int, type(None)), None, "Random seed; null draws one, logs it and stores it for resume.", low=0)
    cudnn_deterministic_mode: bool = key((bool,), False, "Deterministic mode: the same config, seed, world size and "
                                         "hardware give bitwise-equal losses and weights, also across a kill and "
                                         "auto-resume. Deterministic algorithms (an op without one raises), cuBLAS "
                                         "workspace, cuDNN, Inductor and NCCL pinned, flash instead of cuDNN "
                                         "attention, the loss uncompiled (mirotrain/training/determinism.py); "
                                         "slower steps (docs/training.md, 'Deterministic mode').")

    def check(self, fsdp_cpu_offload: bool) -> list[ConfigError]:
        """The bf16 modes compute in bf16; ``optimizer_state_offload`` moves the compensated AdamW's state, which
        only ``master_weights: bf16`` has, and ``fsdp_cpu_offload`` already keeps all state on the host."""
        errors = []
        if self.master_weights != "fp32" and self.dtype != "bf16":
            errors.append(ConfigError("master_weights", f"{self.master_weights} keeps bf16 weights and needs dtype: "
                                      f"bf16, got dtype: {self.dtype}"))
        if self.optimizer_state_offload and self.master_weights != "bf16":
            errors.append(ConfigError("optimizer_state_offload", "moves the moments and compensation of the "
                                      "compensated AdamW (master_weights: bf16) to host memory; got master_weights: "
                                      f"{self.master_weights}"))
        if self.optimizer_state_offload and fsdp_cpu_offload:
            errors.append(ConfigError("optimizer_state_offload", "excludes fsdp_cpu_offload, which keeps the whole "
                                      "sharded state (weights, gradients and optimizer) in host memory already"))
        return errors


# ``compile`` as a mapping: which parts to compile (optimizer_step: the compensated AdamW of ``master_weights:
# bf16``, mirotrain/optim/bf16_adamw.py; MiroTrain's configs also name scale_grads, which the engine accepts and
# leaves uncompiled).
COMPILE_PARTS = frozenset({"model", "loss", "optimizer_step", "scale_grads"})


@section
class ModelConfig:
    """The model builder, its loss and how its layers are computed (recompute, offload, compile, attention)."""

    component: dict | None = key(SECTION, None, "Model builder component (mirotrain.models.qwen3.*, "
                                 "mirotrain.models.qwen3_moe.*).", flat="model")
    loss: dict | None = key(SECTION + (type(None),), None, "Loss component; default LinearCrossEntropyLoss (chunked).")
    unembed_chunk_size: int | None = key(OPTIONAL_INT, None, "MiroTrain's meaning: the number of chunks a sequence's "
                                         "LM head and loss are split into (tokens per chunk = ceil(length / N), as "
                                         "torch.chunk); null: loss_chunk_tokens decides.", low=1)
    loss_chunk_tokens: int | None = key(OPTIONAL_INT, None, "Tokens per chunk of the fused LM-head cross-entropy / "
                                        "log-prob computation (null: the loss's own default); excludes "
                                        "unembed_chunk_size.", low=1)
    compile: bool | dict | None = key((bool, dict, type(None)), None, "torch.compile decoder layers, the loss and "
                                      "(master_weights: bf16) the optimizer step (default: on for CUDA); a mapping "
                                      "names the parts: model, loss, optimizer_step.")
    enable_activation_checkpointing: bool = key((bool,), True, "Recompute each decoder layer in backward.")
    ac_mode: str | None = key((str, type(None)), None, "Activation checkpointing mode: full | selective | none | "
                              "auto (per layer, by the memory estimate against the GPU: no recompute where it fits, "
                              "else a mix of no recompute, selective op, selective attention and full recompute "
                              "that recomputes least).",
                              choices=("full", "selective", "none", "auto", None))
    memory_budget_gib: int | float | None = key(NUMBER + (type(None),), None, "GiB per GPU that ac_mode: auto and "
                                                "mlp_tiles: auto plan for, when less than 90% of the GPU (null: "
                                                "90%): for GPUs shared with another process, or to match a peak.",
                                                low=0, low_open=True)
    ac_option: int | str | None = key((int, str, type(None)), None, "selective: checkpoint every N-th layer (int) or "
                                      "'op' (keep matmul outputs).")
    enable_activation_offloading: bool = key((bool,), False, "Offload checkpointed activations to CPU (CUDA).")
    mlp_tiles: int | str = key((int, str), "auto", "Run each dense MLP in this many tiles over its hidden width, "
                               "recomputed in its backward (mirotrain/modules/tiled_mlp.py): the running layer keeps "
                               "~6/tiles of the MLP's activations for one extra MLP forward per step; 1: off; auto: "
                               "the fewest of 1, 2, 4, 8, 16 that bring the memory estimate under 90% of the GPU.")
    activation_offloading_use_streams: bool = key((bool,), True, "Overlap activation offloading with compute.")
    attention_backend: str = key((str,), "auto", "auto | flash | varlen | sdpa (see mirotrain.modules.attention).",
                                 choices=("auto", "flash", "varlen", "sdpa"))
    use_flash_attention: bool = key((bool,), True, "Accepted for compatibility; see attention_backend.", note="ignored")
    enable_fp8_training: bool = key((bool,), False, "Float8 matmuls in the decoder layers' Linears (attention "
                                    "q/k/v/o, dense MLP; not the embedding, LM head, MoE router or experts) with "
                                    "torchao's float8 training (the gpu extra); CUDA with compute capability >= 8.9 "
                                    "(mirotrain/parallel/float8.py). Checkpoints and HF exports stay as without.")
    fp8_recipe_name: str | None = key((str, type(None)), None, "FP8 scaling recipe: tensorwise (null: the default; "
                                      "weights all-gathered in fp8) | rowwise | rowwise_with_gw_hp; read only with "
                                      "enable_fp8_training: True.",
                                      choices=FP8_RECIPES + (None,))
    resize_token_embeddings: bool = key((bool,), False, "Qwen3 checkpoints already cover the tokenizer vocab.",
                                        only=(False,))

    def chunk_tokens(self, seq_len: int) -> int | None:
        """Tokens per LM-head chunk for a sequence of ``seq_len`` tokens: ``loss_chunk_tokens``, else
        ``unembed_chunk_size`` chunks of ``ceil(seq_len / N)`` tokens (so N chunks, fewer only when the sequence
        has fewer than N tokens, like ``torch.chunk``), else None: the loss keeps its own default."""
        if self.loss_chunk_tokens:
            return self.loss_chunk_tokens
        if self.unembed_chunk_size:
            return max(1, -(-int(seq_len) // self.unembed_chunk_size))
        return None

    def compile_flags(self, device_type: str) -> tuple[bool, bool, bool]:
        """(compile the decoder layers, the loss kernel, the bf16 mode's optimizer step) as ``compile`` says;
        default: all on CUDA. The trainer builds by it and the memory estimate counts by it (compiled layers save
        fewer activations)."""
        value = self.compile
        if value is None:
            value = device_type == "cuda"
        if isinstance(value, dict):  # its keys are checked by ``check``
            return tuple(bool(value.get(part, False)) for part in ("model", "loss", "optimizer_step"))
        return bool(value), bool(value), bool(value)

    def planned_mlp_tiles(self) -> int | str:
        """``mlp_tiles`` as the memory plan reads it: with FP8 training the MLPs stay untiled (``auto`` is 1; a
        tiled MLP would multiply the weights past the float8 Linears, and ``check`` refuses a count > 1)."""
        return 1 if self.enable_fp8_training else self.mlp_tiles

    def keeps_matmul_outputs(self) -> bool:
        """Whether activation checkpointing is per-op selective with option ``op`` (it keeps matmul outputs for
        backward; with tiled MLPs that memory is not modelled), as ``resolve_ac`` reads the keys."""
        if not self.enable_activation_checkpointing and self.ac_mode in (None, "none"):
            return False
        return self.ac_mode == "selective" and self.ac_option in (None, "op")

    def plans_against_memory(self) -> bool:
        """Whether an ``auto`` setting is decided against a GPU's memory: ``ac_mode: auto``, or ``mlp_tiles:
        auto`` where it is not settled at 1 (FP8 keeps MLPs untiled, ``planned_mlp_tiles``; per-op selective AC
        ``op``, whose memory with tiles is not modelled). mirotrain/commands/estimate.py: ``settled_plan`` and
        ``memory_budget_gib``'s check both ask it."""
        tiles = self.planned_mlp_tiles()
        return self.ac_mode == "auto" or (tiles == "auto" and not self.keeps_matmul_outputs())

    def check(self, device: str) -> list[ConfigError]:
        errors = self._fp8_errors(device)
        if isinstance(self.compile, dict) and set(self.compile) - COMPILE_PARTS:
            errors.append(ConfigError("compile", f"unknown keys {sorted(set(self.compile) - COMPILE_PARTS)} "
                                      f"(known: {', '.join(sorted(COMPILE_PARTS))})"))
        if self.enable_activation_offloading and not self.enable_activation_checkpointing:
            errors.append(ConfigError("enable_activation_offloading", "requires enable_activation_checkpointing: True"))
        if self.mlp_tiles != "auto" and not (isinstance(self.mlp_tiles, int) and self.mlp_tiles >= 1):
            errors.append(ConfigError("mlp_tiles", f"must be a positive int or 'auto', got {self.mlp_tiles!r}"))
        elif self.mlp_tiles not in ("auto", 1) and self.keeps_matmul_outputs():
            errors.append(ConfigError("mlp_tiles", f"{self.mlp_tiles} does not go with per-op selective activation "
                                      "checkpointing (ac_option op, the selective default), whose memory with tiles "
                                      "is not modelled: use full AC, ac_option attention or no AC"))
        if self.ac_mode == "auto" and self.enable_activation_offloading:
            errors.append(ConfigError("ac_mode", "auto decides which layers keep their activations on the GPU; "
                                      "enable_activation_offloading would send them all to host memory: set one"))
        if self.ac_mode == "auto" and self.ac_option is not None:
            errors.append(ConfigError("ac_option", f"ac_mode: auto decides per layer itself; remove ac_option "
                                      f"({self.ac_option!r})"))
        if self.memory_budget_gib is not None and not self.plans_against_memory():
            errors.append(ConfigError("memory_budget_gib", "is read only where ac_mode: auto or mlp_tiles: auto has "
                                      "something to decide, and here neither has (mlp_tiles: auto stays 1 with FP8 "
                                      "training and under per-op selective AC)"))
        if self.unembed_chunk_size and self.loss_chunk_tokens:
            errors.append(ConfigError("loss_chunk_tokens", "set either loss_chunk_tokens (tokens per chunk) or "
                                      "unembed_chunk_size (number of chunks), not both"))
        return errors

    def _fp8_errors(self, device: str) -> list[ConfigError]:
        """FP8 needs a GPU (the card's compute capability is checked at start-up: mirotrain/parallel/float8.py)
        and untiled MLPs (a tiled MLP multiplies the weights itself, past the float8 Linears)."""
        if not self.enable_fp8_training:
            return []
        if device != "cuda":
            return [ConfigError("enable_fp8_training", f"needs a CUDA GPU with float8 matmuls (compute capability "
                                f">= 8.9: Ada, Hopper or newer), got device: {device}")]
        if self.mlp_tiles not in ("auto", 1):
            return [ConfigError("mlp_tiles", f"({self.mlp_tiles}) tiled MLPs would bypass enable_fp8_training's "
                                "float8 Linears: use mlp_tiles: 1 (auto stays untiled with FP8)")]
        return []


@section
class TokenizerConfig:
    """The tokenizer component. ``max_seq_len`` and ``path`` are read from its node (the tokenizer's arguments)."""

    component: dict | None = key(SECTION, None, "Tokenizer component (qwen3_tokenizer_auto).", flat="tokenizer")

    @property
    def max_seq_len(self) -> int | None:
        """Longest document in tokens; longer ones are truncated."""
        return (self.component or {}).get("max_seq_len")

    @property
    def path(self) -> str | None:
        """Directory of the tokenizer files (null: the base checkpoint's, else the bundled Qwen3 tokenizer)."""
        return (self.component or {}).get("path")


# Keys of a tokenizer node the engine knows the range of (the others are typed by the component's signature).
TOKENIZER_KEYS: dict[str, Key] = {
    "max_seq_len": Key(OPTIONAL_INT, None, "Longest document in tokens (longer ones are truncated).", low=1),
    "prompt_template": Key((type(None),), None, "Accepted for compatibility only when null (Qwen3's chat template is used)."),
    "special_tokens_path": Key((type(None),), None, "Accepted for compatibility only when null (the tokenizer's own are used)."),
}


@section
class DatasetConfig:
    """One dataset section (``dataset`` or ``dataset_val``): the builder component plus how its rows are made.

    ``node`` is the section as written (builder name and arguments included); the fields are the keys the
    engine reads itself, never passed to the builder. A section written as a list of builders (MiroTrain's
    ConcatDataset) keeps them in ``parts``: their records are concatenated, in list order, and packed together
    into one shard directory, so the engine keys apply to the whole list; a part may write them, and parts that
    write the same key must agree. ``node`` then holds those merged engine keys only.
    """

    node: dict = field(default_factory=dict)
    parts: tuple[dict, ...] = ()
    packed: bool = key((bool,), False, "Pack documents into rows of packed_seq_len tokens (Arrow shards, `mirotrain pack`).")
    streaming_pack: bool = key((bool,), False, "Pack while training, without shards; excludes packed.")
    packed_seq_len: int | None = key((int,), None, "Tokens per packed row; required when rows are packed (packed, "
                                     "streaming_pack, preference pairs) and at least tokenizer.max_seq_len.", low=2)
    output_dir: str | None = key((str, type(None)), None, "Where packed shards go (local path or fsspec URL).")
    on_bad_sample: str = key((str,), "error", "error: stop at the first unusable sample (file:line); skip: count and "
                             "skip it.", choices=("error", "skip"))
    num_workers: int | None = key(OPTIONAL_INT, None, "Tokenizer processes for `mirotrain pack` (null: all cores, at "
                                  "most 16).", low=0)
    pack_seed: int = key((int,), 0, "Seed of the packing order.")
    rows_per_shard: int | None = key(OPTIONAL_INT, None, "Packed rows per Arrow shard file.", low=1)
    shard_dir: str | None = key((str, type(None)), None, "Read this existing shard directory instead of packing.")

    @classmethod
    def from_node(cls, node: dict | list) -> "DatasetConfig":
        """The section as written: one builder node, or a list of them (concatenated)."""
        if isinstance(node, list):
            merged: dict = {}
            for part in node:
                merged.update({k: v for k, v in part.items() if k in DATASET_KEYS and k not in merged})
            return dataclasses.replace(cls.from_node(merged), parts=tuple(dict(p) for p in node))
        own = {f.name: node[f.name] for f in key_fields(cls) if node.get(f.name) is not None}
        return cls(node=dict(node), **own)

    @property
    def builders(self) -> tuple[dict, ...]:
        """The builder node of each dataset: the parts of a list, else the section itself."""
        return self.parts or (self.node,)

    def engine_options(self) -> dict:
        """The engine keys as a node (the written ones plus any changed on the tree), given to every builder."""
        out = {k: v for k, v in self.node.items() if k in DATASET_KEYS}
        for f in key_fields(DatasetConfig):
            value = getattr(self, f.name)
            if f.name in out or value != f.metadata["key"].default:
                out[f.name] = value
        return out

    def with_shard_dir(self, shard_dir: str) -> "DatasetConfig":
        """The same section reading ``shard_dir`` (the node says so too, for code that reads the node)."""
        return dataclasses.replace(self, shard_dir=shard_dir, node={**self.node, "shard_dir": shard_dir})

    def check(self, name: str, *, batch_size: Any, batch_key: str, max_seq_len: Any,
              kinds: Sequence[tuple[str | None, bool]]) -> list[ConfigError]:
        """The packing rules of this section: the one place they are decided.

        ``kinds`` holds, for each builder (``builders``), its source (its own or the builder's default) and
        whether it makes preference pairs (always packed); both come from the builder's signature.
        """
        errors = self._check_parts(name, kinds)
        preference = any(pref for _, pref in kinds)
        if self.packed is True and self.streaming_pack is True:
            errors.append(ConfigError(f"{name}.streaming_pack", f"{name}.packed and {name}.streaming_pack are "
                                      "mutually exclusive; set one of them to False"))
        for where, builder, (source, _) in zip(self._part_names(name), self.builders, kinds):
            if source in LOCAL_FORMATS and not builder.get("data_files") and not self.shard_dir:
                errors.append(ConfigError(f"{where}.data_files", f"required with source {source!r} (a path, glob, "
                                          "list or fsspec URL)"))
        if preference and self.streaming_pack is True:
            errors.append(ConfigError(f"{name}.streaming_pack", "not supported for preference data: pairs are "
                                      "packed offline (`mirotrain pack`)"))
        rows_packed = self.packed is True or self.streaming_pack is True
        if ((rows_packed or preference) and isinstance(batch_size, int) and not isinstance(batch_size, bool)
                and batch_size != 1):
            why = "a DPO row holds many pairs" if preference else "a packed row is the batch"
            data = "preference" if preference else "packed/streaming_pack"
            errors.append(ConfigError(batch_key, f"must be 1 with {data} data ({why}), got {batch_size}"))
        if (rows_packed or preference) and self.packed_seq_len is None and not self.shard_dir:  # shards carry it
            kind = "packed/streaming_pack data" if rows_packed else "preference pairs (always packed)"
            errors.append(ConfigError(f"{name}.packed_seq_len", f"required with {kind}"))
        if (isinstance(max_seq_len, int) and isinstance(self.packed_seq_len, int)
                and not isinstance(self.packed_seq_len, bool) and self.packed_seq_len < max_seq_len):
            errors.append(ConfigError(f"{name}.packed_seq_len", f"({self.packed_seq_len}) must be >= "
                                      f"tokenizer.max_seq_len ({max_seq_len})"))
        return errors

    def _part_names(self, name: str) -> list[str]:
        return [f"{name}.{i}" for i in range(len(self.parts))] if self.parts else [name]

    def _check_parts(self, name: str, kinds: Sequence[tuple[str | None, bool]]) -> list[ConfigError]:
        """A list's parts are packed together: their engine keys agree, and all or none make preference pairs."""
        errors = []
        for i, part in enumerate(self.parts):
            for k, v in part.items():
                if k in self.node and self.node[k] != v:
                    first = next(j for j, p in enumerate(self.parts) if k in p)
                    errors.append(ConfigError(f"{name}.{i}.{k}", f"({v!r}) differs from {name}.{first}.{k} "
                                              f"({self.node[k]!r}): the datasets of a list are packed together"))
        if len({pref for _, pref in kinds}) > 1:
            errors.append(ConfigError(name, "mixes preference pairs with SFT data; a dataset list concatenates "
                                      "datasets of one kind"))
        return errors


@section
class DataConfig:
    """What the loop reads: the datasets and the micro-batch and validation cadence."""

    dataset: DatasetConfig | None = key(SECTION + (list,), None, "Training dataset component (+ packed, "
                                        "packed_seq_len, streaming_pack, output_dir), or a list of them: concatenated.")
    dataset_val: DatasetConfig | None = key(SECTION + (list, type(None)), None, "Validation dataset component (or a "
                                            "list of them).")
    batch_size: int = key((int,), 1, "Rows per micro-batch per data-parallel rank (must be 1 when packed).", low=1)
    batch_size_val: int | None = key(OPTIONAL_INT, None, "Validation micro-batch size (defaults to batch_size).", low=1)
    shuffle: bool = key((bool,), True, "Shuffle rows each epoch (from the seed).")
    run_val_every_n_steps: int | None = key(OPTIONAL_INT, None, "Run validation every N optimizer steps (and at each "
                                            "epoch end).", low=1)
    collate_fn: str | None = key((str, type(None)), None, "Accepted for compatibility; the collate follows the data "
                                 "mode.", note="ignored")

    def section(self, name: str) -> DatasetConfig | None:
        """``dataset`` or ``dataset_val`` by name."""
        return {"dataset": self.dataset, "dataset_val": self.dataset_val}[name]

    def batch_size_of(self, name: str) -> int:
        return self.batch_size if name == "dataset" else (self.batch_size_val or self.batch_size)


@section
class ParallelConfig:
    """How the ranks split the work: FSDP2 over all ranks, Ulysses sequence parallelism, expert parallelism."""

    fsdp_cpu_offload: bool = key((bool,), False, "Keep sharded parameters, grads and optimizer state on CPU.")
    fsdp_reshard_after_forward: bool = key((bool,), True, "Free gathered parameters after forward (ZeRO-3) or keep "
                                           "them (ZeRO-2).")
    data_parallel_shard_dim: int = key((int,), -1, "FSDP shard degree; -1 = world / (replicate × sp-independent dims).")
    data_parallel_replicate_dim: int = key((int,), 1, "HSDP replicate degree; HSDP is not supported (FSDP shards over "
                                           "all ranks): 1.", only=(1,))
    tensor_parallel_dim: int = key((int,), 1, "Tensor parallelism is not supported (use Ulysses SP).", only=(1,))
    tensor_parallel_plan: dict | None = key(SECTION + (type(None),), None, "Tensor parallelism is not supported.",
                                            only=(None,))
    ulysses_sequence_parallel_size: int = key((int,), 1, "Ulysses sequence-parallel degree.", low=1)
    moe_expert_parallel_size: int = key((int,), 1, "Expert-parallel degree for MoE models.", low=1)
    custom_sharded_layers: list | None = key((list, type(None)), None, "Accepted for compatibility and ignored.",
                                             note="ignored")

    def check(self, world_size: int) -> list[ConfigError]:
        errors = []
        for name, degree in (("ulysses_sequence_parallel_size", self.ulysses_sequence_parallel_size),
                             ("moe_expert_parallel_size", self.moe_expert_parallel_size)):
            if world_size % degree:
                errors.append(ConfigError(name, f"({degree}) must divide the world size ({world_size})"))
        if self.data_parallel_shard_dim not in (-1, world_size):
            errors.append(ConfigError("data_parallel_shard_dim", f"({self.data_parallel_shard_dim}): FSDP shards over "
                                      f"all {world_size} ranks (data parallel × sequence parallel); set it to -1"))
        return errors


@section
class OptimConfig:
    """The optimizer, its schedule, and how many steps of how many micro-batches."""

    optimizer: dict | None = key(SECTION, None, "Optimizer component (torch.optim.AdamW; fused on CUDA).")
    lr_scheduler: dict | None = key(SECTION + (type(None),), None, "LR schedule component "
                                    "(get_cosine_schedule_with_warmup).")
    clip_grad_norm: int | float | str | None = key((int, float, str, type(None)), None, "Clip to this global L2 norm; "
                                                   "'inf' measures only; null = off.")
    gradient_accumulation_steps: int = key((int,), 1, "Micro-batches per optimizer step.", low=1)
    epochs: int = key((int,), 1, "Number of epochs.", low=1)
    max_steps_per_epoch: int | None = key(OPTIONAL_INT, None, "Cap on optimizer steps per epoch.", low=1)
    optimizer_in_bwd: bool = key((bool,), False, "Accepted for compatibility and ignored.", note="ignored")

    def check(self, master_weights: str) -> list[ConfigError]:
        """``master_weights: bf16`` runs its own AdamW (mirotrain/optim/bf16_adamw.py): the section must name
        AdamW and set only the keys that AdamW has (torch's kernel choices, fused and foreach, are moot)."""
        node = self.optimizer
        if master_weights != "bf16" or not node:
            return []
        name = str(node.get("_component_", ""))
        if not name.endswith("AdamW"):
            return [ConfigError("optimizer._component_", "master_weights: bf16 runs a compensated AdamW and needs "
                                f"torch.optim.AdamW, got {name!r}")]
        extra = sorted(set(node) - {"_component_", "params", "fused", "foreach", *COMPENSATED_ADAMW_KEYS})
        return [ConfigError(f"optimizer.{k}", "not supported with master_weights: bf16 (its AdamW takes "
                            f"{', '.join(COMPENSATED_ADAMW_KEYS)})") for k in extra if node[k] not in (None, False)]


OPTIMIZER_KEYS: dict[str, Key] = {
    "lr": Key(NUMBER, None, "Peak learning rate.", low=0, low_open=True),
    "weight_decay": Key(NUMBER, 0.0, "Decoupled weight decay.", low=0),
    "eps": Key(NUMBER, 1e-8, "Adam epsilon.", low=0, low_open=True),
}
LR_SCHEDULER_KEYS: dict[str, Key] = {
    "warmup_ratio": Key(NUMBER, 0.1, "Fraction of the optimizer steps spent warming up linearly.", low=0, high=1),
    "num_cycles": Key(NUMBER, 0.5, "Cosine cycles after warm-up (0.5: one decay to min_lr_ratio).", low=0),
    "min_lr_ratio": Key(NUMBER, 0.0, "Floor of the schedule as a fraction of the peak learning rate.", low=0, high=1),
}

PROFILER_KEYS: dict[str, Key] = {
    "enabled": Key((bool,), False, "Profile the steps of the schedule below (off: nothing is recorded)."),
    "wait_steps": Key(OPTIONAL_INT, 5, "Optimizer steps skipped before each cycle.", low=0),
    "warmup_steps": Key(OPTIONAL_INT, 3, "Steps traced but discarded (profiler warm-up) in each cycle.", low=0),
    "active_steps": Key(OPTIONAL_INT, 2, "Steps recorded in each cycle.", low=1),
    "num_cycles": Key(OPTIONAL_INT, 1, "Cycles of wait/warmup/active; 0 repeats until training ends.", low=0),
    "output_dir": Key((str, type(None)), None, "Where traces go: iteration_<step>/rank<r>_trace.json (default "
                      "{output_dir}/profiling_outputs)."),
}


@section
class CheckpointConfig:
    """Base weights, step checkpoints for auto-resume, and HF exports."""

    checkpointer: dict | None = key(SECTION, None, "Base weights (checkpoint_dir) and HF export settings.")
    auto_resume: bool = key((bool,), False, "Step checkpoints (async DCP) and automatic resume on restart.")
    resume_from_checkpoint: bool = key((bool,), False, "MiroTrain's epoch-level resume: True is read as auto_resume: "
                                       "True (resume from the newest step checkpoint), with a notice.")
    checkpoint_steps_for_auto_resume: int = key((int,), 50, "Optimizer steps between step checkpoints.", low=1)
    keep_last_n_checkpoints: int = key((int,), 2, "Complete step checkpoints to keep (the newest is never "
                                       "deleted).", low=1)
    enable_async_checkpointing: bool = key((bool,), True, "Write step checkpoints asynchronously.")
    save_hf_every_epoch: bool = key((bool,), True, "Export HF weights at each epoch end (always at the end).")

    @property
    def checkpoint_dir(self) -> str | None:
        """The base weights' directory (null: random initialisation from the seed)."""
        return (self.checkpointer or {}).get("checkpoint_dir")


@section
class DPOConfig:
    """DPO only: the reference model, how its log-probs are obtained, and how pairs fill the packed rows."""

    ref_checkpointer: dict | None = key(SECTION + (type(None),), None, "DPO: reference model weights (default: "
                                        "checkpointer).")
    reference: str = key((str,), "precompute", "DPO: precompute (cached ref log-probs) | live (frozen sharded copy).",
                         only=("precompute", "live"))
    one_pair_per_row: bool = key((bool,), False, "DPO: pack exactly one pair (its chosen and rejected) per row, so "
                                 "an optimizer step trains batch_size × gradient_accumulation_steps × data-parallel "
                                 "ranks pairs, as MiroTrain's batch_size meant (each row padded to packed_seq_len: "
                                 "slower); false: short pairs share a row (`mirotrain validate` prints how many).")


@section
class MetricsConfig:
    """What is logged and profiled, and how often."""

    log_every_n_steps: int = key((int,), 1, "Log metrics every N optimizer steps.", low=1)
    log_peak_memory_stats: bool = key((bool,), True, "Include peak GPU memory in the logs.")
    log_level: str = key((str,), "INFO", "Python logging level.", choices=LOG_LEVELS)
    metric_logger: dict | None = key(SECTION + (type(None),), None, "A metric logger component (DiskLogger, "
                                     "TensorBoardLogger, ...).")
    mfu_peak_tflops: float | None = key(NUMBER + (type(None),), None, "bf16 peak TFLOP/s per GPU for the logged MFU; "
                                        "null = from the GPU's name (H100/H200: 989).", low=0, low_open=True)
    profiler: dict | None = key(SECTION + (type(None),), None, "torch.profiler window, torchtune's "
                                "setup_torch_profiler keys (enabled, wait_steps, warmup_steps, active_steps, num_cycles, "
                                "output_dir, cpu, cuda, profile_memory, with_stack, record_shapes, with_flops).")
    enable_memory_trace: bool = key((bool,), False, "Record a CUDA memory snapshot.")
    memory_trace_start_step: int = key((int,), 5, "First step of the memory trace.", low=0)
    memory_trace_end_step: int | None = key(OPTIONAL_INT, None, "Last step of the memory trace (start + 1).", low=0)
    memory_trace_file_path: str | None = key((str, type(None)), None, "Where the memory snapshot is written.")


# section name in the tree -> its dataclass, in the order a reader meets them
SECTIONS: dict[str, type] = {
    "run": RunConfig, "model": ModelConfig, "tokenizer": TokenizerConfig, "data": DataConfig,
    "parallel": ParallelConfig, "optim": OptimConfig, "checkpoint": CheckpointConfig, "dpo": DPOConfig,
    "metrics": MetricsConfig,
}


def _flat_table() -> dict[str, tuple[str, str, Key]]:
    """Flat key -> (section, field, spec); a flat key belongs to exactly one section."""
    table: dict[str, tuple[str, str, Key]] = {}
    for name, cls in SECTIONS.items():
        for f in key_fields(cls):
            flat = flat_name(f)
            if flat in table:
                raise AssertionError(f"config key {flat!r} is declared by two sections")
            table[flat] = (name, f.name, f.metadata["key"])
    return table


FLAT_KEYS: dict[str, tuple[str, str, Key]] = _flat_table()
KEYS: dict[str, Key] = {flat: spec for flat, (_, _, spec) in FLAT_KEYS.items()}
DATASET_KEYS: dict[str, Key] = {f.name: f.metadata["key"] for f in key_fields(DatasetConfig)}
# keys of component sections that the engine reads itself or whose range it knows; the other arguments of a
# component are typed by the component's signature (see ``validation``)
SECTION_KEYS: dict[str, dict[str, Key]] = {
    "dataset": DATASET_KEYS, "dataset_val": DATASET_KEYS, "tokenizer": TOKENIZER_KEYS,
    "optimizer": OPTIMIZER_KEYS, "lr_scheduler": LR_SCHEDULER_KEYS, "profiler": PROFILER_KEYS,
}

