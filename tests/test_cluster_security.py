"""What an attacker could reach in the cloud deployment, checked from the manifests alone.

Token authentication on every Ray cluster (and a token of its own for the one serving the
internet), non-root containers without capabilities and with limits, no Ray control port behind
a LoadBalancer or NodePort, and the blast radius of the Serve pods that decode uploads: their own
service account, a read-only model mount, the write token from a Secret, and a NetworkPolicy that
admits only the load balancer's clients on port 8000 and keeps the other clusters' pods apart.
"""

import copy
import re
from typing import Any

import cluster_manifests as manifests
import pytest

RAY_CONTROL_PORTS = {6379, 8265, 10001}  # GCS, dashboard + Jobs API, Ray client
SHARED_TOKEN = "vitbirds-ray-token"  # the dev and training clusters'
HAPROXY_PORTS = {8404, 9101}  # Serve's HAProxy: stats page, Prometheus exporter


# --- Ray clusters: tokens and containers ------------------------------------------------------


@pytest.mark.parametrize(
    "item", manifests.of_kind(*manifests.KUBERAY_KINDS), ids=manifests.object_id
)
def test_ray_cluster_has_token_auth_and_the_image_ray_version(item):
    _, doc = item
    cluster = manifests.ray_cluster_spec(doc)
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["authOptions"]["secretName"]
    ray_version = re.search(
        r"^ARG RAY_VERSION=(\S+)$", (manifests.REPO / "Dockerfile").read_text(), re.M
    )
    assert cluster["rayVersion"] == ray_version.group(1)


def test_the_serve_cluster_has_a_ray_token_of_its_own():
    tokens = {
        doc["metadata"]["name"]: manifests.ray_cluster_spec(doc)["authOptions"]["secretName"]
        for _, doc in manifests.of_kind(*manifests.KUBERAY_KINDS)
    }
    serve_token = tokens.pop(manifests.rayservice()["metadata"]["name"])
    assert set(tokens.values()) == {SHARED_TOKEN}
    assert serve_token != SHARED_TOKEN


@pytest.mark.parametrize(
    "item", manifests.of_kind(*manifests.KUBERAY_KINDS), ids=manifests.object_id
)
def test_containers_run_as_non_root_with_limits(item):
    _, doc = item
    found = list(manifests.ray_containers(doc))
    autoscaler = (manifests.ray_cluster_spec(doc).get("autoscalerOptions") or {}).copy()
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


def test_every_rayservice_pod_reads_the_write_token_from_a_secret_not_the_manifest():
    for where, _, container in manifests.ray_containers(manifests.rayservice()):
        env = {e["name"]: e for e in container.get("env", [])}
        token = env["VITBIRDS_WRITE_TOKEN"]
        assert "value" not in token, where
        assert token["valueFrom"]["secretKeyRef"]["name"] == "vitbirds-write-token", where


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
    if doc["kind"] in manifests.KUBERAY_KINDS:
        head = manifests.ray_cluster_spec(doc)["headGroupSpec"]
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


@pytest.mark.parametrize("item", manifests.DOCUMENTS, ids=manifests.object_id)
def test_no_load_balancer_or_node_port_exposes_ray_control_ports(item):
    _, doc = item
    assert _exposed_control_ports(doc) == []


def test_exposure_check_catches_a_public_dashboard():
    ((_, cluster),) = manifests.of_kind("RayCluster")
    public = copy.deepcopy(cluster)
    public["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert "headGroupSpec:8265" in _exposed_control_ports(public)


def test_serve_is_reachable_only_on_its_http_port():
    serve = manifests.rayservice()["spec"]["serveService"]["spec"]
    assert [p["port"] for p in serve["ports"]] == [8000]


# --- blast radius of the pods that decode uploads ----------------------------------------------


def _serve_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(group, t["spec"]) for group, t in manifests.ray_pod_templates(manifests.rayservice())]


def _other_pod_labels() -> list[dict[str, str]]:
    """The labels of every pod of the dev and training clusters."""
    return [
        template["metadata"].get("labels", {})
        for _, doc in manifests.of_kind("RayCluster", "RayJob")
        for _, template in manifests.ray_pod_templates(doc)
    ]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is interpreted here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _serve_policy() -> dict[str, Any]:
    ((_, policy),) = manifests.of_kind("NetworkPolicy")
    return policy


