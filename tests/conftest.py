import os
from pathlib import Path

import pytest
import torch

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

    Slow tests are moved to the front (a stable sort), so under ``pytest -n N --dist loadscope`` (the CI
    command) the longest modules start first instead of forming the tail of the run."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
        if "prefect_api" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _fp32_default():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(dtype)
