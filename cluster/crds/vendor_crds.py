"""Writes `kuberay-v1.7.schemas.json.gz`: the `ray.io/v1` openAPIV3Schema of each KubeRay CRD.

The tests validate every RayCluster, RayJob and RayService in cluster/ against these schemas, on
any checkout, without network or the CRD files themselves (3.3 MB of YAML). Only what
validation reads is kept: the v1 schema of each kind, without its `description` texts (95 % of
the bytes). The output is deterministic (sorted keys, gzip without a timestamp), so `--check`
can say whether the vendored copy still matches a given set of CRDs.

    python cluster/crds/vendor_crds.py ../shared/schemas/kuberay          # rewrite
    python cluster/crds/vendor_crds.py ../shared/schemas/kuberay --check  # compare only
"""

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import yaml

VENDORED = Path(__file__).with_name("kuberay-v1.7.schemas.json.gz")
KINDS = ("RayCluster", "RayJob", "RayService")


def _without_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_descriptions(v) for k, v in schema.items() if k != "description"}
    if isinstance(schema, list):
        return [_without_descriptions(v) for v in schema]
    return schema


def v1_schemas(crd_dir: Path) -> dict[str, Any]:
    """{kind: openAPIV3Schema of version v1} from the `ray.io_*.yaml` CRDs in `crd_dir`."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in sorted(crd_dir.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        for version in crd["spec"]["versions"]:
            if version["name"] == "v1":
                schema = version["schema"]["openAPIV3Schema"]
                schemas[crd["spec"]["names"]["kind"]] = _without_descriptions(schema)
    missing = sorted(set(KINDS) - set(schemas))
    if missing:
        raise SystemExit(f"{crd_dir}: no ray.io/v1 CRD for {', '.join(missing)}")
    return {kind: schemas[kind] for kind in KINDS}


def encode(schemas: dict[str, Any]) -> bytes:
    text = json.dumps(schemas, sort_keys=True, separators=(",", ":"))
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def load_vendored(path: Path = VENDORED) -> dict[str, Any]:
    """{kind: schema} as vendored: what the tests validate the manifests against."""
    return json.loads(gzip.decompress(path.read_bytes()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd_dir", type=Path, help="directory of KubeRay's ray.io_*.yaml CRDs")
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    if not args.crd_dir.is_dir():
        parser.error(f"{args.crd_dir} is not a directory")
    data = encode(v1_schemas(args.crd_dir))
    if args.check:
        if VENDORED.is_file() and VENDORED.read_bytes() == data:
            print(f"{VENDORED.name} matches {args.crd_dir}")
            return 0
        print(f"{VENDORED.name} differs from {args.crd_dir}: rerun without --check")
        return 1
    VENDORED.write_bytes(data)
    print(f"wrote {VENDORED} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
