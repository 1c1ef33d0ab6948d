"""pack_dataset on the real engine: a re-run with the same inputs is a cache hit; stale, edited or changed
data is not -- through a flow and through the task CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow

from mirotrain.data.demo import write_demo
from tasks.pack_dataset import PackResult, pack_dataset


@flow(name="test-pack")
def _pack_flow(config: str, overrides: list[str]):
    return pack_dataset(config, overrides, "dataset", return_state=True)


@pytest.mark.slow  # several packs of real data (minutes on 2 shared cores)
def test_pack_rerun_is_cache_hit(prefect_api: str, sft_pack_config: Path) -> None:
    first = _pack_flow(str(sft_pack_config), [])
    assert first.name == "Completed"
    result: PackResult = first.result()
    assert result.manifest["samples"] == 40 and (Path(result.path) / "manifest.json").is_file()
    second = _pack_flow(str(sft_pack_config), [])
    assert second.name == "Cached" and second.result().path == result.path
    # The shard directory vanished: the cache entry is stale, pack runs again and recreates it.
    shutil.rmtree(result.path)
    third = _pack_flow(str(sft_pack_config), [])
    assert third.name == "Completed" and (Path(result.path) / "manifest.json").is_file()
    assert _pack_flow(str(sft_pack_config), []).name == "Cached"
    # Same path, edited content (and different overrides): both are misses.
    assert _pack_flow(str(sft_pack_config), ["dataset.packed_seq_len=2048"]).name == "Completed"
    sft_pack_config.write_text(sft_pack_config.read_text().replace("max_seq_len: 512", "max_seq_len: 256"))
    assert _pack_flow(str(sft_pack_config), []).name == "Completed"


@pytest.mark.slow  # two packs of real data
def test_pack_rebuilds_a_shard_directory_that_lost_a_shard(prefect_api: str, sft_pack_config: Path) -> None:
    """manifest.json survives, a shard file does not: the cache check rejects the record, and the task must
    make the engine pack again instead of handing back the damaged directory it would reuse."""
    first: PackResult = _pack_flow(str(sft_pack_config), []).result()
    shard = sorted(Path(first.path).glob("shard-*.arrow"))[0]
    shard.unlink()
    again = _pack_flow(str(sft_pack_config), [])
    assert again.name == "Completed", again.name
    rebuilt: PackResult = again.result()
    assert rebuilt.path == first.path and shard.is_file() and rebuilt.files.keys() == first.files.keys()
    assert rebuilt.manifest["samples"] == 40
    assert _pack_flow(str(sft_pack_config), []).name == "Cached"


@pytest.mark.slow  # several packs of real data (minutes on 2 shared cores)
def test_pack_repacks_data_changed_in_place(prefect_api: str, sft_pack_config: Path, tmp_path: Path) -> None:
    """The data file the config names grows in place (same path, 100 -> 300 records): a miss, packed again."""
    write_demo(str(tmp_path / "data"), num_samples=100)
    first = _pack_flow(str(sft_pack_config), [])
    assert first.name == "Completed" and first.result().manifest["samples"] == 100
    assert _pack_flow(str(sft_pack_config), []).name == "Cached"
    write_demo(str(tmp_path / "data"), num_samples=300)
    grown = _pack_flow(str(sft_pack_config), [])
    assert grown.name == "Completed", grown.name
    assert grown.result().manifest["samples"] == 300 and grown.result().path != first.result().path
    again = _pack_flow(str(sft_pack_config), [])
    assert again.name == "Cached" and again.result().path == grown.result().path


def _pack_cli(api_env: dict, config: Path) -> tuple[str, dict]:
    """Run `python -m tasks.pack_dataset` in a child process; returns (task state name, printed result)."""
    r = subprocess.run([sys.executable, "-m", "tasks.pack_dataset", "--config", str(config), "--section", "dataset"],
                       capture_output=True, text=True, timeout=300, env=api_env, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    states = [line.split(": ", 1)[1] for line in r.stderr.splitlines() if line.startswith("pack_dataset: ")]
    return states[-1], json.loads(r.stdout[r.stdout.index("{"):])


@pytest.mark.slow
def test_pack_dataset_cli_cache(api_env: dict, sft_pack_config: Path, tmp_path: Path) -> None:
    """Two CLI calls with the same inputs: the second is a cache hit with the same path; changed data is not."""
    state, out = _pack_cli(api_env, sft_pack_config)
    assert state == "Completed" and (Path(out["path"]) / "manifest.json").is_file()
    state, again = _pack_cli(api_env, sft_pack_config)
    assert state == "Cached" and again["path"] == out["path"]
    write_demo(str(tmp_path / "data"), num_samples=60)
    state, grown = _pack_cli(api_env, sft_pack_config)
    assert state == "Completed" and grown["manifest"]["samples"] == 60 and grown["path"] != out["path"]
