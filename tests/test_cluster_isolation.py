"""No credential where untrusted bytes are decoded, checked on the deployment as it is applied.

The Serve pods decode uploads from anyone who reaches the load balancer. Each check here is on
what `kubectl kustomize cluster` renders with settings filled in (cluster_manifests.kustomize_build)
and on the pods as KubeRay makes them from it: the Serve objects alone in their namespace, both
namespaces enforcing Pod Security `restricted` and every pod passing it, no Kubernetes token in a
Serve worker and the head's only in its autoscaler, and NetworkPolicies around every Ray cluster
that keep the Serve pods from their own Jobs API and from everything outside but DNS, the metadata
server and Google's APIs, and the other clusters from the Serve namespace. Each checker is shown
to catch the mistake it exists for.
"""

import copy
import ipaddress
from typing import Any

import cluster_manifests as manifests
import pytest
import yaml

SETTINGS = manifests.EXAMPLE_SETTINGS
DNS = {("UDP", 53, 53), ("TCP", 53, 53)}
METADATA_SERVER = {  # the GKE metadata server, before and after the node's address translation
    ("169.254.169.254/32", ("TCP", 80, 80)),
    ("169.254.169.252/32", ("TCP", 988, 988)),
}
OPERATOR_NAMESPACE = "kuberay-system"
PROMETHEUS_NAMESPACE = "gmp-system"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict[str, Any]]:
    out = manifests.kustomize_build(tmp_path_factory.mktemp("render"), SETTINGS)
    return list(yaml.safe_load_all(out))


def _kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in kinds]


def _name(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = _kind(docs, "RayService")
    return service


def _pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, str], dict]]:
    """(where, owner, labels, pod spec) for every pod of every Ray cluster."""
    return [
        (f"{_name(doc)} {where}", doc, labels, spec)
        for doc in _kind(docs, *manifests.KUBERAY_KINDS)
        for where, labels, spec in manifests.kuberay_pods(doc)
    ]


# --- namespaces -------------------------------------------------------------------------------


def test_serve_objects_and_only_they_live_in_the_serve_namespace(rendered):
    namespaces = {doc["metadata"]["name"] for doc in _kind(rendered, "Namespace")}
    assert namespaces == {manifests.JOBS_NAMESPACE, manifests.SERVE_NAMESPACE}
    assert manifests.namespace_of(_rayservice(rendered)) == manifests.SERVE_NAMESPACE
    for doc in _kind(rendered, "RayCluster", "RayJob"):
        assert manifests.namespace_of(doc) == manifests.JOBS_NAMESPACE, _name(doc)
    for doc in rendered:
        if doc["kind"] == "Namespace":
            continue
        if doc["kind"] == "PersistentVolume":
            namespace = doc["spec"]["claimRef"]["namespace"]
        else:
            namespace = manifests.namespace_of(doc)
        expected = (
            manifests.SERVE_NAMESPACE if manifests.is_serving(doc) else manifests.JOBS_NAMESPACE
        )
        assert namespace == expected, _name(doc)


def test_serve_pods_name_only_what_their_namespace_holds(rendered):
    """A pod can use ServiceAccounts, claims and Secrets of its own namespace only, so the Serve
    pods' must all be there (setup-gke.sh makes the Secrets)."""
    serve = [d for d in rendered if manifests.namespace_of(d) == manifests.SERVE_NAMESPACE]
    accounts = {d["metadata"]["name"] for d in _kind(serve, "ServiceAccount")}
    claims = {d["metadata"]["name"] for d in _kind(serve, "PersistentVolumeClaim")}
    for where, _, _, spec in _pods([_rayservice(rendered)]):
        assert spec["serviceAccountName"] in accounts, where
        used = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert used <= claims, where
    assert "vitbirds-ray" not in accounts and "vitbirds-bucket" not in claims


