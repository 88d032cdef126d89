# rct-dist for cloud GPUs (CUDA 12.x). NOT BUILT OR RUN in the environment where it was written
# (no Docker engine there): treat the first build as its test.
#
#   docker build -t rct-dist .
#   docker run --rm --gpus all --ipc host --network host \
#       -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" \
#       rct-dist transfer --config configs/cub/compression.yaml
#
# The base image's torch is kept: setup.py asks for torch>=2.4, which it satisfies, and the install is
# constrained to the installed torch version (and torchvision, when the image has one), so pip cannot
# swap in another torch build. The image is a *runtime* one (no nvcc): the trainer uses torch's AdamW,
# and no DeepSpeed CUDA op is JIT-compiled. DeepSpeed's CPU-only shared-memory comm op needs g++
# (installed below) and is only used without GPUs.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# g++/ninja: DeepSpeed JIT ops on CPU; pdsh + ssh client: the deepspeed launcher's multi-node (ssh) mode.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0

# Dependencies first (better layer caching): only setup.py/README are needed to resolve them.
COPY setup.py README.md ./
COPY rct_dist/__init__.py rct_dist/__init__.py
RUN python -m pip freeze | grep -iE '^(torch|torchvision)==' > /tmp/torch-constraints.txt \
    && cat /tmp/torch-constraints.txt \
    && python -m pip install -c /tmp/torch-constraints.txt -e ".[test]" \
    && python -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"

# The code, configs and launchers (see .dockerignore for what stays out).
COPY . .
RUN python -m pip install -c /tmp/torch-constraints.txt --no-deps -e . \
    && grep -iE '^torch==' /tmp/torch-constraints.txt | cut -d= -f3 > /tmp/torch-version \
    && python -c "import torch; v = open('/tmp/torch-version').read().strip(); assert not v or torch.__version__ == v, (torch.__version__, v)"

# HF_HUB_OFFLINE is deliberately not set: timm may fetch pretrained weights. Set it with
# `docker run -e HF_HUB_OFFLINE=1` (and mount a cache at /root/.cache/huggingface) for offline nodes.
ENTRYPOINT ["rct-dist"]
CMD ["--help"]
