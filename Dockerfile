# The judging image: `python src/predict.py /data/test` over the bundle, offline, as a non-root user.
#
# CPU (the default: PyTorch's CPU wheels, an image of ~1.5 GB):
#   docker build -t predict .
#   docker run --rm --network none --shm-size 1g \
#     -v "$PWD/test_images:/data/test:ro" -v "$PWD/submissions:/app/submissions" predict
#   -> submissions/submission.csv. The container runs as uid 10001 (user `predict`): the folder mounted on
#   /app/submissions must be writable by it (`chown 10001` or `chmod a+w`), or run with `--user "$(id -u)"`.
#   Nothing else is written but temporary files: `--read-only --tmpfs /tmp` works. predict.py's other flags:
#   give the whole command, e.g. `docker run ... predict python src/predict.py /data/test --time-limit 3000`.
#
# GPU: the same base with a CUDA build of torch; its wheels carry the CUDA runtime and cuDNN, so the host needs
# only the NVIDIA driver and the NVIDIA Container Toolkit:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t predict:gpu .
#   docker run --rm --gpus all --network none --shm-size 8g -v ... predict:gpu
# (TORCH_INDEX=https://pypi.org/simple works too: PyPI's Linux torch is a CUDA build.) BASE may be any image
# whose `python3` is Python 3.11 with venv, e.g. a registry mirror of python:3.11-slim-bookworm.
#
# Build arguments:
#   BASE                 the base image (default python:3.11-slim-bookworm)
#   TORCH_INDEX          the index torch and torchvision come from (default: PyTorch's CPU wheels)
#   TORCH_VERSION, TORCHVISION_VERSION   default: requirements.txt's pins (tests/test_docker.py checks it)
#   BUNDLE               the bundle folder in the build context (default output/bundle, see src/package.py)
#   PIP_INDEX_URL        the index for everything else (default PyPI)
#   PIP_FIND_LINKS, PIP_NO_INDEX=1   an offline build from a folder of wheels served over HTTP, e.g.
#       python -m http.server -d wheels -b 127.0.0.1 8765 &
#       docker build --network host --build-arg PIP_NO_INDEX=1 \
#         --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/ -t predict .
#     (`python tests/docker_env.py build` does this with a CPU torch from local wheels.)
# Only src/, requirements-predict.txt and the bundle enter the build context (.dockerignore).

ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# pip settings for the build only: build arguments are not kept in the image.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NO_ALBUMENTATIONS_UPDATE=1

RUN useradd --no-log-init --uid 10001 --user-group --create-home --shell /usr/sbin/nologin predict
WORKDIR /app

COPY requirements-predict.txt ./
# torch and torchvision first, from TORCH_INDEX alone (no CUDA build from PyPI sneaks into a CPU image); then
# the rest from PyPI, which keeps that torch (timm's requirement is met). The import proves the environment.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install --no-cache-dir -r requirements-predict.txt \
    && python -c "import albumentations, cv2, timm, torch, xgboost; print('torch', torch.__version__)"

ARG BUNDLE=output/bundle
# Owned by the user: package.py writes the bundle's files 0600 (temporary files renamed into place), which a
# root-owned copy would leave unreadable. predict.py checks every file's SHA-256 against the manifest.
COPY --chown=10001:10001 src/ src/
COPY --chown=10001:10001 ${BUNDLE}/ output/bundle/
RUN mkdir submissions && chown predict:predict submissions

USER 10001:10001
CMD ["python", "src/predict.py", "/data/test"]
