#!/usr/bin/env bash
# From a Google Cloud project to a GKE cluster that `kubectl apply -k cluster` (or Cloud Build)
# can deploy vitbirds to: Artifact Registry, the bucket, the cluster with a GPU node pool and
# NetworkPolicy enforcement, Private Google Access for the Serve pods, the KubeRay operator, the
# two namespaces, Workload Identity for the Ray pods, the Ray auth tokens, and a service account
# for Cloud Build.
#
# Idempotent: each step looks before it creates, so rerun it after a failure or to add what is
# missing. Every value is a variable with a default; override any of them in the environment:
#   PROJECT_ID=my-project GPU_TYPE=nvidia-tesla-t4 GPU_MACHINE=n1-standard-8 cluster/setup-gke.sh
# Needs gcloud (logged in), kubectl, openssl, and helm when KUBERAY_INSTALL=helm.
set -euo pipefail

PROJECT_ID="${PROJECT_ID:-$(gcloud config get-value project 2>/dev/null)}"
REGION="${REGION:-us-central1}"            # Artifact Registry and the bucket
ZONE="${ZONE:-us-central1-a}"              # the cluster (zonal: one free control plane)
CLUSTER="${CLUSTER:-vitbirds}"
REPOSITORY="${REPOSITORY:-vitbirds}"       # Artifact Registry repository for the image
BUCKET="${BUCKET:-${PROJECT_ID}-vitbirds}" # data, runs, models; mounted at /mnt/vitbirds
# The names the manifests use (cluster/namespace.yaml, storage.yaml, serve-access.yaml and the
# clusters' authOptions): change both together.
NAMESPACE="${NAMESPACE:-vitbirds}"         # the dev and training clusters
KSA="${KSA:-vitbirds-ray}"                 # their pods' ServiceAccount: the whole bucket
TOKEN_SECRET="${TOKEN_SECRET:-vitbirds-ray-token}"  # their Ray token
# The Serve cluster's own namespace: its pods decode uploads, so they get neither the shared Ray
# token nor the bucket identity above (cluster/namespace.yaml says why a namespace).
SERVE_NAMESPACE="${SERVE_NAMESPACE:-vitbirds-serve}"
SERVE_TOKEN_SECRET="${SERVE_TOKEN_SECRET:-vitbirds-serve-ray-token}"
SERVE_KSA="${SERVE_KSA:-vitbirds-serve}"   # its workers: models read, predictions write
SERVE_HEAD_KSA="${SERVE_HEAD_KSA:-vitbirds-serve-head}"  # its head: models read
WRITE_TOKEN_SECRET="${WRITE_TOKEN_SECRET:-vitbirds-write-token}"  # /feedback's shared secret
API_KEYS_SECRET="${API_KEYS_SECRET:-vitbirds-api-keys}"  # /predict and /explain: one key to start
# Private Google Access: a private Cloud DNS zone makes *.googleapis.com resolve, in the
# cluster's VPC, to private.googleapis.com, whose addresses are google_apis_cidr in
# cluster/settings.env, the only Google API range the Serve pods' NetworkPolicy lets them reach.
GOOGLEAPIS_ZONE="${GOOGLEAPIS_ZONE:-vitbirds-googleapis}"
PRIVATE_GOOGLEAPIS_IPS="${PRIVATE_GOOGLEAPIS_IPS:-199.36.153.8,199.36.153.9,199.36.153.10,199.36.153.11}"
BUILD_SA="${BUILD_SA:-vitbirds-build}"     # Cloud Build runs as this service account
CPU_MACHINE="${CPU_MACHINE:-e2-standard-8}"
CPU_MAX_NODES="${CPU_MAX_NODES:-4}"
# The manifests' GPU nodeSelector says nvidia-l4: change both together.
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
GPU_MACHINE="${GPU_MACHINE:-g2-standard-8}"
GPU_MAX_NODES="${GPU_MAX_NODES:-4}"
# helm: the pinned KubeRay version whose CRDs the tests validate against. addon: GKE's managed
# Ray operator, whose version follows GKE's (checked below for the fields the manifests need).
KUBERAY_INSTALL="${KUBERAY_INSTALL:-helm}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.7.1}"

log() { printf '\n== %s\n' "$*"; }
die() { printf 'setup-gke: %s\n' "$*" >&2; exit 1; }

