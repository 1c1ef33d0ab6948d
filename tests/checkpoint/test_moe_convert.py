"""A Qwen3-MoE step checkpoint converts to Hugging Face and loads in transformers with our logits (fp32).

The checkpoint comes from the trainer: `mirotrain sft` under torchrun on 2 ranks with expert parallelism 2, so the
stacked expert weights are saved as DTensor shards over "ep" (and the rest as FSDP shards). Step 2 of 3 is
converted (a mid-run step, not the final export) with `mirotrain convert`. The reference is our own model loaded
from the same DCP checkpoint by its native names, so the comparison goes through the per-expert unstacking, the
router name and the HF config the conversion writes, not through a second copy of that mapping.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from sft_helpers import REPO, TINY_MOE, VOCAB, assert_ok, run_sft, tiny_config, write_config, write_shards  # noqa: E402

pytestmark = pytest.mark.slow  # `mirotrain sft` under torchrun, then `mirotrain convert`

TOL = 1e-5


def _ours_from_dcp(step_dir: Path) -> torch.nn.Module:
    """Our model, built from the checkpoint's meta.json and loaded from its DCP files (native names)."""
    from mirotrain.checkpoint.convert import MODEL_PREFIX, model_args_for
    from mirotrain.models.families import build_model

    model = build_model(model_args_for(step_dir), device="cpu")
    state = model.state_dict()
    dcp.load({MODEL_PREFIX.rstrip("."): state}, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    model.load_state_dict(state)
    return model.eval()


def test_ep2_step_checkpoint_converts_to_transformers_with_equal_logits(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    shards = write_shards(tmp_path / "shards", n_rows=6, seq_len=64, seed=3)
    out = tmp_path / "run"
    cfg = tiny_config(out, shards, moe_expert_parallel_size=2, auto_resume=True, checkpoint_steps_for_auto_resume=2,
                      keep_last_n_checkpoints=2)
    cfg["model"] = dict(TINY_MOE, router_aux_loss_coef=0.05)
    assert_ok(run_sft(write_config(cfg, tmp_path / "run.yaml"), nproc=2))
    step_dir = out / "checkpoints" / "step_2"
    assert (step_dir / "COMPLETE").is_file()

    export = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mirotrain", "convert", "--checkpoint", str(step_dir),
                           "--output", str(export), "--dtype", "fp32"], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    hf = Qwen3MoeForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    assert hf.config.model_type == "qwen3_moe" and hf.config.num_experts == TINY_MOE["num_experts"]
    assert hf.config.router_aux_loss_coef == 0.05
    ours = _ours_from_dcp(step_dir)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids, output_router_logits=True)
        logits = ours(ids)
        aux, _ = ours.router_losses()
    assert (logits - expected.logits).abs().max().item() <= TOL
    assert abs(aux.item() - expected.aux_loss.item()) <= TOL

