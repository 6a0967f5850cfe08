# syntax=docker/dockerfile:1
# The vitbirds image: this project on Ray's own image, used by every pod of the KubeRay
# cluster (head, CPU and GPU workers, RayJob submitters). Build on Cloud Build (cloudbuild.yaml)
# or by hand:
#   docker build -t vitbirds:dev .                                   # GPU (default)
#   docker build -t vitbirds:dev-cpu --build-arg RAY_VARIANT=cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker build -t vitbirds:dev-baked --build-arg MODEL_SOURCE=baked .   # needs models/baked/

# Ray, Python and the base image move together. The manifests' rayVersion (cluster/*.yaml) must
# say the same: KubeRay reads it to decide what the image supports (token auth needs >= 2.52).
ARG RAY_VERSION=2.60.0
ARG RAY_VARIANT=gpu
# "storage": the model is read at start from the path in the Serve config (the bucket mount);
# "baked": models/baked/ from the build context is copied in and VITBIRDS_MODEL_DIR points to it.
ARG MODEL_SOURCE=storage

FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_VARIANT} AS app

# Empty: PyPI's torch (the CUDA build that pyproject.toml pins). For the CPU image, or for nodes
# whose NVIDIA driver is older than that CUDA, pass a PyTorch wheel index (.../whl/cpu,
# .../whl/cu126).
ARG TORCH_INDEX_URL=""

# The jobs run `python /home/ray/app/jobs/...` and Serve imports `serve.app:app`: both need the
# checkout on the path, not only the installed `vitbirds` package.
ENV PYTHONPATH=/home/ray/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# uid 1000 / gid 100 are the image's `ray` user and `users` group. Numeric, so that Kubernetes'
# runAsNonRoot can check them. That user owns the image's Python, so installing needs no root,
# and nothing below runs as root. .dockerignore lets in only the code (no data, runs, caches,
# virtualenvs or secrets).
USER 1000:100
# BuildKit creates the WORKDIR as the current USER, so pip can build in it.
WORKDIR /home/ray/app
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 vitbirds/ vitbirds/
# A local version such as torch 2.14.1+cpu satisfies the pin torch==2.14.1, so an extra index
# swaps the wheel's flavour without a second copy of the version numbers.
RUN python -m pip install --no-cache-dir \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && python -c "import torch, ray, vitbirds; print(torch.__version__, ray.__version__)"
COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 serve/ serve/

FROM app AS model-storage

FROM app AS model-baked
COPY --chown=1000:100 models/baked/ /home/ray/app/models/baked/
ENV VITBIRDS_MODEL_DIR=/home/ray/app/models/baked

# BuildKit builds only the selected stage, so a storage build never needs models/baked/.
# hadolint takes model-${MODEL_SOURCE} for an untagged image; it is one of the two stages above.
# hadolint ignore=DL3006
FROM model-${MODEL_SOURCE}
USER 1000:100