def _rule_ports(rule: dict[str, Any]) -> set[int] | None:
    """The ports a rule admits; None for every port."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


def test_serve_pods_run_as_their_own_account_that_cannot_touch_the_whole_bucket():
    for group, spec in _serve_pod_specs():
        assert spec["serviceAccountName"] == manifests.SERVE_ACCOUNT, group
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert "vitbirds-bucket" not in claims, group
    script = (manifests.CLUSTER / "setup-gke.sh").read_text()
    grants = re.findall(r"--member \"\$serve_member\" --role (\S+)", script)
    assert grants and set(grants) <= {"roles/storage.objectViewer", "roles/storage.objectUser"}


def test_serve_pods_read_the_models_prefix_read_only():
    volumes = {doc["metadata"]["name"]: doc for _, doc in manifests.of_kind("PersistentVolume")}
    for group, spec in _serve_pod_specs():
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        models = mounts[f"{manifests.MOUNT}/models"]
        assert models.get("readOnly") is True, group
        (volume,) = [v for v in spec["volumes"] if v["name"] == models["name"]]
        claim = volume["persistentVolumeClaim"]
        assert claim.get("readOnly") is True, group
        pv = volumes[claim["claimName"]]["spec"]
        assert pv["csi"]["readOnly"] is True and pv["accessModes"] == ["ReadOnlyMany"]
        assert "only-dir=models" in pv["mountOptions"]
        writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
        assert {m["mountPath"] for m in writable} <= {
            f"{manifests.MOUNT}/predictions",
            "/dev/shm",
        }, group


def test_serve_pods_take_the_feedback_write_token_from_a_secret():
    for where, _, container in manifests.ray_containers(manifests.rayservice()):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["VITBIRDS_WRITE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], where


def test_network_policy_covers_every_serve_pod_and_no_other():
    selector = _serve_policy()["spec"]["podSelector"]
    for group, template in manifests.ray_pod_templates(manifests.rayservice()):
        assert _selects(selector, template["metadata"]["labels"]), group
    assert not any(_selects(selector, labels) for labels in _other_pod_labels())
    assert set(_serve_policy()["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_only_the_load_balancers_clients_reach_port_8000_from_outside():
    rules = manifests.ingress_rules(_serve_policy())
    from_outside = [r for r in rules if any("ipBlock" in peer for peer in r["from"])]
    (rule,) = from_outside
    assert _rule_ports(rule) == {8000}
    (peer,) = rule["from"]
    assert peer["ipBlock"]["except"], "the pods' own range never counts as a client"
    assert (
        manifests.rayservice()["spec"]["serveService"]["spec"]["externalTrafficPolicy"] == "Local"
    )


def test_pods_of_other_clusters_are_kept_out_and_in():
    policy = _serve_policy()
    others = _other_pod_labels()
    peers = [peer for rule in manifests.ingress_rules(policy) for peer in rule["from"]]
    peers += [peer for rule in policy["spec"]["egress"] for peer in rule["to"]]
    for peer in peers:
        if "podSelector" in peer:
            assert "namespaceSelector" not in peer
            assert not any(_selects(peer["podSelector"], labels) for labels in others), peer
        if "namespaceSelector" in peer:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert namespace != manifests.kustomization()["namespace"], peer
        if "ipBlock" in peer:
            assert peer["ipBlock"].get("except"), f"{peer} would include the pods' range"


def test_haproxy_stats_and_metrics_ports_are_not_exposed():
    for where, _, container in manifests.ray_containers(manifests.rayservice()):
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert not ports & HAPROXY_PORTS, where
    serve = manifests.rayservice()["spec"]["serveService"]["spec"]
    assert not {p["port"] for p in serve["ports"]} & HAPROXY_PORTS
    for rule in manifests.ingress_rules(_serve_policy()):
        own_pods_only = all("podSelector" in peer for peer in rule["from"])
        ports = _rule_ports(rule)
        assert own_pods_only or (ports is not None and not ports & HAPROXY_PORTS), rule


def test_network_policy_check_catches_an_open_rule():
    policy = copy.deepcopy(_serve_policy())
    policy["spec"]["ingress"].append({"ports": [{"port": 8404}]})
    with pytest.raises(AssertionError, match="admits everyone"):
        manifests.ingress_rules(policy)
