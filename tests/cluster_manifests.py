"""The deployment files under cluster/, loaded once for the test_cluster_* files.

What kustomization.yaml deploys, the Ray clusters, pods and containers inside the KubeRay objects,
and cluster/render_rayservice.py imported by path (cluster/ is not a package).
"""

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from vitbirds.paths import repo_root

REPO = repo_root()
CLUSTER = REPO / "cluster"
APP_DIR = "/home/ray/app"  # where the Dockerfile puts the checkout
MOUNT = "/mnt/vitbirds"  # where every Ray pod sees the bucket
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
SERVE_ACCOUNT = "vitbirds-serve"

Document = tuple[str, dict[str, Any]]  # (file name under cluster/, object)


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_rayservice = _load_module(CLUSTER / "render_rayservice.py")


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())


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


def ingress_rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """A NetworkPolicy's ingress rules, refusing a rule that admits every source."""
    rules = policy["spec"].get("ingress", [])
    if not all(rule.get("from") for rule in rules):
        raise AssertionError("a rule without `from` admits everyone")
    return rules
