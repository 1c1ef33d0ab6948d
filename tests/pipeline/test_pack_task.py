"""pack_dataset on the real engine: a re-run with the same inputs is a cache hit; stale or edited is not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from prefect import flow

from tasks.pack_dataset import PackResult, pack_dataset


@flow(name="test-pack")
def _pack_flow(config: str, overrides: list[str]):
    return pack_dataset(config, overrides, "dataset", return_state=True)


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


def test_pack_dataset_cli(api_env: dict, sft_pack_config: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tasks.pack_dataset", "--config", str(sft_pack_config),
                        "--section", "dataset"], capture_output=True, text=True, timeout=300, env=api_env,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert (Path(out["path"]) / "manifest.json").is_file()
