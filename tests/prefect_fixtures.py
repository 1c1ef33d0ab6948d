"""Prefect-layer test setup (tests/pipelines, tasks, integration and test_hub.py), loaded as a plugin by
tests/conftest.py: an isolated PREFECT_HOME and offline Prefect settings, fixed before Prefect is imported.

The ``prefect_api`` fixture starts one temporary Prefect API for the whole session (prefect_test_harness,
about 20 s on 2 cores) and is only requested by tests that run flows, so the fast tests never pay for it.
Child processes (task CLIs, the demo) reach the same API through ``PREFECT_API_URL`` in ``api_env``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import json

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="mirotrain-prefect-home-"))
os.environ["PREFECT_HOME"] = str(_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
from pipeline_helpers import REPO  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """URL of a session-wide temporary Prefect API (database in a temp file, results under PREFECT_HOME)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture()
def api_env(prefect_api: str) -> dict[str, str]:
    """Environment for a child process that must talk to the session's Prefect API."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_sharded_checkpoint(root: Path) -> Path:
    """Two safetensors shards plus an index and a config: the file shape of a real sharded HF checkpoint."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, root / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.ones(4, 4)}, root / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return root


@pytest.fixture()
def make_checkpoint():
    """Factory fixture: ``make_checkpoint(dir)`` writes a small sharded safetensors checkpoint there."""
    return write_sharded_checkpoint


@pytest.fixture()
def sft_pack_config(tmp_path: Path) -> Path:
    """A minimal real SFT data config (bundled Qwen3 tokenizer, 40 generated agent traces, offline pack)."""
    from mirotrain.data.demo import write_demo
    from mirotrain.models.qwen3.tokenizer import bundled_tokenizer_dir

    files = write_demo(str(tmp_path / "data"), num_samples=40)
    cfg = tmp_path / "pack.yaml"
    cfg.write_text(f"""\
output_dir: {tmp_path / 'run'}
tokenizer:
  _component_: mirotrain.models.qwen3.qwen3_tokenizer_auto
  path: {bundled_tokenizer_dir()}
  max_seq_len: 512
dataset:
  _component_: mirotrain.datasets.odr_chat_dataset
  data_files: {files['sft']}
  packed: true
  packed_seq_len: 1024
  output_dir: {tmp_path / 'packed'}
  num_workers: 1
""")
    return cfg


# Traces and preference pairs in the tests' demo data (the demo itself writes 200 of each). Packed by the tiny
# configs they are 39 SFT rows and 9 DPO rows: room for every test's steps on up to two ranks (at most 6 SFT
# and 4 DPO steps per rank), while packing and the DPO reference pass, which cover the whole set, take a
# third of the demo's time.
DEMO_TEST_SAMPLES = 60


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded default's inputs (tiny Qwen3 + ``DEMO_TEST_SAMPLES`` of demo data), written once per session."""
    from mirotrain.data.demo import write_demo
    from pipelines.demo import prepare_demo_inputs

    work = tmp_path_factory.mktemp("demo-inputs")
    write_demo(str(work / "data"), num_samples=DEMO_TEST_SAMPLES)
    inputs = prepare_demo_inputs(work)  # keeps the data written above, adds the tiny checkpoint
    inputs["workdir"] = str(work)
    inputs["model_dir"] = str(work / "hub" / "tiny-qwen3")
    return inputs

