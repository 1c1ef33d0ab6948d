"""Top-level config keys: their types, defaults and meaning — the single table the engine reads from.

Keys come from the MiroTrain SFT/DPO recipes users already write (seed usage guide, behaviour spec
§10.2); keys we accept only for compatibility say what happens to them (``note``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUMBER = (int, float)
SECTION = (dict,)
OPTIONAL_INT = (int, type(None))


@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    default: Any = None
    doc: str = ""
    # Value that is accepted; any other value raises "not supported" (for keys kept for compatibility).
    only: tuple[Any, ...] | None = None
    note: str = ""


KEYS: dict[str, Key] = {
    # run
    "output_dir": Key((str,), None, "Where checkpoints, HF exports, metrics and logs go (required)."),
    "device": Key((str,), "cuda", "cuda | cpu (cpu runs in fp32, for tests and the demo)."),
    "dtype": Key((str,), "bf16", "Compute dtype: bf16 | fp32 (fp16 is rejected). Master weights stay fp32.", only=("bf16", "fp32")),
    "seed": Key((int, type(None)), None, "Random seed; null draws one, logs it and stores it for resume."),
    "log_every_n_steps": Key((int,), 1, "Log metrics every N optimizer steps."),
    "log_peak_memory_stats": Key((bool,), True, "Include peak GPU memory in the logs."),
    "log_level": Key((str,), "INFO", "Python logging level."),
    "metric_logger": Key(SECTION + (type(None),), None, "A metric logger component (DiskLogger, TensorBoardLogger, ...)."),
    "cudnn_deterministic_mode": Key((bool,), False, "torch.backends.cudnn.deterministic and deterministic algorithms."),
    # data / loop
    "shuffle": Key((bool,), True, "Shuffle rows each epoch (from the seed)."),
    "batch_size": Key((int,), 1, "Rows per micro-batch per data-parallel rank (must be 1 when packed)."),
    "epochs": Key((int,), 1, "Number of epochs."),
    "max_steps_per_epoch": Key(OPTIONAL_INT, None, "Cap on optimizer steps per epoch."),
    "gradient_accumulation_steps": Key((int,), 1, "Micro-batches per optimizer step."),
    "tokenizer": Key(SECTION, None, "Tokenizer component (qwen3_tokenizer_auto)."),
    "dataset": Key(SECTION, None, "Training dataset component (+ packed, packed_seq_len, streaming_pack, output_dir)."),
    "dataset_val": Key(SECTION + (type(None),), None, "Validation dataset component."),
    "batch_size_val": Key(OPTIONAL_INT, None, "Validation micro-batch size (defaults to batch_size)."),
    "run_val_every_n_steps": Key(OPTIONAL_INT, None, "Run validation every N optimizer steps (and at each epoch end)."),
    "collate_fn": Key((str, type(None)), None, "Accepted for compatibility; the collate follows the data mode.", note="ignored"),
    "resize_token_embeddings": Key((bool,), False, "Qwen3 checkpoints already cover the tokenizer vocab.", only=(False,)),
    # model / loss / optimisation
    "model": Key(SECTION, None, "Model builder component (mirotrain.models.qwen3.*, mirotrain.models.qwen3_moe.*)."),
    "loss": Key(SECTION + (type(None),), None, "Loss component; default LinearCrossEntropyLoss (chunked)."),
    "optimizer": Key(SECTION, None, "Optimizer component (torch.optim.AdamW; fused on CUDA)."),
    "lr_scheduler": Key(SECTION + (type(None),), None, "LR schedule component (get_cosine_schedule_with_warmup)."),
    "mfu_peak_tflops": Key(NUMBER + (type(None),), None,
                           "bf16 peak TFLOP/s per GPU for the logged MFU; null = from the GPU's name (H100/H200: 989)."),
    "clip_grad_norm": Key((int, float, str, type(None)), None, "Clip to this global L2 norm; 'inf' measures only; null = off."),
    "optimizer_in_bwd": Key((bool,), False, "Accepted for compatibility (ignored, as in MiroTrain).", note="ignored"),
    "compile": Key((bool, dict), None, "torch.compile decoder layers and the loss (default: on for CUDA)."),
    "enable_activation_checkpointing": Key((bool,), True, "Recompute each decoder layer in backward."),
    "ac_mode": Key((str, type(None)), None, "Activation checkpointing mode: full | selective."),
    "ac_option": Key((int, str, type(None)), None, "selective: checkpoint every N-th layer (int) or 'op' (keep matmul outputs)."),
    "enable_activation_offloading": Key((bool,), False, "Offload checkpointed activations to CPU (CUDA)."),
    "activation_offloading_use_streams": Key((bool,), True, "Overlap activation offloading with compute."),
    "enable_fp8_training": Key((bool,), False, "FP8 training is not supported.", only=(False,)),
    "fp8_recipe_name": Key((str, type(None)), None, "Accepted for compatibility (FP8 unsupported).", note="ignored"),
    "use_flash_attention": Key((bool,), True, "Accepted for compatibility; see attention_backend.", note="ignored"),
    "attention_backend": Key((str,), "auto", "auto | flash | varlen | sdpa (see mirotrain.modules.attention)."),
    # parallelism
    "fsdp_cpu_offload": Key((bool,), False, "Keep sharded parameters, grads and optimizer state on CPU."),
    "fsdp_reshard_after_forward": Key((bool,), True, "Free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)."),
    "custom_sharded_layers": Key((list, type(None)), None, "Accepted for compatibility (ignored, as in MiroTrain).", note="ignored"),
    "data_parallel_shard_dim": Key((int,), -1, "FSDP shard degree; -1 = world / (replicate × sp-independent dims)."),
    "data_parallel_replicate_dim": Key((int,), 1, "HSDP replicate degree."),
    "tensor_parallel_dim": Key((int,), 1, "Tensor parallelism is not supported (use Ulysses SP).", only=(1,)),
    "tensor_parallel_plan": Key(SECTION + (type(None),), None, "Tensor parallelism is not supported.", only=(None,)),
    "ulysses_sequence_parallel_size": Key((int,), 1, "Ulysses sequence-parallel degree."),
    "moe_expert_parallel_size": Key((int,), 1, "Expert-parallel degree for MoE models."),
    # checkpointing
    "checkpointer": Key(SECTION, None, "Base weights (checkpoint_dir) and HF export settings."),
    "resume_from_checkpoint": Key((bool,), False, "Epoch-level resume; implied by auto_resume here.", note="ignored"),
    "auto_resume": Key((bool,), False, "Step checkpoints (async DCP) and automatic resume on restart."),
    "checkpoint_steps_for_auto_resume": Key((int,), 50, "Optimizer steps between step checkpoints."),
    "keep_last_n_checkpoints": Key((int,), 2, "Complete step checkpoints to keep (the newest is never deleted)."),
    "enable_async_checkpointing": Key((bool,), True, "Write step checkpoints asynchronously."),
    "save_hf_every_epoch": Key((bool,), True, "Export HF weights at each epoch end (always at the end)."),
    # profiling
    "profiler": Key(SECTION + (type(None),), None, "torch.profiler settings (enabled, wait, warmup, active, output_dir)."),
    "enable_memory_trace": Key((bool,), False, "Record a CUDA memory snapshot."),
    "memory_trace_start_step": Key((int,), 5, "First step of the memory trace."),
    "memory_trace_end_step": Key(OPTIONAL_INT, None, "Last step of the memory trace (start + 1)."),
    "memory_trace_file_path": Key((str, type(None)), None, "Where the memory snapshot is written."),
    # DPO
    "ref_checkpointer": Key(SECTION + (type(None),), None, "DPO: reference model weights (default: checkpointer)."),
    "reference": Key((str,), "precompute", "DPO: precompute (cached ref log-probs) | live (frozen sharded copy).", only=("precompute", "live")),
    "unembed_chunk_size": Key(OPTIONAL_INT, None, "Tokens per chunk of the fused LM-head log-prob/CE computation."),
}


def default(key: str) -> Any:
    return KEYS[key].default