def test_every_namespace_enforces_pod_security_restricted(rendered):
    major_minor = "v" + ".".join(manifests.KUBERNETES_VERSION.split(".")[:2])
    for namespace in _kind(rendered, "Namespace"):
        labels = namespace["metadata"]["labels"]
        name = namespace["metadata"]["name"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", (name, mode)
        # Pinned to the version the manifests are validated against: an upgrade of the cluster
        # does not change what is enforced under a running deployment.
        assert labels["pod-security.kubernetes.io/enforce-version"] == major_minor, name


# --- Pod Security restricted ------------------------------------------------------------------


def test_every_pod_passes_the_restricted_profile(rendered):
    pods = _pods(rendered)
    assert {where.split()[-1] for where, *_ in pods} >= {"head", "cpu", "gpu", "submitter"}
    failures = {where: manifests.restricted_violations(spec) for where, _, _, spec in pods}
    assert {where: found for where, found in failures.items() if found} == {}


def test_the_autoscaler_is_checked_like_every_other_container(rendered):
    (head,) = [
        spec for where, _, _, spec in _pods([_rayservice(rendered)]) if where.endswith("head")
    ]
    names = [c["name"] for c in head["containers"]]
    assert names == ["ray-head", "autoscaler"]


def _serve_worker_spec(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    (spec,) = [s for where, _, _, s in _pods([_rayservice(rendered)]) if where.endswith(" cpu")]
    return copy.deepcopy(spec)


@pytest.mark.parametrize(
    ("change", "caught"),
    [
        (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile None"),
        (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser 0"),
        (
            lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
            "allowPrivilegeEscalation",
        ),
        (
            lambda s: s["containers"][0]["securityContext"]["capabilities"].update(
                add=["SYS_ADMIN"]
            ),
            "adds capabilities",
        ),
        (lambda s: s["volumes"].append({"name": "root", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
        (lambda s: s["containers"][0]["ports"][0].update(hostPort=8000), "hostPort"),
    ],
    ids=[
        "privileged",
        "no-seccomp",
        "may-run-as-root",
        "root",
        "escalation",
        "capability",
        "host-path",
        "host-network",
        "host-port",
    ],
)
def test_restricted_check_catches_what_the_profile_refuses(rendered, change, caught):
    spec = _serve_worker_spec(rendered)
    assert manifests.restricted_violations(spec) == []
    change(spec)
    assert any(caught in found for found in manifests.restricted_violations(spec))


# --- Kubernetes tokens ------------------------------------------------------------------------


def _mounts_a_token(spec: dict[str, Any], account: dict[str, Any]) -> list[str]:
    """Where a pod would hold its ServiceAccount's token: mounted by the kubelet, or projected."""
    found = []
    automount = spec.get(
        "automountServiceAccountToken", account.get("automountServiceAccountToken", True)
    )
    if automount is not False:
        found.append("automountServiceAccountToken")
    for volume in spec.get("volumes", []):
        sources = volume.get("projected", {}).get("sources", [])
        if any("serviceAccountToken" in source for source in sources):
            found.append(f"volume {volume['name']}")
    return found


def _accounts(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in _kind(docs, "ServiceAccount")
        if manifests.namespace_of(d) == manifests.SERVE_NAMESPACE
    }


def test_serve_workers_mount_no_kubernetes_token(rendered):
    accounts = _accounts(rendered)
    assert accounts[manifests.SERVE_ACCOUNT]["automountServiceAccountToken"] is False
    for where, _, labels, spec in _pods([_rayservice(rendered)]):
        if labels["ray.io/node-type"] == "worker":
            account = accounts[spec["serviceAccountName"]]
            assert account["metadata"]["name"] == manifests.SERVE_ACCOUNT, where
            assert _mounts_a_token(spec, account) == [], where


def test_token_check_catches_a_worker_that_mounts_one(rendered):
    accounts = _accounts(rendered)
    spec = _serve_worker_spec(rendered)
    account = accounts[manifests.SERVE_ACCOUNT]
    spec.pop("automountServiceAccountToken")
    assert _mounts_a_token(spec, account) == []  # the ServiceAccount's own setting holds
    spec["automountServiceAccountToken"] = True
    assert _mounts_a_token(spec, account) == ["automountServiceAccountToken"]


def test_serve_head_has_its_own_account_and_only_its_autoscaler_holds_the_token(rendered):
    """KubeRay binds the autoscaler Role (patch this namespace's pods and RayClusters) to the
    head's ServiceAccount (ray-operator/controllers/ray/common/rbac.go): a worker must not share
    it, and the head's Ray container, where any worker can run tasks, does not mount it."""
    service = _rayservice(rendered)
    cluster = manifests.ray_cluster_spec(service)
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = {g["template"]["spec"]["serviceAccountName"] for g in cluster["workerGroupSpecs"]}
    assert head["serviceAccountName"] == manifests.SERVE_HEAD_ACCOUNT
    assert manifests.SERVE_HEAD_ACCOUNT not in workers
    account = _accounts(rendered)[manifests.SERVE_HEAD_ACCOUNT]
    assert _mounts_a_token(head, account) == ["volume autoscaler-token"]
    for container in head["containers"]:
        assert "autoscaler-token" not in {m["name"] for m in container.get("volumeMounts", [])}
    mounts = {m["name"]: m for m in cluster["autoscalerOptions"]["volumeMounts"]}
    token = mounts["autoscaler-token"]
    assert token["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert token["readOnly"] is True


# --- NetworkPolicies: coverage ----------------------------------------------------------------


def _policies(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    return [p for p in _kind(docs, "NetworkPolicy") if manifests.namespace_of(p) == namespace]


def _unguarded_pods(docs: list[dict[str, Any]]) -> list[str]:
    """Ray pods that no policy of their namespace selects for ingress, or none for egress."""
    unguarded = []
    for where, owner, labels, _ in _pods(docs):
        selecting = [
            p
            for p in _policies(docs, manifests.namespace_of(owner))
            if manifests.selects(p["spec"]["podSelector"], labels)
        ]
        for direction in ("Ingress", "Egress"):
            if not any(direction in p["spec"]["policyTypes"] for p in selecting):
                unguarded.append(f"{where}: {direction}")
    return unguarded


def test_every_pod_of_every_ray_cluster_is_under_a_network_policy_both_ways(rendered):
    assert _unguarded_pods(rendered) == []


def test_coverage_check_catches_a_cluster_without_a_policy(rendered):
    without = [d for d in rendered if _name(d) != "NetworkPolicy/vitbirds-training"]
    unguarded = _unguarded_pods(without)
    assert unguarded and all("RayJob/" in where for where in unguarded)


# --- NetworkPolicies: the Serve pods ----------------------------------------------------------


def _serve_pod_labels(docs: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [labels for _, _, labels, _ in _pods([_rayservice(docs)])]


def _is_own_pods(peer: dict[str, Any], own: list[dict[str, str]]) -> bool:
    """Whether a peer of a Serve policy is some of the Serve cluster's own pods, and only them."""
    if set(peer) != {"podSelector"}:
        return False
    return any(manifests.selects(peer["podSelector"], labels) for labels in own)


def _peer_namespace(peer: dict[str, Any]) -> str | None:
    """The one namespace a namespaceSelector peer names; None for any other peer."""
    selector = peer.get("namespaceSelector")
    if selector is None or set(peer) != {"namespaceSelector"}:
        return None
    return selector.get("matchLabels", {}).get("kubernetes.io/metadata.name")


def _ranges(rule: dict[str, Any]) -> frozenset[tuple[str, int, int]] | None:
    ranges = manifests.port_ranges(rule)
    return None if ranges is None else frozenset(ranges)


def _serve_policy_violations(docs: list[dict[str, Any]]) -> list[str]:
    """Whatever a Serve policy admits beyond: in, the load balancer's clients on 8000, the
    operator on 8265, Prometheus on 8080 and the cluster's own pods on any port but 8265; out,
    its own pods on any port but 8265, DNS, the metadata server, Google's APIs on 443 and, for
    the head alone, the API server on 443."""
    found = []
    own = _serve_pod_labels(docs)
    google_apis = (SETTINGS["google_apis_cidr"], ("TCP", 443, 443))
    api_server = (SETTINGS["api_server_cidr"], ("TCP", 443, 443))
    for policy in _policies(docs, manifests.SERVE_NAMESPACE):
        name = policy["metadata"]["name"]
        head_only = (
            policy["spec"]["podSelector"].get("matchLabels", {}).get("ray.io/node-type") == "head"
        )
        for rule in policy["spec"].get("ingress", []):
            ranges = _ranges(rule)
            for peer in rule.get("from") or [{}]:
                where = f"{name} ingress from {peer or 'anywhere'} on {ranges or 'every port'}"
                if _is_own_pods(peer, own):
                    if manifests.admits_port(rule, manifests.JOBS_PORT):
                        found.append(where)
                elif "ipBlock" in peer:
                    block = peer["ipBlock"]
                    if (
                        block["cidr"] != SETTINGS["serve_clients_cidr"]
                        or manifests.ip_block_reaches(block, SETTINGS["pod_cidr"])
                        or ranges != {("TCP", 8000, 8000)}
                    ):
                        found.append(where)
                elif (_peer_namespace(peer), ranges) not in {
                    (OPERATOR_NAMESPACE, frozenset({("TCP", 8265, 8265)})),
                    (PROMETHEUS_NAMESPACE, frozenset({("TCP", 8080, 8080)})),
                }:
                    found.append(where)
        for rule in policy["spec"].get("egress", []):
            ranges = _ranges(rule)
            for peer in rule.get("to") or [{}]:
                where = f"{name} egress to {peer or 'anywhere'} on {ranges or 'every port'}"
                if _is_own_pods(peer, own):
                    if manifests.admits_port(rule, manifests.JOBS_PORT):
                        found.append(where)
                elif "ipBlock" in peer:
                    block = peer["ipBlock"]
                    allowed = {*METADATA_SERVER, google_apis, *([api_server] if head_only else [])}
                    listed = ranges is not None and not block.get("except")
                    if not (listed and all((block["cidr"], r) in allowed for r in ranges)):
                        found.append(where)
                elif _peer_namespace(peer) != "kube-system" or ranges is None or not ranges <= DNS:
                    found.append(where)
    return found


def test_serve_policies_admit_only_the_load_balancer_their_cluster_and_the_google_apis(rendered):
    assert _serve_policy_violations(rendered) == []


def _edited(docs: list[dict[str, Any]], name: str, edit) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    (policy,) = [d for d in docs if _name(d) == f"NetworkPolicy/{name}"]
    edit(policy["spec"])
    return docs


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        # A replica reaching its own head's Jobs API, or being reached on it.
        ("vitbirds-serve-internal", lambda s: s["ingress"][0]["ports"][0].update(endPort=8265)),
        ("vitbirds-serve-internal", lambda s: s["egress"][0].pop("ports")),
        # The internet, another namespace, all of Google's addresses, the API server from a worker.
        (
            "vitbirds-serve",
            lambda s: s["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        ),
        ("vitbirds-serve", lambda s: s["egress"].append({"to": [{"namespaceSelector": {}}]})),
        (
            "vitbirds-serve",
            lambda s: s["egress"][3]["to"][0]["ipBlock"].update(cidr="199.36.0.0/16"),
        ),
        (
            "vitbirds-serve",
            lambda s: s["egress"].append(
                {
                    "to": [{"ipBlock": {"cidr": SETTINGS["api_server_cidr"]}}],
                    "ports": [{"port": 443}],
                }
            ),
        ),
        # Clients from the pods' range, or on another port.
        ("vitbirds-serve", lambda s: s["ingress"][0]["from"][0]["ipBlock"].pop("except")),
        ("vitbirds-serve", lambda s: s["ingress"][0]["ports"][0].update(port=8265)),
    ],
    ids=[
        "jobs-port-in",
        "every-port-out",
        "internet",
        "every-namespace",
        "wider-google-range",
        "api-server-from-workers",
        "clients-from-pods",
        "clients-on-jobs-port",
    ],
)
def test_serve_policy_check_catches_what_it_exists_for(rendered, name, edit):
    assert _serve_policy_violations(_edited(rendered, name, edit)) != []


def test_serve_cluster_traffic_rules_are_alone_in_their_policy(rendered):
    """Port ranges (endPort) only in vitbirds-serve-internal: a plugin that ignores endPort, or
    refuses a policy that has one, then closes the Serve cluster instead of opening it."""
    for policy in _kind(rendered, "NetworkPolicy"):
        rules = [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]
        ranged = any("endPort" in port for rule in rules for port in rule.get("ports", []))
        assert ranged == (policy["metadata"]["name"] == "vitbirds-serve-internal"), _name(policy)


# --- NetworkPolicies: the dev and training clusters -------------------------------------------


def _jobs_policy_violations(docs: list[dict[str, Any]]) -> list[str]:
    """Rules by which a dev or training pod could reach a Serve pod."""
    found = []
    serve_namespace = manifests.namespace_labels(manifests.SERVE_NAMESPACE)
    pod_range = SETTINGS["pod_cidr"]
    for policy in _policies(docs, manifests.JOBS_NAMESPACE):
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to") or [{}]:
                where = f"{policy['metadata']['name']} egress to {peer or 'anywhere'}"
                if not peer:
                    found.append(where)
                elif "namespaceSelector" in peer:
                    if manifests.selects(peer["namespaceSelector"], serve_namespace):
                        found.append(where)
                elif "ipBlock" in peer and manifests.ip_block_reaches(peer["ipBlock"], pod_range):
                    found.append(where)
    return found


def test_dev_and_training_pods_cannot_reach_the_serve_namespace(rendered):
    assert _jobs_policy_violations(rendered) == []
    # What they do reach outside the pods' range, on purpose: datasets, package mirrors, the
    # metadata server, the API server, Cloud Storage.
    outside = ipaddress.ip_network("8.8.8.8/32")
    for policy in _policies(rendered, manifests.JOBS_NAMESPACE):
        blocks = [p["ipBlock"] for r in policy["spec"]["egress"] for p in r["to"] if "ipBlock" in p]
        assert any(manifests.ip_block_reaches(b, str(outside)) for b in blocks), policy["metadata"][
            "name"
        ]


@pytest.mark.parametrize(
    "peer",
    [
        {"namespaceSelector": {}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vitbirds-serve"}}},
        {"ipBlock": {"cidr": "0.0.0.0/0"}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.4.0.0/16"]}},
    ],
    ids=["every-namespace", "serve-namespace", "no-except", "except-too-small"],
)
def test_jobs_policy_check_catches_a_way_into_the_serve_namespace(rendered, peer):
    docs = _edited(rendered, "vitbirds-dev", lambda s: s["egress"].append({"to": [peer]}))
    assert _jobs_policy_violations(docs) != []
