"""docs/pipeline.md's setup block runs as pasted: every command in it exists with the options it uses, its
offline step writes what the ``adhoc`` deployments read, and the deployment it runs is declared."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import REPO

MARKER = "<!-- setup-block -->"


def setup_block() -> list[list[str]]:
    """The block's commands, one token list per line (comments and a trailing ``&`` dropped)."""
    text = (REPO / "docs" / "pipeline.md").read_text()
    assert MARKER in text, f"docs/pipeline.md lost its {MARKER} marker"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S)
    assert block, "no ```bash block after the setup marker"
    commands = []
    for line in block.group(1).splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens and tokens[-1] == "&":
            tokens.pop()
        if tokens:
            commands.append(tokens)
    return commands


def _program(tokens: list[str]) -> str | None:
    """The program a line runs (None for a line that only sets variables)."""
    if tokens[0] == "export":
        return None
    if tokens[0] == "until":  # until <cmd>; do ...; done
        return tokens[1]
    return tokens[0]


def _bin_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def test_setup_block_is_valid_bash_in_order() -> None:
    text = (REPO / "docs" / "pipeline.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    r = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    programs = [_program(t) for t in setup_block()]
    firsts = [" ".join(t[:3]) for t in setup_block()]
    # The order a pasted block needs: API up before anything talks to it, inputs before the run.
    order = ["prefect server start", "until curl -sf", "prefect work-pool create", "prefect --no-prompt deploy",
             "python -c from", "prefect worker start", "prefect deployment run"]
    positions = [next(i for i, f in enumerate(firsts) if f.startswith(o)) for o in order]
    assert positions == sorted(positions), firsts
    for program in filter(None, programs):
        assert shutil.which(program, path=_bin_path()), f"setup block runs {program!r}, which is not installed"


@pytest.mark.slow
def test_setup_block_prefect_commands_take_their_options(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _bin_path(), "PREFECT_HOME": str(tmp_path / "home")}
    for tokens in setup_block():
        if tokens[0] != "prefect":
            continue
        words = [t for t in tokens[1:] if t != "--no-prompt"]
        path = [w for w in words if not w.startswith("-")][:2]  # e.g. work-pool create, deploy --all
        options = [w.split("=")[0] for w in words if w.startswith("--")]
        r = subprocess.run(["prefect", *path, "--help"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"prefect {' '.join(path)} --help failed:\n{r.stdout}\n{r.stderr}"
        for option in options:
            assert option in r.stdout, f"prefect {' '.join(path)} has no {option}"
        for word in words:  # files the command names exist in the repository
            if "/" in word and word.endswith((".yaml", ".yml")):
                assert (REPO / word).is_file(), word


@pytest.mark.slow
def test_setup_block_writes_what_the_adhoc_deployments_read(tmp_path: Path) -> None:
    """Run the block's offline step where the repo would be, then check every input path the deployments use."""
    step = next(t for t in setup_block() if t[0] == "python")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(step, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    run_line = next(t for t in setup_block() if t[:3] == ["prefect", "deployment", "run"])
    flow_name, deployment_name = run_line[3].split("/")
    declared = [(Path(d["entrypoint"].split(":")[0]).stem.replace("_", "-"), d["name"]) for d in spec["deployments"]]
    assert (flow_name, deployment_name) in declared, declared
    for d in spec["deployments"]:
        if d["name"] != "adhoc":
            continue
        params = d["parameters"]
        paths = [params.get("model", {}).get("source"), params.get("model_dir")]
        for stage in ("sft_stage", "dpo_stage", "train"):
            paths += [o.split("=", 1)[1] for o in params.get(stage, {}).get("overrides", [])
                      if o.startswith("dataset.data_files=")]
        for p in filter(None, paths):
            assert (tmp_path / p).exists(), f"{d['entrypoint']} adhoc reads {p}, which the setup block does not write"
