"""The KubeRay and Kubernetes manifests under cluster/, checked as data without a cluster.

The KubeRay objects against the vendored v1.7 CRDs' schemas (unknown fields rejected), the core
objects against Kubernetes' own, the metrics scraping, the Serve config the RayService embeds, the
scripts, flags and paths the RayJobs run, and the shape of the Ray clusters: idle heads, GPU
workers, the bucket mount. Security is in test_cluster_security.py and test_cluster_isolation.py,
the image, the render script, CI and the setup script in test_cluster_build.py; cluster/README.md
lists what remains unverified.
"""

import copy
import gzip
import itertools
import json
import re
import shlex
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml
from cluster_manifests import (
    APP_DIR,
    CLUSTER,
    DOCUMENTS,
    KUBERAY_KINDS,
    KUBERNETES_VERSION,
    MOUNT,
    REPO,
    kustomization,
    namespace_of,
    object_id,
    of_kind,
    ray_cluster_spec,
    ray_containers,
    ray_pod_templates,
    rayservice,
    render_rayservice,
)

KUBERAY_SCHEMAS = CLUSTER / "crds" / "kuberay-v1.7.schemas.json.gz"
CORE_KINDS = {
    "Namespace",
    "ServiceAccount",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Service",
    "NetworkPolicy",
}


# --- schemas ----------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever it lists the known ones.

    The API server prunes fields a CRD does not know instead of rejecting them, so a misspelled
    field (or one from a newer KubeRay) would vanish silently on a real cluster; here it fails.
    """
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def crd_validators():
    """KubeRay v1.7's `ray.io/v1` schemas, vendored in cluster/crds, one per kind."""
    validators = {
        kind: jsonschema.Draft4Validator(_closed(schema))
        for kind, schema in json.loads(gzip.decompress(KUBERAY_SCHEMAS.read_bytes())).items()
    }
    assert set(validators) >= KUBERAY_KINDS, f"missing: {KUBERAY_KINDS - set(validators)}"
    return validators


def _schema_errors(validators, doc: dict[str, Any]) -> list[str]:
    errors = validators[doc["kind"]].iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors]


def test_kustomization_deploys_every_manifest_in_cluster():
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in CLUSTER.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("item", of_kind(*KUBERAY_KINDS), ids=object_id)
def test_kuberay_objects_validate_against_the_v1_7_crds(crd_validators, item):
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert _schema_errors(crd_validators, doc) == []


def test_crd_validation_rejects_a_misspelled_field(crd_validators):
    _, cluster = of_kind("RayCluster")[0]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["serviceTyp"] = "LoadBalancer"
    assert any("serviceTyp" in error for error in _schema_errors(crd_validators, typo))


@pytest.mark.parametrize("item", of_kind(*CORE_KINDS), ids=object_id)
def test_core_objects_validate_against_the_kubernetes_schema(item):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, doc = item
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_object_kind_is_validated_somewhere():
    # PodMonitoring (Google Managed Prometheus) has no schema here: its own test checks it.
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert kinds <= KUBERAY_KINDS | CORE_KINDS | {"PodMonitoring"}


def test_podmonitoring_scrapes_the_metrics_port_of_every_ray_pod():
    # A PodMonitoring selects pods of its own namespace: one wherever a Ray cluster runs.
    monitors = {namespace_of(monitor): monitor for _, monitor in of_kind("PodMonitoring")}
    for _, doc in of_kind(*KUBERAY_KINDS):
        monitor = monitors[namespace_of(doc)]
        assert monitor["apiVersion"] == "monitoring.googleapis.com/v1"
        # KubeRay puts this label on every Ray pod it creates, whichever CR owns the cluster.
        assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
        (endpoint,) = monitor["spec"]["endpoints"]
        for where, _, container in ray_containers(doc):
            if where.startswith("submitter"):
                continue
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert ports.get(endpoint["port"]) == 8080, f"{doc['metadata']['name']} {where}"


# --- Serve ------------------------------------------------------------------------------------


def test_serve_config_v2_parses_with_serve_deploy_schema():
    schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    deploy = schema.ServeDeploySchema.model_validate(config)
    assert [app.import_path for app in deploy.applications] == ["serve.app:app"]


def test_serve_config_v2_is_serve_config_yaml_rendered_for_the_cluster():
    source = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    expected = render_rayservice.render(source, render_rayservice.ClusterTarget())
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert embedded == expected, (
        "serve/config.yaml changed: run python cluster/render_rayservice.py"
    )
    assert render_rayservice.main(["--check"]) == 0


