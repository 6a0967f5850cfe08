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

# Empty: PyPI's torch, the CUDA build requirements.lock pins with its hashes. For the CPU image,
# or for nodes whose NVIDIA driver is older than that CUDA, pass a PyTorch wheel index
# (.../whl/cpu, .../whl/cu126): see the install step for what that changes.
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
COPY --chown=1000:100 requirements.lock pyproject.toml README.md ./
COPY --chown=1000:100 vitbirds/ vitbirds/
# requirements.lock, every file checked against its hash: the environment CI tested (.ci/run
# installs the same file). --no-deps: the lock names every package; this package itself adds none,
# and --no-build-isolation builds it with the lock's setuptools instead of fetching one unhashed.
# The one exception is TORCH_INDEX_URL: PyTorch's own index serves other files (2.14.1+cpu, ...)
# than PyPI's, whose hashes the lock cannot hold, since it is made from PyPI's; torch and
# torchvision then come from that index pinned by the lock's version only, and the lock's other
# packages minus the CUDA ones (nvidia-*, triton) are installed hash-checked as usual.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        awk '/^(torch|torchvision)==/ { print $1 }' requirements.lock > /tmp/torch.txt \
        && python -m pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" \
            -r /tmp/torch.txt \
        && awk '/^[^ #]/ { skip = ($0 ~ /^(torch|torchvision|triton|nvidia-[a-z0-9-]+)==/) } !skip' \
            requirements.lock > /tmp/requirements.lock; \
    else \
        cp requirements.lock /tmp/requirements.lock; \
    fi \
    && python -m pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.lock \
    && python -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -f /tmp/requirements.lock /tmp/torch.txt \
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
