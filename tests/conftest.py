import os

import pytest
import torch

# The Prefect-layer fixtures (prefect_api, api_env, demo_inputs, ...) are shared by tests/pipelines, tests/tasks,
# tests/integration and tests/test_hub.py.
pytest_plugins = ["prefect_fixtures"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _fp32_default():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(dtype)
