"""Flow parameters: unknown keys are refused (by the models and by the server when a run is created), and every
top-level parameter of the deployed flows has a description in the schema the API serves."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.params import Launch, ModelSource, StageConfig


@pytest.mark.parametrize("model,fields,typo", [
    (Launch, {"nproc_per_nod": 1}, "nproc_per_nod"),
    (StageConfig, {"config": "sft.yaml", "overides": ["epochs=1"]}, "overides"),
    (ModelSource, {"source": "Qwen/Qwen3-8B", "output_dir": "/m", "revison": "main"}, "revison"),
])
def test_parameter_models_refuse_unknown_keys(model: type, fields: dict, typo: str) -> None:
    with pytest.raises(ValidationError, match=f"{typo}\n  Extra inputs are not permitted"):
        model(**fields)


def _deploy(flow, pool: str) -> str:
    """Register ``flow`` as a deployment on ``pool`` through the API; returns the deployment id."""
    return str(flow.to_deployment(name="schema-check", work_pool_name=pool).apply())


@pytest.mark.slow
@pytest.mark.integration
def test_deployment_schema_has_descriptions_and_refuses_unknown_keys(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError

    from pipelines.demo import demo_parameters
    from pipelines.dpo import dpo
    from pipelines.post_train import post_train
    from pipelines.sft import sft

    pool = "schema-check-pool"
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
        ids = {f.name: _deploy(f, pool) for f in (post_train, sft, dpo)}
        for name, deployment_id in ids.items():
            schema = client.read_deployment(deployment_id).parameter_openapi_schema
            missing = [key for key, prop in schema["properties"].items() if not prop.get("description")]
            assert not missing, f"{name}: no description for {missing}"
        post_train_schema = client.read_deployment(ids["post-train"]).parameter_openapi_schema
        assert {"model", "sft_stage", "dpo_stage", "export_dir", "launch", "precompute_reference"} <= set(
            post_train_schema["properties"])

        params = demo_parameters(tmp_path, {"model_source": (tmp_path / "m").as_uri(), "sft_data": "sft.jsonl",
                                            "preference_data": "preference.jsonl"})
        accepted = client.create_flow_run_from_deployment(ids["post-train"], parameters=params)
        client.delete_flow_run(accepted.id)  # nothing would run it: no worker polls this pool
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(ids["post-train"],
                                                   parameters={**params, "launch": {"nproc_per_nod": 1}})
    assert refused.value.response.status_code == 409
    assert "nproc_per_nod" in refused.value.response.text, refused.value.response.text
