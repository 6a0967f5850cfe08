"""Render the RayService's serveConfigV2 from serve/config.yaml.

serve/config.yaml is the one description of the Serve application: `serve run` and `serve deploy`
use it as it is. The cluster runs the same applications with two differences, and this script
writes that variant into cluster/rayservice.yaml, leaving the rest of the file (comments
included) untouched:

- the model directory: a path under the Serve pods' read-only models mount
  (/mnt/vitbirds/models, see cluster/serve-access.yaml) instead of the local `models/latest`;
- the Classifier replicas ask for a GPU, or explicitly none when rendered for CPU;
- optionally the model version's content digest (`--model-sha256`, what
  `vitbirds.lifecycle.store.content_digest` prints for the directory): the deployment then
  refuses any other content at that path instead of serving it.

Serve resolves the model directory to one immutable version each time the config is deployed;
every replica, including those autoscaling adds later, loads that version. A new model therefore
reaches the cluster only through a config change that KubeRay applies (a RayService upgrade):

    python cluster/render_rayservice.py                   # after editing serve/config.yaml
    python cluster/render_rayservice.py --check           # exit 1 when rayservice.yaml is stale
    python cluster/render_rayservice.py --model-dir /mnt/vitbirds/models/v7 \
        --model-sha256 DIGEST                             # roll out (and pin) a model version

Needs only PyYAML, so Cloud Build can run it in a plain Python image.
"""

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "serve" / "config.yaml"
DEFAULT_MANIFEST = REPO_ROOT / "cluster" / "rayservice.yaml"
DEFAULT_MODEL_DIR = "/mnt/vitbirds/models/latest"
# The deployment that holds the model for predictions; only it is worth a GPU. The explainer is
# one replica on CPU, so an idle GPU is not held for occasional /explain calls.
GPU_DEPLOYMENT = "Classifier"
# The laptop config keeps two one-thread Classifier replicas busy on two cores; on the cluster
# each replica holds a GPU, so one stays warm and the autoscaler adds the others under load.
GPU_MIN_REPLICAS = 1

# `serveConfigV2: |` and the block under it: lines indented deeper than the key, or blank.
_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)serveConfigV2:[ \t]*\|[-+]?[ \t]*\n"
    r"(?P<body>(?:(?:(?P=indent)[ \t]+.*)?\n)*)",
    re.MULTILINE,
)


class RenderError(ValueError):
    """serve/config.yaml or rayservice.yaml does not have the shape the rendering needs."""


@dataclass(frozen=True)
class ClusterTarget:
    """What differs between the laptop's Serve config and the cluster's."""

    model_dir: str = DEFAULT_MODEL_DIR  # where Serve replicas read the exported model
    accelerator: Literal["gpu", "cpu"] = "gpu"  # whether Classifier replicas ask for a GPU
    gpus_per_replica: float = 1.0  # below 1 packs several replicas on one GPU
    model_sha256: str | None = None  # pins the version served from model_dir


def render(config: dict[str, Any], target: ClusterTarget) -> dict[str, Any]:
    """The cluster variant of a Serve config; the input is not modified."""
    rendered = copy.deepcopy(config)
    applications = rendered.get("applications") or []
    if not applications:
        raise RenderError("serve config has no applications to render")
    gpu_deployments = 0
    for app in applications:
        args = app.setdefault("args", {})
        args["model_dir"] = target.model_dir
        if target.model_sha256:
            args["model_sha256"] = target.model_sha256
        for deployment in app.get("deployments") or []:
            if deployment.get("name") != GPU_DEPLOYMENT:
                continue
            gpu_deployments += 1
            options = deployment.setdefault("ray_actor_options", {})
            if target.accelerator == "gpu":
                options["num_gpus"] = target.gpus_per_replica
                if "autoscaling_config" in deployment:
                    deployment["autoscaling_config"]["min_replicas"] = GPU_MIN_REPLICAS
            else:
                options.pop("num_gpus", None)
    if target.accelerator == "gpu" and gpu_deployments == 0:
        names = [d.get("name") for app in applications for d in app.get("deployments") or []]
        raise RenderError(f"no deployment named {GPU_DEPLOYMENT!r} to give a GPU; found {names}")
    return rendered


def dump(config: dict[str, Any]) -> str:
    """YAML text for a Serve config, keys in the source's order."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)


def replace_serve_config(manifest: str, serve_config: str) -> str:
    """`manifest` with its serveConfigV2 block replaced by `serve_config`."""
    match = _BLOCK.search(manifest)
    if match is None:
        raise RenderError("no `serveConfigV2: |` block in the RayService manifest")
    key_indent = match.group("indent")
    body = "".join(
        f"{key_indent}  {line}\n" if line else "\n" for line in serve_config.splitlines()
    )
    block = f"{key_indent}serveConfigV2: |\n{body}"
    return manifest[: match.start()] + block + manifest[match.end() :]


def serve_config_of(manifest: str) -> dict[str, Any]:
    """The Serve config embedded in a RayService manifest, parsed."""
    return yaml.safe_load(yaml.safe_load(manifest)["spec"]["serveConfigV2"])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="RayService")
    parser.add_argument(
        "--model-dir", default=DEFAULT_MODEL_DIR, help="model directory as the replicas see it"
    )
    parser.add_argument(
        "--model-sha256", help="content digest the model directory must have (pins the version)"
    )
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--gpus-per-replica", type=float, default=1.0)
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 if the manifest is stale"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    target = ClusterTarget(
        model_dir=args.model_dir,
        model_sha256=args.model_sha256,
        accelerator=args.accelerator,
        gpus_per_replica=args.gpus_per_replica,
    )
    try:
        config = yaml.safe_load(args.config.read_text())
        manifest = args.manifest.read_text()
        updated = replace_serve_config(manifest, dump(render(config, target)))
    except (OSError, yaml.YAMLError, RenderError) as error:
        print(f"render_rayservice: {error}", file=sys.stderr)
        return 2
    if args.check:
        if updated != manifest:
            print(f"{args.manifest} is stale: run python cluster/render_rayservice.py")
            return 1
        return 0
    args.manifest.write_text(updated)
    print(f"wrote serveConfigV2 of {args.manifest} ({target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
