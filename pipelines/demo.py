"""The embedded default, end to end: ``python -m pipelines.demo [--workdir DIR]`` (also ``mirotrain demo``).

Runs the real ``post-train`` flow in Prefect's ephemeral mode (no server) on a laptop CPU:

1. writes a tiny random Qwen3 checkpoint (real Qwen3 tokenizer) to ``WORKDIR/hub/tiny-qwen3`` and the
   generated agent traces and preference pairs to ``WORKDIR/data`` -- the stand-ins for the Hub and a
   dataset bucket;
2. ``post_train``: download (from a ``file://`` URL, the same fsspec code path as s3:// or the Hub's
   resumable download) -> pack SFT data -> SFT -> pack preference data -> reference log-probs -> DPO from
   the SFT weights -> HF export, with artifacts;
3. loads the export with ``transformers`` and generates a reply. The model is tiny and starts from random
   weights, so the reply is gibberish: the demo shows the pipeline working, not a useful model.

Prefect state (database, cached results) lives in ``WORKDIR/.prefect`` unless ``PREFECT_HOME`` or
``PREFECT_API_URL`` is set. Every demo is a new flow run and so a new training run
(``WORKDIR/runs/{sft,dpo}/<run>``, ``WORKDIR/export/<run>``; pipelines/runs.py): running it again trains
again, with the download and pack results from the cache. ``--resume-from <run>`` continues a demo that
was killed mid-run from its newest step checkpoints instead.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = REPO / "mirotrain" / "configs" / "tiny"
# Step caps that keep the whole demo well inside 10 minutes on 2 shared CPU cores (a tiny-model step takes
# 1-3 s there) while still showing the loss move and a checkpoint or two per stage.
DEMO_SFT_STEPS = ["epochs=1", "max_steps_per_epoch=20", "checkpoint_steps_for_auto_resume=10"]
DEMO_DPO_STEPS = ["epochs=1", "max_steps_per_epoch=12", "checkpoint_steps_for_auto_resume=6"]


def prepare_demo_inputs(workdir: str | os.PathLike) -> dict[str, str]:
    """Write the tiny checkpoint and the demo data (idempotent: kept when already there)."""
    from mirotrain.data.demo import write_demo
    from mirotrain.models.qwen3.tiny import write_tiny_checkpoint

    work = Path(workdir).resolve()
    hub = work / "hub" / "tiny-qwen3"
    if not (hub / "config.json").is_file():
        write_tiny_checkpoint(hub)
    data = work / "data"
    if not ((data / "sft.jsonl").is_file() and (data / "preference.jsonl").is_file()):
        write_demo(str(data))
    return {"model_source": hub.as_uri(), "sft_data": str(data / "sft.jsonl"), "preference_data": str(data / "preference.jsonl")}


def demo_parameters(workdir: str | os.PathLike, inputs: dict[str, str]) -> dict[str, Any]:
    """``post_train`` parameters for the embedded default (the same shape a deployment passes)."""
    work = Path(workdir).resolve()
    packed = str(work / "packed")
    return {
        "model": {"source": inputs["model_source"], "output_dir": str(work / "models" / "tiny-qwen3")},
        "sft_stage": {"config": str(TINY_CONFIGS / "sft.yaml"), "output_dir": str(work / "runs" / "sft"),
                      "overrides": [f"dataset.data_files={inputs['sft_data']}", f"dataset.output_dir={packed}",
                                    *DEMO_SFT_STEPS]},
        "dpo_stage": {"config": str(TINY_CONFIGS / "dpo.yaml"), "output_dir": str(work / "runs" / "dpo"),
                      "overrides": [f"dataset.data_files={inputs['preference_data']}", f"dataset.output_dir={packed}",
                                    *DEMO_DPO_STEPS]},
        "export_dir": str(work / "export"),
        "launch": {"nproc_per_node": 1, "retries": 2, "retry_delay_s": 2},
    }


def generate_reply(model_dir: str, prompt: str = "What is 2 + 3? Answer briefly.", max_new_tokens: int = 24) -> str:
    """Load an HF export with transformers and answer one chat turn (greedy), as a user of the export would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _configure_prefect(workdir: Path) -> None:
    """Ephemeral mode, offline, with its state in the workdir; must run before Prefect reads its settings."""
    from tasks._runtime import apply_prefect_env_defaults

    apply_prefect_env_defaults()
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(workdir / ".prefect")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


