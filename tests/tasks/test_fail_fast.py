"""Fail fast: permanent errors end a run after one attempt, before anything is downloaded or trained;
transient errors keep their retries (tasks/_retry.py, tasks/validate_config.py)."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from prefect import flow

from mirotrain.config import ConfigError
from mirotrain.hub import SourceNotFound, hub_not_found
from tasks._retry import is_permanent
from tasks._subprocess import CommandFailed


def _flow_run(flow_run_id: UUID):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _task_runs(flow_run_id: UUID) -> dict[str, int]:
    """Task name -> run_count of every task run of a flow run, read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.run_count for run in runs}


def test_permanent_and_transient_errors_are_told_apart() -> None:
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    assert is_permanent(ConfigError("optimizer.lrr", "unknown key"))
    assert is_permanent(SourceNotFound("source 'x' does not exist"))
    assert is_permanent(FileNotFoundError("data.jsonl"))
    assert is_permanent(CommandFailed(2, ["python", "-m", "mirotrain", "sft"], []))
    torchrun = ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mirotrain", "sft"]
    summary = ["=" * 60, "mirotrain FAILED", "-" * 60, "Failures:", "[1]:", "  rank      : 1 (local_rank: 1)",
               "  exitcode  : 2 (pid: 124)", "-" * 60, "Root Cause (first observed failure):", "[0]:",
               "  rank      : 0 (local_rank: 0)", "  exitcode  : 2 (pid: 123)", "=" * 60]
    assert is_permanent(CommandFailed(1, torchrun, summary))
    killed = [*summary[:7], "[2]:", "  exitcode  : -9 (pid: 125)", *summary[7:]]
    assert not is_permanent(CommandFailed(1, torchrun, killed))
    # the engine's own output is not torchrun's summary: a line that looks like it outside it means nothing,
    # and neither does any line of a command that is not torchrun
    assert not is_permanent(CommandFailed(1, torchrun, ["  exitcode  : 2 (pid: 1)", "loss went up"]))
    assert not is_permanent(CommandFailed(1, ["python", "-m", "mirotrain", "sft"], summary))
    assert not is_permanent(CommandFailed(-9, ["torchrun"], []))
    assert not is_permanent(CommandFailed(1, ["python"], []))
    assert not is_permanent(ConnectionError("reset by peer"))
    assert not is_permanent(TimeoutError("slow"))
    assert not is_permanent(LocalEntryNotFoundError("the Hub cannot be reached and the file is not cached"))

    request = httpx2.Request("GET", "https://huggingface.co/api/models/no/such-model")
    assert hub_not_found(RepositoryNotFoundError("404 Client Error", response=httpx2.Response(404, request=request)))
    # Raised when the Hub cannot be reached and nothing is cached: a network error, retried.
    assert not hub_not_found(LocalEntryNotFoundError("cannot reach the Hub"))
    assert not hub_not_found(ConnectionError("no route to host"))


@pytest.mark.slow
@pytest.mark.parametrize("stage,change,expected", [
    ("dpo_stage", {"overrides": ["optimizer.lrr=1e-5"]}, "optimizer.lrr"),
    ("sft_stage", {"config": "/nonexistent/sft.yaml"}, "config file not found: /nonexistent/sft.yaml"),
    ("sft_stage", {"overrides": ["dataset.data_files=/nonexistent/traces-*.jsonl"]}, "dataset.data_files"),
])
def test_bad_stage_config_fails_post_train_fast(prefect_api: str, demo_inputs: dict, tmp_path: Path, stage: str,
                                                change: dict, expected: str) -> None:
    from pipelines.demo import demo_parameters
    from pipelines.post_train import post_train

    params = demo_parameters(tmp_path / "work", demo_inputs)
    for key, value in change.items():
        params[stage][key] = value if key == "config" else params[stage][key] + value
    t0 = time.monotonic()
    state = post_train(**params, return_state=True)
    elapsed = time.monotonic() - t0
    assert state.is_failed(), state
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigError) and expected in str(error), error
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert _flow_run(state.state_details.flow_run_id).run_count == 1  # no flow retry
    assert _task_runs(state.state_details.flow_run_id).get("validate_config") == 1  # no task retry
    # Nothing downloaded, nothing packed or trained.
    for path in (params["model"]["output_dir"], params["sft_stage"]["output_dir"], params["dpo_stage"]["output_dir"]):
        assert not Path(path).exists(), path


@pytest.mark.slow
@pytest.mark.parametrize("source", ["file:///nonexistent/tiny-qwen3", "/nonexistent/tiny-qwen3"])
def test_missing_model_source_fails_after_one_attempt(prefect_api: str, demo_inputs: dict, tmp_path: Path,
                                                      source: str) -> None:
    from pipelines.demo import demo_parameters
    from pipelines.post_train import post_train

    params = demo_parameters(tmp_path / "work", demo_inputs)
    params["model"]["source"] = source
    t0 = time.monotonic()
    state = post_train(**params, return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), SourceNotFound)
    assert _task_runs(state.state_details.flow_run_id)["download_weights"] == 1
    assert _flow_run(state.state_details.flow_run_id).run_count == 1
    assert time.monotonic() - t0 < 30
    assert not Path(params["sft_stage"]["output_dir"]).exists()


class FlakyFileSystem(LocalFileSystem):
    """The local filesystem under ``flaky://``, whose first file read fails like a dropped connection."""

    protocol = ("flaky",)
    failures_left = 1

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://") if isinstance(path, str) else path)

    def _open(self, path, mode="rb", **kwargs):
        if FlakyFileSystem.failures_left > 0:
            FlakyFileSystem.failures_left -= 1
            raise ConnectionError("connection reset by peer (flaky://)")
        return super()._open(path, mode=mode, **kwargs)


@flow(name="test-flaky-download")
def _download_once(source: str, out: str):
    from tasks.download_weights import download_weights

    return download_weights.with_options(retry_delay_seconds=0)(source, out, return_state=True)


@pytest.mark.slow
def test_transient_download_error_is_retried(prefect_api: str, tmp_path: Path, make_checkpoint) -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    src = make_checkpoint(tmp_path / "src")
    FlakyFileSystem.failures_left = 1
    state = _download_once(f"flaky://{src}", str(tmp_path / "out"))
    assert state.is_completed(), state
    assert FlakyFileSystem.failures_left == 0  # the first attempt did meet the dropped connection
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_task_run(state.state_details.task_run_id).run_count == 2
    assert (tmp_path / "out" / "config.json").is_file()
