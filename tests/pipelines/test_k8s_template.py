"""The Kubernetes work pool's base job template (deployments/k8s/base-job-template.json), checked with the
code that will consume it: Prefect's server-side work-pool validation, the kubernetes worker's own job
configuration (prefect-kubernetes: rendering, manifest validation, flow-run preparation), and the launcher's
rendezvous resolution on every pod of the rendered job."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import REPO
from tasks._rendezvous import resolve_rendezvous

pytest.importorskip("prefect_kubernetes")

TEMPLATE = REPO / "deployments" / "k8s" / "base-job-template.json"
CLUSTER_SETUP = REPO / "deployments" / "k8s" / "cluster-setup.yaml"
SAMPLE = {"image": "registry.example.com/mirotrain:1.2", "nodes": 4, "gpus_per_node": 8, "namespace": "training",
          "env": {"HF_HOME": "/shared/hf"}, "rdzv_timeout_s": "120", "name": "tall-otter"}


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _render(values: dict) -> dict:
    """The Job manifest the worker would submit for a flow run with these job variables."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from prefect.utilities.templating import apply_values

    # What BaseJobConfiguration.from_template_and_values does, minus resolving {{ prefect.blocks/variables }}
    # references (the template has none, and resolving them needs an API).
    template = _template()
    variables = KubernetesWorkerJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    config = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"], {**variables, **values}))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="tall-otter", flow_id=uuid.uuid4()))
    return config.job_manifest


def test_template_passes_prefects_work_pool_validation() -> None:
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorker

    template = _template()
    WorkPoolCreate(name="mirotrain-k8s", type="kubernetes", base_job_template=template)  # every {{ var }} declared
    jsonschema.Draft7Validator.check_schema(template["variables"])
    jsonschema.validate(SAMPLE, template["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**SAMPLE, "nodes": 0}, template["variables"])
    # the worker's job configuration keys, no more and no fewer than the worker's own default template
    assert template["job_configuration"].keys() == KubernetesWorker.get_default_base_job_template()[
        "job_configuration"].keys()


def test_rendered_job_is_one_indexed_job_with_one_pod_per_node() -> None:
    manifest = _render(SAMPLE)
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == SAMPLE["image"] and container["resources"]["limits"]["nvidia.com/gpu"] == 8
    # every pod enters through the node agent; the worker's flow-run command is what node 0 runs
    assert container["command"] == ["python", "-m", "tasks.node_agent", "--"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = container["env"]
    names = [e["name"] for e in env]
    assert {"PREFECT__FLOW_RUN_ID", "HF_HOME", "PET_NNODES", "NODE_RANK", "MASTER_ADDR",
            "MIROTRAIN_LAUNCH_DIR"} <= set(names)
    assert all(isinstance(e["value"], str) for e in env if "value" in e), "Kubernetes env values must be strings"
    # $(JOB_NAME) is expanded by the kubelet only when JOB_NAME comes earlier in the list
    assert all(names.index("JOB_NAME") < i for i, e in enumerate(env) if "$(JOB_NAME)" in e.get("value", ""))
    # with backoffLimit 0 the worker asks the flow run to reschedule itself when pod 0 is evicted
    assert {"name": "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR", "value": "reschedule"} in env
    assert {"name": "MIROTRAIN_RDZV_TIMEOUT_S", "value": "120"} in env
    assert manifest["metadata"]["namespace"] == "training" and manifest["metadata"]["generateName"] == "tall-otter-"


def _pod_env(container: dict, job_name: str, index: int) -> dict[str, str]:
    """The environment pod ``index`` sees: downward-API fields filled in, ``$(VAR)`` expanded in order."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        else:
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            env[entry["name"]] = {"metadata.labels['job-name']": job_name,
                                  "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index)}[path]
    return env


def test_every_pod_of_the_rendered_job_resolves_the_same_rendezvous() -> None:
    manifest = _render(SAMPLE)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    job = "tall-otter-x7k2q"  # what Kubernetes makes of generateName
    service = yaml.safe_load_all(CLUSTER_SETUP.read_text()).__next__()
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= manifest["spec"]["template"]["metadata"]["labels"].items()
    for index in range(4):
        env = _pod_env(container, job, index)
        r = resolve_rendezvous(env=env)
        assert (r.nnodes, r.node_rank, r.master_addr, r.timeout_s) == (4, index, f"{job}-0.mirotrain-nodes", 120)
        assert r.master_port == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
        assert env["MIROTRAIN_LAUNCH_DIR"] == f"/shared/.mirotrain-launch/{job}"
        assert Path(env["MIROTRAIN_LAUNCH_DIR"]).is_relative_to(container["volumeMounts"][0]["mountPath"])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_operator_creates_the_pool_with_the_documented_command(api_env: dict) -> None:
    """`prefect work-pool create --type kubernetes --base-job-template ...` against a real server keeps the template."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client

    cmd = [str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "mirotrain-k8s", "--type",
           "kubernetes", "--base-job-template", str(TEMPLATE)]
    created = subprocess.run(cmd, env=api_env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert created.returncode == 0, created.stdout + created.stderr
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("mirotrain-k8s")
    assert pool.type == "kubernetes" and pool.base_job_template == _template()
