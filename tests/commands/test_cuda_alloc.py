"""`mirotrain sft` / `dpo` give the CUDA allocator expandable segments unless the environment configures it
(mirotrain/commands/cuda_alloc.py): what keeps the reserved peak near validate's estimate."""

import argparse
import os
from pathlib import Path

import pytest

from mirotrain.commands.cuda_alloc import ALLOC_CONF, GENERIC_ALLOC_CONF, alloc_conf_default
from mirotrain.commands.recipe import run_recipe
from mirotrain.data.demo import write_demo

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "mirotrain" / "configs"


def test_an_unset_allocator_conf_gets_expandable_segments():
    env: dict[str, str] = {"PATH": "/usr/bin"}
    assert alloc_conf_default(env) == "expandable_segments:True"
    assert env == {"PATH": "/usr/bin", ALLOC_CONF: "expandable_segments:True"}


@pytest.mark.parametrize("name", [ALLOC_CONF, GENERIC_ALLOC_CONF])
@pytest.mark.parametrize("user_value", ["expandable_segments:False", "max_split_size_mb:512", ""])
def test_the_users_allocator_conf_is_kept(name, user_value):
    env = {name: user_value}
    assert alloc_conf_default(env) is None
    assert env == {name: user_value}


def test_the_recipe_sets_it_before_the_run_starts(monkeypatch, tmp_path):
    """run_recipe (behind `mirotrain sft` and `dpo`) sets it before the config is read and the run builds
    anything on a device."""
    monkeypatch.setenv(ALLOC_CONF, "")  # recorded, so the value run_recipe sets is undone after the test
    monkeypatch.delenv(ALLOC_CONF)
    monkeypatch.delenv(GENERIC_ALLOC_CONF, raising=False)
    seen = []
    traces = write_demo(str(tmp_path / "data"), num_samples=4, num_pairs=1)["sft"]
    args = argparse.Namespace(config=str(CONFIG_ROOT / "tiny" / "sft.yaml"),
                              overrides=[f"output_dir={tmp_path}", f"dataset.data_files={traces}"])
    assert run_recipe(args, lambda cfg: seen.append(os.environ.get(ALLOC_CONF))) == 0
    assert seen == ["expandable_segments:True"]