GIBBERISH = ("The tiny model starts from random weights and trains for a few dozen steps, so its reply is "
             "gibberish: the demo shows the pipeline working end to end, not a useful model.")


def run_demo(workdir: str | os.PathLike = "demo-run", resume_from: str | None = None) -> dict[str, Any]:
    """Run the embedded default end to end; returns the outcome (run name, paths, losses, the reply, timings).

    Args:
        workdir: Where the tiny model, data, runs, exports and Prefect state go.
        resume_from: An earlier demo run to continue (its run name); default: a new run.
    """
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _configure_prefect(work)
    t0 = time.monotonic()
    inputs = prepare_demo_inputs(work)
    from pipelines.post_train import post_train
    from pipelines.runs import name_of_flow_run

    state = post_train(**demo_parameters(work, inputs), resume_from=resume_from, return_state=True)
    if not state.is_completed():
        run = name_of_flow_run(state.state_details.flow_run_id)
        raise RuntimeError(f"post-train flow run {run} ended {state.type.value}: {state.message}\n"
                           f"continue it with: mirotrain demo --workdir {workdir} --resume-from {run}")
    outcome = state.result()
    t_flow = time.monotonic() - t0
    reply = generate_reply(outcome.export_dir)
    result = {
        "run_name": outcome.run_name, "workdir": str(work), "export_dir": outcome.export_dir,
        "sft": {"steps": outcome.sft.steps, "first_loss": outcome.sft.first_loss, "final_loss": outcome.sft.final_loss,
                "output_dir": outcome.sft.output_dir, "resumed_from": outcome.sft.resumed_from},
        "dpo": {"steps": outcome.dpo.steps, "first_loss": outcome.dpo.first_loss, "final_loss": outcome.dpo.final_loss,
                "output_dir": outcome.dpo.output_dir, "resumed_from": outcome.dpo.resumed_from},
        "reply": reply, "flow_seconds": round(t_flow, 1), "total_seconds": round(time.monotonic() - t0, 1),
        "prefect_home": os.environ.get("PREFECT_HOME"),
    }
    (work / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


def _loss(x: float | None) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "n/a"


def summary_text(result: dict[str, Any]) -> str:
    """What a person reads at the end of the demo: what ran, the losses, where everything is."""
    sft, dpo = result["sft"], result["dpo"]
    home = result.get("prefect_home")
    lines = [
        "",
        f"Demo run {result['run_name']} finished in {result['total_seconds']:.0f} s.",
        "What ran: the post-train Prefect flow (ephemeral mode, no server) on a tiny random Qwen3: download ->",
        "  pack -> SFT -> pack preference pairs -> reference log-probs -> DPO -> HF export -> one reply.",
        f"Losses:  SFT {_loss(sft['first_loss'])} -> {_loss(sft['final_loss'])} over {sft['steps']} steps;  "
        f"DPO {_loss(dpo['first_loss'])} -> {_loss(dpo['final_loss'])} over {dpo['steps']} steps.",
        "Outputs:",
        f"  SFT run dir  {sft['output_dir']}  (metrics.jsonl, loss_curve.png, checkpoints/, hf/final)",
        f"  DPO run dir  {dpo['output_dir']}",
        f"  HF export    {result['export_dir']}  (loads with transformers.AutoModelForCausalLM)",
        f"  this summary {Path(result['workdir']) / 'demo_result.json'}",
    ]
    if home:
        lines.append(f"  Prefect      PREFECT_HOME={home} prefect artifact ls   (run summaries, metrics, links)")
    lines += [
        f"Reply from the exported model: {result['reply']!r}",
        f"  {GIBBERISH}",
        "Running the demo again starts a new run (download and pack come from the cache); "
        "--resume-from <run> continues a killed one.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The demo's command line (``mirotrain demo`` runs this in a child process)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo",
                                     description="Run the embedded default (a tiny random Qwen3, on CPU) end to end "
                                     "through the post-train flow, in Prefect's ephemeral mode.")
    parser.add_argument("--workdir", default="demo-run", help="where the tiny model, data, runs and Prefect state go")
    parser.add_argument("--resume-from", default=None, metavar="RUN",
                        help="continue this earlier demo run (its run name) instead of starting a new one")
    args = parser.parse_args(argv)
    print(GIBBERISH, flush=True)
    print(summary_text(run_demo(args.workdir, args.resume_from)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
