"""Config keys: their types, ranges, defaults and meaning — the single table the engine reads from.

``KEYS`` holds the top-level keys of the MiroTrain SFT/DPO recipes users already write; keys we accept only
for compatibility say what happens to them (``note``). ``SECTION_KEYS`` holds the keys of component
sections that the engine reads itself or whose range it knows (the other arguments of a component are
typed by the component's own signature, see ``validation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUMBER = (int, float)
SECTION = (dict,)
OPTIONAL_INT = (int, type(None))
LOG_LEVELS = tuple(level for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for level in (name, name.lower()))


@dataclass(frozen=True)
class Key:
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


KEYS: dict[str, Key] = {
    # run
    "output_dir": Key((str,), None, "Where checkpoints, HF exports, metrics and logs go (required)."),
    "device": Key((str,), "cuda", "cuda | cpu (cpu runs in fp32, for tests and the demo).", choices=("cuda", "cpu")),
    "dtype": Key((str,), "bf16", "Compute dtype: bf16 | fp32 (fp16 is rejected). Master weights stay fp32.", only=("bf16", "fp32")),
    "seed": Key((int, type(None)), None, "Random seed; null draws one, logs it and stores it for resume.", low=0),
    "log_every_n_steps": Key((int,), 1, "Log metrics every N optimizer steps.", low=1),
    "log_peak_memory_stats": Key((bool,), True, "Include peak GPU memory in the logs."),
    "log_level": Key((str,), "INFO", "Python logging level.", choices=LOG_LEVELS),
    "metric_logger": Key(SECTION + (type(None),), None, "A metric logger component (DiskLogger, TensorBoardLogger, ...)."),
    "cudnn_deterministic_mode": Key((bool,), False, "torch.backends.cudnn.deterministic and deterministic algorithms."),
    # data / loop
    "shuffle": Key((bool,), True, "Shuffle rows each epoch (from the seed)."),
    "batch_size": Key((int,), 1, "Rows per micro-batch per data-parallel rank (must be 1 when packed).", low=1),
    "epochs": Key((int,), 1, "Number of epochs.", low=1),
    "max_steps_per_epoch": Key(OPTIONAL_INT, None, "Cap on optimizer steps per epoch.", low=1),
    "gradient_accumulation_steps": Key((int,), 1, "Micro-batches per optimizer step.", low=1),
    "tokenizer": Key(SECTION, None, "Tokenizer component (qwen3_tokenizer_auto)."),
    "dataset": Key(SECTION, None, "Training dataset component (+ packed, packed_seq_len, streaming_pack, output_dir)."),
    "dataset_val": Key(SECTION + (type(None),), None, "Validation dataset component."),
    "batch_size_val": Key(OPTIONAL_INT, None, "Validation micro-batch size (defaults to batch_size).", low=1),
    "run_val_every_n_steps": Key(OPTIONAL_INT, None, "Run validation every N optimizer steps (and at each epoch end).", low=1),
    "collate_fn": Key((str, type(None)), None, "Accepted for compatibility; the collate follows the data mode.", note="ignored"),
    "resize_token_embeddings": Key((bool,), False, "Qwen3 checkpoints already cover the tokenizer vocab.", only=(False,)),
    # model / loss / optimisation
    "model": Key(SECTION, None, "Model builder component (mirotrain.models.qwen3.*, mirotrain.models.qwen3_moe.*)."),
    "loss": Key(SECTION + (type(None),), None, "Loss component; default LinearCrossEntropyLoss (chunked)."),
    "optimizer": Key(SECTION, None, "Optimizer component (torch.optim.AdamW; fused on CUDA)."),
    "lr_scheduler": Key(SECTION + (type(None),), None, "LR schedule component (get_cosine_schedule_with_warmup)."),
    "mfu_peak_tflops": Key(NUMBER + (type(None),), None,
                           "bf16 peak TFLOP/s per GPU for the logged MFU; null = from the GPU's name (H100/H200: 989).", low=0, low_open=True),
    "clip_grad_norm": Key((int, float, str, type(None)), None, "Clip to this global L2 norm; 'inf' measures only; null = off."),
    "optimizer_in_bwd": Key((bool,), False, "Accepted for compatibility and ignored.", note="ignored"),
    "compile": Key((bool, dict), None, "torch.compile decoder layers and the loss (default: on for CUDA)."),
    "enable_activation_checkpointing": Key((bool,), True, "Recompute each decoder layer in backward."),
    "ac_mode": Key((str, type(None)), None, "Activation checkpointing mode: full | selective | none.", choices=("full", "selective", "none", None)),
    "ac_option": Key((int, str, type(None)), None, "selective: checkpoint every N-th layer (int) or 'op' (keep matmul outputs)."),
    "enable_activation_offloading": Key((bool,), False, "Offload checkpointed activations to CPU (CUDA)."),
    "activation_offloading_use_streams": Key((bool,), True, "Overlap activation offloading with compute."),
    "enable_fp8_training": Key((bool,), False, "FP8 training is not supported.", only=(False,)),
    "fp8_recipe_name": Key((str, type(None)), None, "Accepted for compatibility (FP8 unsupported).", note="ignored"),
    "use_flash_attention": Key((bool,), True, "Accepted for compatibility; see attention_backend.", note="ignored"),
    "attention_backend": Key((str,), "auto", "auto | flash | varlen | sdpa (see mirotrain.modules.attention).", choices=("auto", "flash", "varlen", "sdpa")),
    # parallelism
    "fsdp_cpu_offload": Key((bool,), False, "Keep sharded parameters, grads and optimizer state on CPU."),
    "fsdp_reshard_after_forward": Key((bool,), True, "Free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)."),
    "custom_sharded_layers": Key((list, type(None)), None, "Accepted for compatibility and ignored.", note="ignored"),
    "data_parallel_shard_dim": Key((int,), -1, "FSDP shard degree; -1 = world / (replicate × sp-independent dims)."),
    "data_parallel_replicate_dim": Key((int,), 1, "HSDP replicate degree; HSDP is not supported (FSDP shards over all ranks): 1.", only=(1,)),
    "tensor_parallel_dim": Key((int,), 1, "Tensor parallelism is not supported (use Ulysses SP).", only=(1,)),
    "tensor_parallel_plan": Key(SECTION + (type(None),), None, "Tensor parallelism is not supported.", only=(None,)),
    "ulysses_sequence_parallel_size": Key((int,), 1, "Ulysses sequence-parallel degree.", low=1),
    "moe_expert_parallel_size": Key((int,), 1, "Expert-parallel degree for MoE models.", low=1),
    # checkpointing
    "checkpointer": Key(SECTION, None, "Base weights (checkpoint_dir) and HF export settings."),
    "resume_from_checkpoint": Key((bool,), False, "Epoch-level resume; implied by auto_resume here.", note="ignored"),
    "auto_resume": Key((bool,), False, "Step checkpoints (async DCP) and automatic resume on restart."),
    "checkpoint_steps_for_auto_resume": Key((int,), 50, "Optimizer steps between step checkpoints.", low=1),
    "keep_last_n_checkpoints": Key((int,), 2, "Complete step checkpoints to keep (the newest is never deleted).", low=1),
    "enable_async_checkpointing": Key((bool,), True, "Write step checkpoints asynchronously."),
    "save_hf_every_epoch": Key((bool,), True, "Export HF weights at each epoch end (always at the end)."),
    # profiling
    "profiler": Key(SECTION + (type(None),), None, "torch.profiler settings (enabled, wait, warmup, active, output_dir)."),
    "enable_memory_trace": Key((bool,), False, "Record a CUDA memory snapshot."),
    "memory_trace_start_step": Key((int,), 5, "First step of the memory trace.", low=0),
    "memory_trace_end_step": Key(OPTIONAL_INT, None, "Last step of the memory trace (start + 1).", low=0),
    "memory_trace_file_path": Key((str, type(None)), None, "Where the memory snapshot is written."),
    # DPO
    "ref_checkpointer": Key(SECTION + (type(None),), None, "DPO: reference model weights (default: checkpointer)."),
    "reference": Key((str,), "precompute", "DPO: precompute (cached ref log-probs) | live (frozen sharded copy).", only=("precompute", "live")),
    "unembed_chunk_size": Key(OPTIONAL_INT, None, "Tokens per chunk of the fused LM-head log-prob/CE computation.", low=1),
}


def default(key: str) -> Any:
    return KEYS[key].default


# Keys of component sections that the engine reads itself (``dataset``: packing and loading options, not
# arguments of the dataset builder) or whose range it knows; the other arguments of a component are typed by
# the component's signature. ``dataset_val`` has the same keys as ``dataset``.
DATASET_KEYS: dict[str, Key] = {
    "packed": Key((bool,), False, "Pack documents into rows of packed_seq_len tokens (Arrow shards, `mirotrain pack`)."),
    "streaming_pack": Key((bool,), False, "Pack while training, without shards; excludes packed."),
    "packed_seq_len": Key((int,), None, "Tokens per packed row; required when rows are packed (packed, streaming_pack, "
                          "preference pairs) and at least tokenizer.max_seq_len.", low=2),
    "output_dir": Key((str, type(None)), None, "Where packed shards go (local path or fsspec URL)."),
    "on_bad_sample": Key((str,), "error", "error: stop at the first unusable sample (file:line); skip: count and skip it.",
                         choices=("error", "skip")),
    "num_workers": Key(OPTIONAL_INT, None, "Tokenizer processes for `mirotrain pack` (null: all cores, at most 16).", low=0),
    "pack_seed": Key((int,), 0, "Seed of the packing order."),
    "rows_per_shard": Key(OPTIONAL_INT, None, "Packed rows per Arrow shard file.", low=1),
    "shard_dir": Key((str, type(None)), None, "Read this existing shard directory instead of packing."),
}

SECTION_KEYS: dict[str, dict[str, Key]] = {
    "dataset": DATASET_KEYS,
    "dataset_val": DATASET_KEYS,
    "tokenizer": {
        "max_seq_len": Key(OPTIONAL_INT, None, "Longest document in tokens (longer ones are truncated).", low=1),
        "prompt_template": Key((type(None),), None, "Accepted for compatibility only when null (Qwen3's chat template is used)."),
        "special_tokens_path": Key((type(None),), None, "Accepted for compatibility only when null (the tokenizer's own are used)."),
    },
    "optimizer": {
        "lr": Key(NUMBER, None, "Peak learning rate.", low=0, low_open=True),
        "weight_decay": Key(NUMBER, 0.0, "Decoupled weight decay.", low=0),
        "eps": Key(NUMBER, 1e-8, "Adam epsilon.", low=0, low_open=True),
    },
    "lr_scheduler": {
        "warmup_ratio": Key(NUMBER, 0.1, "Fraction of the optimizer steps spent warming up linearly.", low=0, high=1),
        "num_cycles": Key(NUMBER, 0.5, "Cosine cycles after warm-up (0.5: one decay to min_lr_ratio).", low=0),
        "min_lr_ratio": Key(NUMBER, 0.0, "Floor of the schedule as a fraction of the peak learning rate.", low=0, high=1),
    },
}