[[ -n "$PROJECT_ID" ]] || die "set PROJECT_ID (or gcloud config set project ...)"
[[ "$KUBERAY_INSTALL" == helm || "$KUBERAY_INSTALL" == addon ]] \
  || die "KUBERAY_INSTALL must be helm or addon, not '$KUBERAY_INSTALL'"
gc=(--project "$PROJECT_ID")

log "APIs"
gcloud services enable "${gc[@]}" container.googleapis.com artifactregistry.googleapis.com \
  cloudbuild.googleapis.com storage.googleapis.com dns.googleapis.com

log "Artifact Registry repository $REPOSITORY in $REGION"
if ! gcloud artifacts repositories describe "$REPOSITORY" "${gc[@]}" --location "$REGION" \
  >/dev/null 2>&1; then
  gcloud artifacts repositories create "$REPOSITORY" "${gc[@]}" --location "$REGION" \
    --repository-format docker --description "vitbirds images"
fi

log "bucket gs://$BUCKET"
if ! gcloud storage buckets describe "gs://$BUCKET" "${gc[@]}" >/dev/null 2>&1; then
  gcloud storage buckets create "gs://$BUCKET" "${gc[@]}" --location "$REGION" \
    --uniform-bucket-level-access
fi

log "GKE cluster $CLUSTER in $ZONE"
addons=GcsFuseCsiDriver
[[ "$KUBERAY_INSTALL" == addon ]] && addons+=,RayOperator
if ! gcloud container clusters describe "$CLUSTER" "${gc[@]}" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud container clusters create "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
    --release-channel regular \
    --workload-pool "$PROJECT_ID.svc.id.goog" \
    --enable-dataplane-v2 \
    --addons "$addons" \
    --enable-managed-prometheus \
    --machine-type "$CPU_MACHINE" \
    --num-nodes 1 --enable-autoscaling --min-nodes 1 --max-nodes "$CPU_MAX_NODES"
else
  # An existing cluster: turn on what the manifests rely on, if it is off.
  enabled() {
    gcloud container clusters describe "$CLUSTER" "${gc[@]}" --zone "$ZONE" --format "value($1)"
  }
  [[ "$(enabled workloadIdentityConfig.workloadPool)" == "$PROJECT_ID.svc.id.goog" ]] \
    || gcloud container clusters update "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
      --workload-pool "$PROJECT_ID.svc.id.goog"
  [[ "$(enabled addonsConfig.gcsFuseCsiDriverConfig.enabled)" == True ]] \
    || gcloud container clusters update "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
      --update-addons GcsFuseCsiDriver=ENABLED
  [[ "$(enabled monitoringConfig.managedPrometheusConfig.enabled)" == True ]] \
    || gcloud container clusters update "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
      --enable-managed-prometheus
  if [[ "$KUBERAY_INSTALL" == addon ]]; then
    [[ "$(enabled addonsConfig.rayOperatorConfig.enabled)" == True ]] \
      || gcloud container clusters update "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
        --update-addons RayOperator=ENABLED
  fi
  # Without enforcement the NetworkPolicies are only text. Dataplane V2 can be chosen only when
  # a cluster is created; an older cluster gets Calico instead (GKE recreates its nodes).
  if [[ "$(enabled networkConfig.datapathProvider)" != ADVANCED_DATAPATH \
    && "$(enabled networkPolicy.enabled)" != True ]]; then
    gcloud container clusters update "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
      --update-addons NetworkPolicy=ENABLED
    gcloud container clusters update "$CLUSTER" "${gc[@]}" --zone "$ZONE" --enable-network-policy
  fi
fi

log "GPU node pool ($GPU_TYPE on $GPU_MACHINE, 0..$GPU_MAX_NODES nodes)"
if ! gcloud container node-pools describe gpu "${gc[@]}" --cluster "$CLUSTER" --zone "$ZONE" \
  >/dev/null 2>&1; then
  # Starts at zero nodes: Ray's autoscaler asks for a GPU pod, GKE's autoscaler adds the node.
  gcloud container node-pools create gpu "${gc[@]}" --cluster "$CLUSTER" --zone "$ZONE" \
    --machine-type "$GPU_MACHINE" \
    --accelerator "type=$GPU_TYPE,count=1,gpu-driver-version=latest" \
    --workload-metadata GKE_METADATA \
    --num-nodes 0 --enable-autoscaling --min-nodes 0 --max-nodes "$GPU_MAX_NODES"
