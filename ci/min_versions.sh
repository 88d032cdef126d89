#!/usr/bin/env bash
# Minimum-versions job: install rct-dist with every dependency held at the floor declared in
# pyproject.toml (constraints/minimum.txt pins each one to it) in a throw-away virtual environment,
# then run the tests there. Passing means the floors are real: the oldest allowed versions install
# together and work. It installs the test and mpi extras (mpi4py's wheel only needs an MPI library
# when imported, which the tests never do); faiss is pinned but left out.
#
#   bash ci/min_versions.sh                  # the whole suite
#   bash ci/min_versions.sh tests/test_x.py  # arguments replace `tests` on the pytest line
#
# PYTHON picks the interpreter (default python3.11, else python3); the pins are checked on 3.11.
# RCT_DIST_MIN_VENV keeps the environment at that path instead of deleting it afterwards (an existing
# one is reused: pip then only changes what differs from the pins).
# Times on 2 busy CPU cores: install about 10 minutes into a fresh environment (less with pip's cache
# warm); .ci/run's subset and the whole suite are timed there.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ -n "${RCT_DIST_MIN_VENV:-}" ]; then
    venv="$RCT_DIST_MIN_VENV"
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    venv="$tmp/venv"
fi

echo "== minimum versions: $("$python" --version) in $venv"
start=$SECONDS
"$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints/minimum.txt -e ".[test,mpi]"
installed=$SECONDS
# DeepSpeed JIT-builds its CPU communication op on first use. The build depends on the torch and
# DeepSpeed in this environment, so it goes into the environment, not the user's shared cache (where
# two environments would rebuild it over each other, each waiting on the other's lock).
export TORCH_EXTENSIONS_DIR="$venv/torch_extensions"

# The floors in pyproject.toml and the pins must agree, and the pins must be what got installed.
python - <<'PY'
import re, sys, tomllib
from importlib.metadata import version

def name(s):
    return re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].strip().lower().replace("_", "-")

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = {}
for spec in project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]:
    floor = re.search(r">=\s*([^,;\s]+)", spec)
    declared[name(spec)] = floor.group(1) if floor else None
pins = {}
for line in open("constraints/minimum.txt"):
    line = line.split("#", 1)[0].strip()
    if line:
        pkg, _, pin = line.partition("==")
        pins[name(pkg)] = pin.strip()
problems = [f"{p}: declared floor {f}, pinned {pins.get(p)}" for p, f in declared.items() if pins.get(p) != f]
problems += [f"{p}: pinned but not declared" for p in pins if p not in declared]
for pkg, pin in pins.items():
    try:
        got = version(pkg)
    except Exception:
        continue  # an extra the job does not install (faiss)
    if got.split("+")[0] != pin:
        problems.append(f"{pkg}: pinned {pin}, installed {got}")
if problems:
    sys.exit("constraints/minimum.txt disagrees with pyproject.toml or the environment:\n  " + "\n  ".join(problems))
print(f"{len(pins)} pins agree with pyproject.toml's floors")
PY

status=0
python -m pytest -q "${@:-tests}" || status=$?
echo "== minimum versions: install $((installed - start)) s, tests $((SECONDS - installed)) s, pytest exit $status"
exit "$status"