def test_every_rayservice_pod_runs_serve_in_the_benchmarked_throughput_mode():
    from serve.testing import SERVE_MODES

    for where, _, container in ray_containers(rayservice()):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert SERVE_MODES["haproxy"].items() <= env.items(), where


def test_serve_import_path_names_a_module_in_the_repo():
    config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    for app in config["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        assert attribute, app["import_path"]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), app["import_path"]


# --- RayJobs ----------------------------------------------------------------------------------

RAYJOBS = of_kind("RayJob")


def _entrypoint(doc: dict[str, Any]) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def _flag_values(argv: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in itertools.pairwise(argv) if flag.startswith("--")}


@pytest.mark.parametrize("item", RAYJOBS, ids=object_id)
def test_rayjob_entrypoint_runs_a_script_of_this_repo(item):
    _, job = item
    python, script, *_ = _entrypoint(job)
    assert python == "python"
    assert script.startswith(f"{APP_DIR}/"), script
    assert (REPO / script.removeprefix(f"{APP_DIR}/")).is_file(), f"{script} is not in the repo"


@pytest.mark.parametrize("item", RAYJOBS, ids=object_id)
def test_rayjob_entrypoint_flags_are_ones_the_script_accepts(item):
    _, job = item
    _, script, *args = _entrypoint(job)
    local = REPO / script.removeprefix(f"{APP_DIR}/")
    if not local.is_file():
        pytest.skip(f"{local} does not exist yet (the entrypoint test fails for it)")
    help_text = subprocess.run(
        [sys.executable, str(local), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    unknown = [
        a
        for a in args
        if a.startswith("--") and not re.search(rf"(?<![\w-]){a}(?![\w-])", help_text)
    ]
    assert unknown == [], f"{local.name} --help does not list {unknown}"


@pytest.mark.parametrize("item", RAYJOBS, ids=object_id)
def test_rayjob_cleans_up_and_cannot_run_forever(item):
    _, job = item
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1, "a lost head should retry the job, which then resumes"


@pytest.mark.parametrize("item", RAYJOBS, ids=object_id)
def test_rayjob_reads_and_writes_only_on_the_bucket_mount(item):
    _, job = item
    paths = {
        flag: value
        for flag, value in _flag_values(_entrypoint(job)).items()
        if flag in {"--data-dir", "--input", "--model", "--storage-path", "--output", "--out",
                    "--summary", "--export-dir"}
    }  # fmt: skip
    reads, writes = (
        {"--data-dir", "--input"} & set(paths),
        {"--storage-path", "--output"} & set(paths),
    )
    assert reads and writes
    outside = {flag: value for flag, value in paths.items() if not value.startswith(f"{MOUNT}/")}
    assert outside == {}, "these would be lost with the pod, and a retry could not resume"


def test_only_rayjobs_are_labelled_training():
    # Cloud Build applies everything except component=training: applying a RayJob starts a run.
    for _, doc in DOCUMENTS:
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        assert (component == "training") == (doc["kind"] == "RayJob"), object_id(("", doc))


# --- Ray clusters -----------------------------------------------------------------------------
@pytest.mark.parametrize("item", of_kind(*KUBERAY_KINDS), ids=object_id)
def test_ray_head_runs_no_workloads(item):
    _, doc = item
    head = ray_cluster_spec(doc)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize("item", of_kind("RayCluster", "RayJob"), ids=object_id)
def test_ray_pods_mount_the_bucket_with_workload_identity_and_a_sized_shm(item):
    _, doc = item
    for group, template in ray_pod_templates(doc):
        spec = template["spec"]
        assert template["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true", group
        assert spec["serviceAccountName"] == "vitbirds-ray", group
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"] == "vitbirds-bucket"
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], group


@pytest.mark.parametrize("item", of_kind(*KUBERAY_KINDS), ids=object_id)
def test_gpu_workers_ask_for_a_gpu_on_gpu_nodes(item):
    _, doc = item
    groups = {g["groupName"]: g for g in ray_cluster_spec(doc)["workerGroupSpecs"]}
    if doc["kind"] == "RayJob" and "--use-gpu" not in _entrypoint(doc):
        assert "gpu" not in groups, "a CPU job holding GPU nodes"
        return
    gpu = groups["gpu"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    spec = gpu["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def test_interactive_cluster_autoscales_a_cpu_and_a_gpu_group():
    ((_, cluster),) = of_kind("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]
    assert groups["cpu"]["minReplicas"] < groups["cpu"]["maxReplicas"]
