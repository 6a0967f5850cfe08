"""What an attacker could reach in the cloud deployment, checked from the manifests alone.

Token authentication on every Ray cluster (and a token of its own for the one serving the
internet), non-root containers without capabilities and with limits, no Ray control port behind
a LoadBalancer or NodePort, and the blast radius of the Serve pods that decode uploads: their own
service accounts, a read-only model mount, the write token from a Secret, and a NetworkPolicy that
admits only the load balancer's clients on port 8000 and keeps the other clusters' pods apart.
Namespaces, Kubernetes tokens, Pod Security and every cluster's NetworkPolicies, checked on the
rendered deployment, are in test_cluster_isolation.py.
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


@pytest.mark.parametrize(
    ("variable", "secret"),
    [("VITBIRDS_WRITE_TOKEN", "vitbirds-write-token"), ("VITBIRDS_API_KEYS", "vitbirds-api-keys")],
)
def test_serve_workers_read_the_write_token_and_api_keys_from_secrets(variable, secret):
    """The write token guards /feedback; the API keys turn on keys and rate limits for
    /predict and /explain (serve/access.py), which the README's local mode leaves off."""
    for where, _, container in manifests.ray_containers(manifests.rayservice()):
        if where.startswith("head/"):
            continue
        env = {e["name"]: e for e in container.get("env", [])}
        assert "value" not in env[variable], where
        assert env[variable]["valueFrom"]["secretKeyRef"]["name"] == secret, where


def test_serve_head_holds_neither_the_write_token_nor_the_prediction_log():
    """The Ingress checks the one and appends to the other, and it never runs on the head (no
    CPUs there), where any worker's tasks can run."""
    (head,) = [spec for group, spec in _serve_pod_specs() if group == "head"]
    (container,) = head["containers"]
    env = {e["name"] for e in container.get("env", [])}
    assert not env & {"VITBIRDS_WRITE_TOKEN", "VITBIRDS_API_KEYS", "VITBIRDS_PREDICTION_LOG"}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in head["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"vitbirds-models"}


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


def _serve_policy() -> dict[str, Any]:
    """The Serve pods' policy with the ways in from outside their cluster."""
    (policy,) = [
        p
        for _, p in manifests.of_kind("NetworkPolicy")
        if p["metadata"]["name"] == "vitbirds-serve"
    ]
    return policy


def _serve_policies() -> list[dict[str, Any]]:
    return [
        policy
        for _, policy in manifests.of_kind("NetworkPolicy")
        if manifests.namespace_of(policy) == manifests.SERVE_NAMESPACE
    ]


def _rule_ports(rule: dict[str, Any]) -> set[int] | None:
    """The ports a rule admits; None for every port."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


def test_serve_pods_run_as_their_own_accounts_that_cannot_touch_the_whole_bucket():
    for group, spec in _serve_pod_specs():
        own = manifests.SERVE_HEAD_ACCOUNT if group == "head" else manifests.SERVE_ACCOUNT
        assert spec["serviceAccountName"] == own, group
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert "vitbirds-bucket" not in claims, group
    script = (manifests.CLUSTER / "setup-gke.sh").read_text()
    grants = re.findall(r"--member \"\$(?:serve|head)_member\" --role (\S+)", script)
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


def test_network_policy_covers_every_serve_pod_and_no_other():
    selector = _serve_policy()["spec"]["podSelector"]
    for group, template in manifests.ray_pod_templates(manifests.rayservice()):
        assert manifests.selects(selector, template["metadata"]["labels"]), group
    assert not any(manifests.selects(selector, labels) for labels in _other_pod_labels())
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
    # The address ranges are checked once settings.env is filled in: test_cluster_isolation.py.
    others = _other_pod_labels()
    peers = []
    for policy in _serve_policies():
        peers += [peer for rule in manifests.ingress_rules(policy) for peer in rule["from"]]
        peers += [peer for rule in policy["spec"].get("egress", []) for peer in rule["to"]]
    for peer in peers:
        if "podSelector" in peer:
            assert "namespaceSelector" not in peer
            assert not any(manifests.selects(peer["podSelector"], labels) for labels in others), (
                peer
            )
        if "namespaceSelector" in peer:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            assert namespace != manifests.JOBS_NAMESPACE, peer


def test_haproxy_stats_and_metrics_ports_are_not_exposed():
    for where, _, container in manifests.ray_containers(manifests.rayservice()):
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert not ports & HAPROXY_PORTS, where
    serve = manifests.rayservice()["spec"]["serveService"]["spec"]
    assert not {p["port"] for p in serve["ports"]} & HAPROXY_PORTS
    for policy in _serve_policies():
        for rule in manifests.ingress_rules(policy):
            own_pods_only = all(set(peer) == {"podSelector"} for peer in rule["from"])
            ports = _rule_ports(rule)
            assert own_pods_only or (ports is not None and not ports & HAPROXY_PORTS), rule


def test_network_policy_check_catches_an_open_rule():
    policy = copy.deepcopy(_serve_policy())
    policy["spec"]["ingress"].append({"ports": [{"port": 8404}]})
    with pytest.raises(AssertionError, match="admits everyone"):
        manifests.ingress_rules(policy)
