import os
from pathlib import Path

# One intra-op thread in every test process and every process a test starts (engine runs, torchrun, task
# CLIs, the demo, which inherit this environment), set before torch is imported. CI runs four xdist workers
# on two cores: a second OpenMP thread per process only spin-waits between the tiny models' short parallel
# regions and takes the core from another worker. The training helpers (tests/training/sft_helpers.py) set
# the same for their children explicitly; an OMP_NUM_THREADS already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc serves each allocation above 32 MiB with a fresh mmap and unmaps it on free, so every step of the tiny
# models (their 152K-token vocabulary makes logits of hundreds of MB) faults zeroed pages in again: a third
# of a CPU training run went to the kernel. Processes started from here on (the xdist workers, which inherit
# the environment, and every child) keep freed memory in the heap instead. Alone, tests/training/test_overfit.py
# went from 67 to 45 s of CPU, its peak RSS from 1.15 to 1.38 GB. Settings already made win.
os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(4 << 30))

import pytest  # noqa: E402
import torch  # noqa: E402

# The Prefect-layer fixtures (prefect_api, api_env, demo_inputs, ...) are shared by tests/pipelines, tests/tasks,
# tests/integration and tests/test_hub.py.
pytest_plugins = ["prefect_fixtures"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tier by where a test lives and what it starts, so no such test can slip into the fast tier:
    everything under tests/integration/ is slow, and every test that uses the session's Prefect API (a
    server process started by ``prefect_api``) is slow and integration.

    The order is then: tests/integration/ (servers, workers and whole post-train flows: the longest modules),
    the other slow tests, the fast ones (a stable sort). The CI command (README.md) runs ``pytest -n 4 --dist
    loadscope --no-loadscope-reorder``, which hands modules to the workers in this order, so the longest
    modules start first instead of forming the tail of the run. (xdist's default reorder would sort modules by
    their number of tests, and send the one-test server modules last.)"""
    tiers = {}
    for item in items:
        in_integration = INTEGRATION_DIR in Path(str(item.fspath)).resolve().parents
        if in_integration:
            item.add_marker(pytest.mark.slow)
        if "prefect_api" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.integration)
        tiers[item.nodeid] = 0 if in_integration else 1 if item.get_closest_marker("slow") else 2
    items.sort(key=lambda item: tiers[item.nodeid])


@pytest.fixture(autouse=True)
def _fp32_default():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(dtype)
