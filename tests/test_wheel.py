"""A non-editable install works outside the source tree: the wheel carries the configs, the demo runs,
and a transfer starts from a built-in config (whose DeepSpeed config is found by name in the package).

The wheel is built from this checkout and installed without dependencies into a fresh virtual
environment in a temporary folder; the dependencies come from the test's own environment through a
path entry (so nothing is downloaded), while `rct_dist` itself can only come from the wheel: the
checkout is neither the working directory nor on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{cmd}:\n{(out.stdout + out.stderr)[-4000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(folder with bin/rct-dist, environment) of a fresh venv holding only the built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(ROOT)], env, tmp)
    wheels = list((tmp / "dist").glob("rct_dist-*.whl"))
    assert len(wheels) == 1, wheels
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheels[0])], env, tmp)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env,
                     tmp).stdout.strip())
    # dependencies from this environment; a plain path line, so this environment's own .pth files (the
    # editable install of the checkout) are not executed there
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env['PATH']}"
    return target, env


def test_the_package_comes_from_the_wheel_with_its_configs(installed, tmp_path):
    target, env = installed
    where = _run([str(target / "bin" / "python"), "-c",
                  "import rct_dist, rct_dist.config as c; print(rct_dist.__file__); print(c.builtin_folder())"],
                 env, tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    shipped = Path(where[1])
    assert (shipped / "cub" / "teacher.yaml").is_file() and (shipped / "deepspeed" / "zero2_fp32.json").is_file()
    # The build copied the repository's one copy, configs/, into the package: the same files, byte for byte.
    source = ROOT / "configs"
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json",
                                                                                                    ".md"))
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file()) == files
    assert all((shipped / f).read_bytes() == (source / f).read_bytes() for f in files)
    assert not (ROOT / "rct_dist" / "configs").exists()  # no second copy in the source tree
    listing = _run([str(target / "bin" / "rct-dist"), "configs"], env, tmp_path).stdout
    assert "omniglot/rc" in listing and "zero2_bf16" in listing


def test_demo_then_a_transfer_from_a_builtin_config(installed, tmp_path):
    target, env = installed
    rct = str(target / "bin" / "rct-dist")
    demo = _run([rct, "demo", "--dataset", "digits", "--epochs", "1", "--out", "runs/demo"], env, tmp_path)
    assert "student <- teacher, RC" in demo.stdout
    # omniglot/rc names its DeepSpeed config (zero2_fp32) and its student (rct_cnn3_small 64-d) and
    # teacher (rct_cnn4 128-d: the demo's teacher); only the data and the teacher's folder change
    out = _run([rct, "transfer", "--config", "omniglot/rc", "data.root=runs/demo/shards-digits",
                "teacher.export=runs/demo/teacher/export", "data.pk=[5,18]", "data.batch_size=90",
                "data.workers=0", "optim.epochs=1", "log.retrieval_images=0"], env, tmp_path)
    assert "epoch 1: R@1" in out.stdout + out.stderr
    assert (tmp_path / "runs" / "omniglot-rc" / "export" / "model.safetensors").is_file()