fi

log "Private Google Access: *.googleapis.com -> private.googleapis.com in the cluster's VPC"
network="$(gcloud container clusters describe "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
  --format 'value(network)')"
subnet="$(gcloud container clusters describe "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
  --format 'value(subnetwork)')"
gcloud compute networks subnets update "$subnet" "${gc[@]}" --region "${ZONE%-*}" \
  --enable-private-ip-google-access
# The zone answers for every googleapis.com name queried from this VPC, not only the cluster's.
# A VPC that has one already (restricted.googleapis.com for VPC Service Controls, say): set
# GOOGLEAPIS_ZONE to it and google_apis_cidr to the range its records name.
if ! gcloud dns managed-zones describe "$GOOGLEAPIS_ZONE" "${gc[@]}" >/dev/null 2>&1; then
  gcloud dns managed-zones create "$GOOGLEAPIS_ZONE" "${gc[@]}" --visibility private \
    --networks "$network" --dns-name googleapis.com. \
    --description "googleapis.com through private.googleapis.com (vitbirds)"
fi
record() { # NAME TYPE DATA
  if ! gcloud dns record-sets describe "$1" "${gc[@]}" --zone "$GOOGLEAPIS_ZONE" --type "$2" \
    >/dev/null 2>&1; then
    gcloud dns record-sets create "$1" "${gc[@]}" --zone "$GOOGLEAPIS_ZONE" --type "$2" \
      --ttl 300 --rrdatas "$3"
  fi
}
record private.googleapis.com. A "$PRIVATE_GOOGLEAPIS_IPS"
record '*.googleapis.com.' CNAME private.googleapis.com.

gcloud container clusters get-credentials "$CLUSTER" "${gc[@]}" --zone "$ZONE"

if [[ "$KUBERAY_INSTALL" == helm ]]; then
  log "KubeRay operator $KUBERAY_VERSION (Helm)"
  helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
  helm upgrade --install kuberay-operator kuberay/kuberay-operator \
    --version "$KUBERAY_VERSION" --namespace kuberay-system --create-namespace --wait
  # Helm installs CRDs on the first install only; apply this version's so an upgrade gets them.
  kubectl apply --server-side --force-conflicts \
    -k "github.com/ray-project/kuberay/ray-operator/config/crd?ref=v$KUBERAY_VERSION"
fi

log "check the installed KubeRay CRDs"
# An older CRD would silently drop authOptions, and the clusters would run without token auth.
auth_field="$(kubectl get crd rayclusters.ray.io -o jsonpath='{.spec.versions[?(@.name=="v1")].schema.openAPIV3Schema.properties.spec.properties.authOptions.type}')"
[[ "$auth_field" == object ]] \
  || die "RayCluster CRD without authOptions (KubeRay < 1.5.1): use KUBERAY_INSTALL=helm"

log "namespaces $NAMESPACE and $SERVE_NAMESPACE (Pod Security restricted) and their tokens"
# The manifests' own Namespace objects, so their Pod Security labels hold before any pod exists.
kubectl apply -f "$(dirname "${BASH_SOURCE[0]}")/namespace.yaml"
# Created once and never rotated by a rerun; a token goes through a pipe, not argv. Each Secret
# lives where the pods that read it do: a pod can name only Secrets of its own namespace.
make_secret() { # NAMESPACE NAME KEY
  if ! kubectl -n "$1" get secret "$2" >/dev/null 2>&1; then
    openssl rand -hex 32 | tr -d '\n' \
      | kubectl -n "$1" create secret generic "$2" --from-file="$3=/dev/stdin"
  fi
}
make_secret "$NAMESPACE" "$TOKEN_SECRET" auth_token
make_secret "$SERVE_NAMESPACE" "$SERVE_TOKEN_SECRET" auth_token
make_secret "$SERVE_NAMESPACE" "$WRITE_TOKEN_SECRET" token
make_secret "$SERVE_NAMESPACE" "$API_KEYS_SECRET" keys

