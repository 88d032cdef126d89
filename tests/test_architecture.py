"""docs/architecture.md's rules, enforced: which layer may import which (every import of every module, the
ones inside functions too; data and models not each other), the core importable and working with the trainer's dependencies blocked,
and the command line's message when they are missing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rct_dist"

LAYERS = {  # top-level module or package of rct_dist -> layer number (higher may import lower)
    "geometry": 0, "distributed": 0, "losses": 0, "eval": 0,
    "atomic": 1, "config": 1, "logs": 1, "svg_plot": 1,
    "data": 2, "models": 2,
    "train": 3,
    "jobs": 4, "preflight": 4, "demo": 4, "study": 4,
    "cli": 5,
}
CORE = {name for name, layer in LAYERS.items() if layer == 0}
UTILITIES_MAY_IMPORT = {"atomic"}  # utilities: only atomic (and themselves)
INPUTS = {name for name, layer in LAYERS.items() if layer == 2}  # data and models: neither imports the other
TRAIN_PACKAGES = ("deepspeed", "timm", "torchvision", "webdataset", "yaml", "tensorboard", "PIL", "safetensors",
                  "tqdm")  # (scipy stays: scikit-learn needs it)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every rct_dist import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rct_dist":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "rct_dist"]
    return found


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _edges():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target, names, line in _imports(path):
            yield path, source, target, names, line


def test_every_module_has_a_layer():
    tops = {_top(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert tops <= set(LAYERS), f"modules without a layer in docs/architecture.md: {tops - set(LAYERS)}"


def test_no_module_imports_a_layer_above_its_own():
    problems = []
    for path, source, target, names, line in _edges():
        src, dst = _top(source), _top(target)
        if src is None or dst is None or src == dst:
            continue
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if LAYERS[dst] > LAYERS[src]:
            problems.append(f"{where} (layer {LAYERS[dst]} above {LAYERS[src]})")
        elif LAYERS[src] == 0 and dst not in CORE:
            problems.append(f"{where} (the core imports the core only)")
        elif LAYERS[src] == 1 and dst not in UTILITIES_MAY_IMPORT:
            problems.append(f"{where} (utilities import only rct_dist.atomic)")
        elif src in INPUTS and dst in INPUTS:
            problems.append(f"{where} (data does not import models, models does not import data: models "
                            "declares a backbone's preprocessing, data applies it, the trainer joins them)")
        elif LAYERS[src] == LAYERS[dst] == 4:
            if not (src in ("study",) and dst == "demo"):  # a study reuses the demo's recipes
                problems.append(f"{where} (applications do not import each other)")
    assert not problems, "\n".join(problems)


def test_no_private_names_cross_modules():
    """`from rct_dist.x import _name` only inside the same package (jobs takes nothing private from the
    trainer; the trainer nothing from jobs or the CLI)."""
    problems = []
    for path, source, target, names, line in _edges():
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and _top(source) != _top(target):
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {target}")
    assert not problems, "\n".join(problems)


INPUTS_RUN = """
import sys
import importlib
for name in sys.argv[1].split(","):
    importlib.import_module(name)
other = sys.argv[2]
leaked = sorted(m for m in sys.modules if m == other or m.startswith(other + "."))
assert not leaked, leaked
print("ok")
"""


@pytest.mark.parametrize("modules, absent", [
    ("rct_dist.data,rct_dist.data.transforms,rct_dist.data.loader,rct_dist.data.shards", "rct_dist.models"),
    ("rct_dist.models,rct_dist.models.export,rct_dist.models.preprocess,rct_dist.models.teacher", "rct_dist.data"),
], ids=["data-without-models", "models-without-data"])
def test_data_and_models_load_without_each_other(modules, absent):
    """The rule above at run time: importing one of the inputs packages leaves the other unloaded."""
    out = subprocess.run([sys.executable, "-c", INPUTS_RUN, modules, absent], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_training_loop_imports_nothing_from_jobs_or_the_cli():
    targets = {target for path, source, target, _, _ in _edges() if source.startswith("rct_dist.train")}
    assert not {t for t in targets if _top(t) in ("jobs", "cli", "preflight", "demo", "study")}


BLOCKED_CORE_RUN = """
import sys
import importlib.abc

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
import torch
import rct_dist.geometry, rct_dist.distributed, rct_dist.losses, rct_dist.eval
import rct_dist.eval.retrieval_picture, rct_dist.distributed.world, rct_dist.distributed.shutdown
from rct_dist.losses import RelaxedContrastiveLoss, RKDLoss, PKTLoss, DarkRankLoss, ProxyAnchorLoss
from rct_dist.eval import evaluate

g = torch.Generator().manual_seed(0)
student = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
teacher = torch.randn(12, 16, generator=g, dtype=torch.float64)
loss = RelaxedContrastiveLoss()(student, teacher)
loss.backward()
assert torch.isfinite(loss) and student.grad.abs().sum() > 0
labels = torch.arange(12) % 3
result = evaluate(student.detach().float(), labels, ks=(1, 2))
assert 0.0 <= result["recall"][1] <= 1.0
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED
                or m.startswith(("rct_dist.data", "rct_dist.models", "rct_dist.train", "rct_dist.config")))
assert not leaked, leaked
print("core ok", float(loss))
"""


def test_the_core_works_with_the_trainers_dependencies_blocked():
    blocked = ",".join((*TRAIN_PACKAGES, "rct_dist.data", "rct_dist.models", "rct_dist.train", "rct_dist.config",
                        "rct_dist.jobs", "rct_dist.cli"))
    out = subprocess.run([sys.executable, "-c", BLOCKED_CORE_RUN, blocked], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("core ok")


def test_core_dependencies_in_pyproject_are_torch_numpy_scikit_learn():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert names == {"torch", "numpy", "scikit-learn"}
    train = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["train"]}
    assert {"deepspeed", "timm", "torchvision", "webdataset", "pyyaml"} <= train
    assert "rct-dist[train]" in project["optional-dependencies"]["test"]


def test_the_command_line_names_the_missing_extra(monkeypatch, capsys):
    from rct_dist import cli

    monkeypatch.setattr(cli, "TRAIN_EXTRA", (*cli.TRAIN_EXTRA, "no_such_module_here"))
    with pytest.raises(SystemExit) as stop:
        cli.main(["configs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "no_such_module_here" in err[0] and "pip install 'rct-dist[train]'" in err[0]
