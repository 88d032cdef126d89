#!/usr/bin/env bash
# Prepare the image's Python environment (run once, as root, in the Dockerfile):
#  - a virtual environment at $VENV (default /opt/venv) that also sees the base image's packages
#    (--system-site-packages), so a torch that the base image already has is kept and reused;
#  - without torch in the base image: torch==$TORCH_VERSION and torchvision==$TORCHVISION_VERSION from
#    pip (from $TORCH_INDEX_URL when set, e.g. a CPU-only or a specific CUDA wheel index);
#  - $VENV/constraints.txt pinning the torch (and torchvision) in use; the image sets PIP_CONSTRAINT to
#    it, so no later pip install can swap the torch build.
set -euo pipefail
venv=${VENV:-/opt/venv}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

base_python=
has_torch=
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
        base_python=$(command -v "$candidate"); has_torch=1; break
    fi
done
if [[ -n $base_python ]]; then
    echo "python-env.sh: the base image has torch ($base_python): keeping it"
else
    base_python=$(command -v python3 || command -v python || true)
    [[ -n $base_python ]] || { echo "python-env.sh: no python3 in the base image" >&2; exit 1; }
    echo "python-env.sh: no torch in the base image ($base_python): installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
fi
"$base_python" --version
"$base_python" -m venv --system-site-packages "$venv" || {
    echo "python-env.sh: '$base_python -m venv' failed (Debian/Ubuntu bases need the python3-venv package)" >&2
    exit 1
}
export PYTHON=$venv/bin/python

# A base whose torch lives in its own virtual environment (or another prefix that --system-site-packages
# does not reach): make that environment's site-packages visible through a .pth file.
if [[ -n $has_torch ]] && ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    site_dir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$base_python" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site_dir/base-image-site.pth"
    echo "python-env.sh: the base's site-packages added to $venv:"; cat "$site_dir/base-image-site.pth"
fi

if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    index_args=()
    [[ -n ${TORCH_INDEX_URL:-} ]] && index_args=(--index-url "$TORCH_INDEX_URL")
    "$here/pip.sh" install "${index_args[@]}" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# Pin what is there now. Metadata, not `import`, so that a broken torchvision cannot hide.
"$PYTHON" - "$venv/constraints.txt" <<'PY'
import sys
from importlib import metadata
lines = []
for name in ("torch", "torchvision"):
    try:
        lines.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("python-env.sh: pinned", ", ".join(lines))
PY