log "Workload Identity: $NAMESPACE/$KSA may read and write gs://$BUCKET"
project_number="$(gcloud projects describe "$PROJECT_ID" --format 'value(projectNumber)')"
ksa_member="principal://iam.googleapis.com/projects/$project_number/locations/global/workloadIdentityPools/$PROJECT_ID.svc.id.goog/subject/ns/$NAMESPACE/sa/$KSA"
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "${gc[@]}" \
  --member "$ksa_member" --role roles/storage.objectUser >/dev/null

log "Workload Identity: $SERVE_NAMESPACE/$SERVE_KSA may read gs://$BUCKET/models/ and write predictions/"
serve_member="principal://iam.googleapis.com/projects/$project_number/locations/global/workloadIdentityPools/$PROJECT_ID.svc.id.goog/subject/ns/$SERVE_NAMESPACE/sa/$SERVE_KSA"
objects="projects/_/buckets/$BUCKET/objects"
# Listing is checked on the bucket itself (GCSFuse lists), reading and writing on each object.
bucket_type='resource.type == "storage.googleapis.com/Bucket"'
models_read="$bucket_type || resource.name.startsWith(\"$objects/models/\")"
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "${gc[@]}" \
  --member "$serve_member" --role roles/storage.objectViewer \
  --condition "title=serve-models-read,expression=$models_read" >/dev/null
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "${gc[@]}" \
  --member "$serve_member" --role roles/storage.objectUser \
  --condition "title=serve-predictions-write,expression=resource.name.startsWith(\"$objects/predictions/\")" \
  >/dev/null

log "Workload Identity: $SERVE_NAMESPACE/$SERVE_HEAD_KSA may read gs://$BUCKET/models/"
# Serve's application build task, which resolves the model directory, can run on the head.
head_member="principal://iam.googleapis.com/projects/$project_number/locations/global/workloadIdentityPools/$PROJECT_ID.svc.id.goog/subject/ns/$SERVE_NAMESPACE/sa/$SERVE_HEAD_KSA"
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "${gc[@]}" \
  --member "$head_member" --role roles/storage.objectViewer \
  --condition "title=serve-head-models-read,expression=$models_read" >/dev/null

log "Cloud Build service account $BUILD_SA"
build_sa="$BUILD_SA@$PROJECT_ID.iam.gserviceaccount.com"
if ! gcloud iam service-accounts describe "$build_sa" "${gc[@]}" >/dev/null 2>&1; then
  gcloud iam service-accounts create "$BUILD_SA" "${gc[@]}" --display-name "vitbirds Cloud Build"
fi
for role in roles/container.developer roles/logging.logWriter; do
  gcloud projects add-iam-policy-binding "$PROJECT_ID" --member "serviceAccount:$build_sa" \
    --role "$role" --condition None >/dev/null
done
gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" "${gc[@]}" \
  --location "$REGION" --member "serviceAccount:$build_sa" --role roles/artifactregistry.writer \
  >/dev/null
gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" "${gc[@]}" \
  --member "serviceAccount:$build_sa" --role roles/storage.objectUser >/dev/null

log "done"
pod_cidr="$(gcloud container clusters describe "$CLUSTER" "${gc[@]}" --zone "$ZONE" \
  --format 'value(clusterIpv4Cidr)')"
# Where the Service `kubernetes` leads: what the Serve head's autoscaler connects to.
api_server="$(kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes \
  -o jsonpath='{.items[0].endpoints[0].addresses[0]}')"
cat <<EOF
Cluster $CLUSTER is ready. For cluster/settings.env (Cloud Build: _POD_CIDR, _API_SERVER_CIDR):
  pod_cidr=$pod_cidr
  api_server_cidr=$api_server/32
Next (cluster/README.md has the details):
  gcloud storage cp -r ../shared/data/cub100 gs://$BUCKET/data/
  gcloud builds submit --config cloudbuild.yaml \\
    --substitutions=_BUCKET=$BUCKET,_SERVE_CLIENTS_CIDR=YOUR_CLIENTS_CIDR,_POD_CIDR=$pod_cidr,_API_SERVER_CIDR=$api_server/32,_REGION=$REGION,_ZONE=$ZONE,_CLUSTER=$CLUSTER,_REPOSITORY=$REPOSITORY,_TAG=\$(git rev-parse --short HEAD) \\
    --service-account=projects/$PROJECT_ID/serviceAccounts/$build_sa
EOF
