"""`mirotrain download` on local paths and fsspec URLs: copy, resume, verify (no network, no Prefect)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mirotrain.hub import (RECORD_NAME, DownloadError, SourceNotFound, classify_source, download, read_record,
                           verify_dir)


def test_classify_source(tmp_path: Path) -> None:
    assert classify_source("Qwen/Qwen3-32B") == "hub"
    assert classify_source("hf://Qwen/Qwen3-32B") == "hub"
    assert classify_source("s3://bucket/model") == "fsspec"
    assert classify_source(str(tmp_path)) == "local"
    with pytest.raises(DownloadError):
        classify_source("no-such-thing")


@pytest.mark.parametrize("as_url", [False, True])
def test_download_local_and_fsspec_then_resume(tmp_path: Path, as_url: bool, make_checkpoint) -> None:
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    source = src.as_uri() if as_url else str(src)
    lines: list[str] = []
    rep = download(source, out, progress=lines.append)
    assert rep.kind == ("fsspec" if as_url else "local")
    assert sorted(rep.downloaded) == sorted(p.name for p in src.iterdir())
    assert verify_dir(out, rep.files) == []
    assert read_record(out)["files"] == rep.files
    # A second run skips complete files; a half-copied file is continued from its .partial.
    shard = out / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    (out / (shard.name + ".partial")).write_bytes(data[:100])
    rep2 = download(source, out, progress=lines.append)
    assert rep2.downloaded == [shard.name]
    assert shard.read_bytes() == data
    assert any("resuming" in line for line in lines)


def test_verify_catches_truncation_and_index_gaps(tmp_path: Path, make_checkpoint) -> None:
    root = make_checkpoint(tmp_path / "m")
    shard = root / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    problems = verify_dir(root)
    assert any("model-00002" in p for p in problems)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["c.weight"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any("'c.weight'" in p for p in verify_dir(root))


@pytest.mark.slow  # `mirotrain download` as a child process
def test_download_cli(tmp_path: Path, make_checkpoint) -> None:
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mirotrain", "download", src.as_uri(), "--output-dir", str(out),
                        "--hf-token", "hf_SECRET_never_logged"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / RECORD_NAME).is_file()
    assert "hf_SECRET" not in r.stdout + r.stderr + (out / RECORD_NAME).read_text()
    bad = subprocess.run([sys.executable, "-m", "mirotrain", "download", str(tmp_path / "missing"), "--output-dir",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "mirotrain download:" in bad.stderr


def test_download_weights_task_cli(api_env: dict, tmp_path: Path, make_checkpoint) -> None:
    """`python -m tasks.download_weights` runs the task inside a flow against the Prefect API."""
    src = make_checkpoint(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "tasks.download_weights", "--source", src.as_uri(), "--output-dir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=api_env,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["files"]["config.json"] == (src / "config.json").stat().st_size


def test_task_cli_exits_2_for_a_permanent_error_and_1_for_another(api_env: dict, tmp_path: Path) -> None:
    """A source that does not exist (through the flow, as an operator runs it) exits 2; an empty source
    directory, a plain download failure that could be retried, exits 1 (here without Prefect)."""
    (tmp_path / "empty").mkdir()

    def cli(source: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tasks.download_weights", "--source", source, "--output-dir",
                               str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=300,
                              env=api_env, cwd=Path(__file__).resolve().parents[1])

    missing = cli(str(tmp_path / "nonexistent"))
    assert missing.returncode == 2, missing.stderr[-4000:]
    assert "download_weights: FAILED: " in missing.stderr and "is not an existing path" in missing.stderr
    empty = cli(str(tmp_path / "empty"), "--no-prefect")
    assert empty.returncode == 1, empty.stderr[-4000:]
    assert "download_weights: RuntimeError: source" in empty.stderr and "has no files" in empty.stderr


@pytest.mark.parametrize("source", ["/nonexistent/model", "file:///nonexistent/model", "memory://nonexistent/model",
                                    "not a repo id"])
def test_missing_source_is_not_found(tmp_path: Path, source: str) -> None:
    """A source that does not exist is SourceNotFound (never retried), not a plain DownloadError."""
    with pytest.raises(SourceNotFound, match="nonexistent|not an existing path"):
        download(source, tmp_path / "out", progress=lambda line: None)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections to it are refused


def test_hub_outage_keys_a_completed_download_by_its_recorded_commit(tmp_path: Path, monkeypatch) -> None:
    """The Hub refuses connections: the download cache key of weights already on disk is the commit their
    download recorded (a cache hit), not the requested revision (a miss that re-downloads and fails)."""
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    from tasks.download_weights import _source_now

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets it
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    repo, sha = "mirotrain-test/offline-model", "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(Exception) as unreachable:  # what the Hub client raises here, as hub_revision sees it
        HfApi().repo_info(repo, timeout=5)
    assert "connect" in f"{type(unreachable.value).__name__} {unreachable.value}".lower(), unreachable.value

    out = tmp_path / "weights"
    assert json.loads(_source_now(repo, str(out))) == {"hub": repo, "sha": None}  # nothing on disk to go by
    out.mkdir()
    record = {"source": repo, "kind": "hub", "output_dir": str(out), "revision": sha, "requested_revision": None,
              "files": {"model.safetensors": 8}}
    (out / RECORD_NAME).write_text(json.dumps(record))
    assert json.loads(_source_now(repo, str(out))) == {"hub": repo, "sha": sha}
    assert json.loads(_source_now(repo, str(out), revision=sha)) == {"hub": repo, "sha": sha}  # pinned to it
    # another revision, or another repo, is not what the record holds: the requested revision keys it
    assert json.loads(_source_now(repo, str(out), revision="v2")) == {"hub": repo, "sha": "v2"}
    assert json.loads(_source_now("mirotrain-test/other", str(out))) == {"hub": "mirotrain-test/other", "sha": None}
