"""Run identity on a real Prefect API: a new flow run gets a run directory of its own, its retries and its
subflows get the same one, ``resume_from`` finds an earlier run or fails naming it (pipelines/runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from mirotrain.config import ConfigError
from pipelines.params import StageConfig
from pipelines.runs import find_run, stage_run_dir, under
from tasks._retry import is_permanent


@pytest.fixture()
def stage(tmp_path: Path) -> StageConfig:
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'from-config'}\n")
    return StageConfig(config=str(cfg), output_dir=str(tmp_path / "runs"))


@flow(name="test-run-dir")
def _run_dir_flow(stage: StageConfig, resume_from: str | None = None) -> str:
    return stage_run_dir(stage, resume_from)


@flow(name="test-run-dir-child")
def _child(stage: StageConfig, resume_from: str | None = None) -> str:
    return stage_run_dir(stage, resume_from)


@flow(name="test-run-dir-parent")
def _parent(stage: StageConfig) -> tuple[str, str]:
    return stage_run_dir(stage), _child(stage)


@flow(name="test-run-dir-parent-resuming")
def _parent_resuming(stage: StageConfig, name: str) -> str:
    return _child(stage, name)


def _flow_run(state):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def test_new_flow_runs_get_their_own_run_directory(prefect_api: str, stage: StageConfig) -> None:
    first, second = _run_dir_flow(stage, return_state=True), _run_dir_flow(stage, return_state=True)
    dirs = [Path(first.result()), Path(second.result())]
    assert dirs[0] != dirs[1]
    for state, d in zip((first, second), dirs):
        run = _flow_run(state)
        assert d == Path(stage.output_dir) / f"{run.name}-{run.id.hex[:8]}"


def test_subflow_shares_the_root_run_name(prefect_api: str, stage: StageConfig) -> None:
    parent_dir, child_dir = _parent(stage)
    assert parent_dir == child_dir


def test_flow_retry_keeps_the_run_directory(prefect_api: str, stage: StageConfig, tmp_path: Path) -> None:
    seen: list[str] = []

    @flow(name="test-run-dir-retry", retries=1, retry_delay_seconds=0)
    def flaky(stage: StageConfig) -> str:
        seen.append(stage_run_dir(stage))
        if len(seen) == 1:
            raise RuntimeError("first attempt fails")
        return seen[-1]

    state = flaky(stage, return_state=True)
    assert state.is_completed() and len(seen) == 2 and seen[0] == seen[1]


def test_a_renamed_flow_run_keeps_its_run_directory(prefect_api: str, stage: StageConfig) -> None:
    @flow(name="test-run-dir-renamed")
    def renamed(stage: StageConfig) -> tuple[str, str]:
        first = Path(stage_run_dir(stage))
        # What the first attempt wrote before the operator renamed the run in the UI: same id, older name.
        old = first.parent / f"name-before-rename-{first.name[-8:]}"
        old.mkdir(parents=True)
        return str(old), stage_run_dir(stage)

    old, now = renamed(stage)
    assert now == old


def test_resume_from_finds_an_earlier_run(prefect_api: str, stage: StageConfig) -> None:
    earlier = Path(_run_dir_flow(stage))
    earlier.mkdir(parents=True)
    short = earlier.name[:-9]  # the flow-run name without the id suffix
    for ref in (earlier.name, short, str(earlier), str(earlier) + "/"):
        assert _run_dir_flow(stage, ref) == str(earlier), ref
    missing = _run_dir_flow(stage, "no-such-run", return_state=True)
    assert missing.is_failed() and "resume_from='no-such-run': no run directory" in missing.message
    # A subflow trusts its parent's name: the later stages of a resumed run may not exist yet.
    assert _parent_resuming(stage, "later-stage-abcdef12") == str(Path(stage.output_dir) / "later-stage-abcdef12")


def test_find_run_refuses_an_ambiguous_name(tmp_path: Path) -> None:
    for name in ("tall-otter-0123abcd", "tall-otter-4567ef01", "tall-otter-cub"):
        (tmp_path / name).mkdir()
    with pytest.raises(ConfigError, match="several runs match") as ambiguous:
        find_run(tmp_path, "tall-otter")
    assert is_permanent(ambiguous.value)  # the flow's retries give up at once
    assert find_run(tmp_path, "tall-otter-cub") == tmp_path / "tall-otter-cub"
    for bad in ("..", "/", "tall-otter-*"):  # never the base's parent, never a pattern
        with pytest.raises((ConfigError, FileNotFoundError), match="resume_from"):
            find_run(tmp_path, bad)


def test_outside_a_flow_the_directory_is_used_as_is(stage: StageConfig, tmp_path: Path) -> None:
    assert stage_run_dir(stage) == str(tmp_path / "runs")
    assert under("relative/base", None) == str(Path("relative/base").resolve())
