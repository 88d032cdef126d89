"""`bench/gpu_check.py` on the CPU: the one-command GPU check cannot waste its call.

- `--smoke` end to end: every section's status in summary.json, the files it returns (names, count,
  sizes), the scratch folder outside the output folder and gone afterwards;
- a missing package skips only the sections that need it (the kernel sections need torch and Triton);
- the budget: each section's deadline, a child process stopped at it, later sections skipped once the
  budget is spent; the full plan's order;
- the device index for init_process_group (a bare torch.device("cuda") is refused there);
- the logs archive's cap;
- docs/gpu_check.md's wheel recipe: the install offline from wheels built from the packages installed
  here; the downloads for Python 3.12 when the package index answers.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
DOC = ROOT / "docs" / "gpu_check.md"
# What a GPU machine without deepspeed / webdataset has of their dependencies (docs/gpu_check.md).
GPU_IMAGE_HAS = {"torch", "numpy", "pyyaml", "einops", "msgpack", "ninja", "packaging", "psutil", "py-cpuinfo", "tqdm"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


def _smoke(out: Path, tmp: Path, extra_env: dict[str, str] | None = None, *args: str):
    env = {**os.environ, "OUT": str(out), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env["TMPDIR"] = str(tmp / "scratch-root")
    (tmp / "scratch-root").mkdir(exist_ok=True)
    began = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=400)
    return done, time.monotonic() - began


def _returned_files(out: Path) -> dict[str, int]:
    paths = list(out.rglob("*"))
    assert all(p.is_file() for p in paths), [str(p) for p in paths if not p.is_file()]  # no folders
    files = {p.name: p.stat().st_size for p in paths}
    assert set(files) == set(gpu_check.RETURNED), files
    assert len(files) <= gpu_check.MAX_FILES == 8
    assert all(size <= gpu_check.MAX_FILE_BYTES for size in files.values()), files
    return files


def test_window_summary_leaves_out_the_start_up_window():
    summary = gpu_check.window_summary({"throughput/images_per_s": [(10, 1.0), (20, 100.0), (30, 120.0),
                                                                    (40, 110.0)]})
    assert summary["windows"] == 4 and summary["images_per_s"] == 110.0


def test_smoke_run_returns_a_few_small_files_with_every_section(tmp_path):
    out = tmp_path / "check"
    done, seconds = _smoke(out, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = _returned_files(out)
    assert sum(files.values()) < 256 * 1024, files  # a smoke run returns tens of KiB
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert list(sections) == ["environment", "packages", "kernel_correctness", "kernel_timings", "shards",
                              "trainer_zero2_bf16", "plain_bf16", "trainer_zero2_fp32", "plain_fp32",
                              "trainer_zero2_bf16_autocast"]
    assert {name: s["status"] for name, s in sections.items()} == {name: "ok" for name in sections}, sections
    assert summary["skipped"] == [] and summary["smoke"] and summary["seconds"] <= summary["budget_s"]
    assert all(s["seconds"] <= s["deadline_s"] + 1 for s in sections.values())
    # the scratch folder lay outside the output folder and is gone
    work = Path(summary["work_dir"])
    assert out not in work.parents and work.parent == tmp_path / "scratch-root" and not work.exists()

    env = summary["environment"]
    assert env["torch"] and env["deepspeed"] != "not installed" and env["cuda_available"] is False
    assert sections["packages"]["result"]["missing"] == []

    correct = sections["kernel_correctness"]["result"]
    assert correct["interpreter"] and correct["problems"] == []
    paths = {(r["n"], r["path"]) for r in correct["rows"]}
    assert {(37, "torch_untiled"), (37, "torch_tiled"), (37, "triton_ieee"), (64, "triton_ieee")} <= paths
    for r in correct["rows"]:
        assert set(r["errors"]) == {"value", "pull", "push", "grad"} and r["finite_grad"], r
        if r["precision"] == "ieee":
            assert r["judged"] and r["over"] == [], r

    timing = sections["kernel_timings"]["result"]
    methods = [r["method"] for r in timing["rows"] if "seconds" in r]
    assert methods[0].startswith("triton_") and "torch_tiled" in methods  # Triton first
    assert all(r["seconds"] > 0 and r["forward_seconds"] > 0 for r in timing["rows"] if "seconds" in r)
    assert timing["goal"]["met"] is False and timing["goal"]["measured"] is None  # no N = 65,536 in a smoke run

    for ds_config, mode in (("zero2_bf16", "bf16"), ("zero2_fp32", "fp32"), ("zero2_bf16_autocast", "bf16")):
        trainer, plain = sections[f"trainer_{ds_config}"]["result"], sections[f"plain_{mode}"]["result"]
        assert trainer["images_per_s"] > 0 and trainer["views_per_s"] > trainer["images_per_s"]
        assert plain["images_per_s"] > 0 and 0 < plain["loss_share"]["seconds"]

    report = (out / "report.md").read_text()
    assert "| kernel_correctness | ok |" in report and "| 37 | triton_ieee |" in report
    assert all(f"| {c} | ok |" in report for c in ("zero2_bf16", "zero2_fp32", "zero2_bf16_autocast"))
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {"logs/kernel_correctness.log", "logs/trainer_zero2_fp32.log", "logs/plain_fp32.log"} <= set(names)
    print(f"smoke run: {seconds:.0f} s, files {files}")


def test_missing_packages_skip_only_the_sections_that_need_them(tmp_path):
    stubs = tmp_path / "stubs"
    for name in ("deepspeed", "webdataset"):  # importable names that fail, as on a machine without them
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('no {name} on this machine')\n")
    out = tmp_path / "check"
    pythonpath = os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])
    done, _ = _smoke(out, tmp_path, {"PYTHONPATH": pythonpath}, "--budget", "120")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _returned_files(out)
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert sections["packages"]["result"]["missing"] == ["deepspeed", "webdataset"]
    assert sections["kernel_correctness"]["status"] == "ok" and sections["kernel_timings"]["status"] == "ok"
    skipped = [name for name, s in sections.items() if s["status"] == "skipped"]
    assert skipped == ["shards", "trainer_zero2_bf16", "plain_bf16", "trainer_zero2_fp32", "plain_fp32",
                       "trainer_zero2_bf16_autocast"]
    assert "webdataset (webdataset)" in sections["shards"]["reason"]
    assert "deepspeed (deepspeed)" in sections["trainer_zero2_bf16"]["reason"]
    assert len(summary["skipped"]) == 6 and all("missing packages" in s for s in summary["skipped"])
    assert "missing packages: deepspeed" in (out / "report.md").read_text()


def test_each_section_gets_its_own_deadline_within_the_budget(tmp_path):
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", smoke=True, budget=60.0, wheels=None)
    (tmp_path / "out").mkdir()
    seen = {}

    def record(name):
        def run(deadline):
            seen[name] = deadline - time.monotonic()
            return {}
        return run

    check.section(gpu_check.Section("short", (), 10, record("short")))
    check.section(gpu_check.Section("long", (), 1000, record("long")))
    assert seen["short"] <= 10 and 40 < seen["long"] <= 60 - gpu_check.RESERVE
    # a child process is stopped at its section's deadline and its output kept
    code, stdout, _ = check.run("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); "
                                            "time.sleep(60)"], time.monotonic() + 2)
    assert code is None and "started" in stdout
    assert "stopped at its deadline" in (tmp_path / "work" / "logs" / "sleeper.log").read_text()
    # once the budget is spent the remaining sections are skipped, not started
    check.start -= 60
    check.section(gpu_check.Section("late", (), 10, record("late")))
    assert "late" not in seen and check.summary["sections"]["late"]["status"] == "skipped"
    assert "total budget" in check.summary["sections"]["late"]["reason"]
    # a section's failure is recorded and the next one still runs
    check.start += 60
    check.section(gpu_check.Section("broken", (), 10, lambda deadline: 1 / 0))
    check.section(gpu_check.Section("after", (), 10, record("after")))
    assert check.summary["sections"]["broken"]["status"] == "failed" and "after" in seen
    assert set(p.name for p in (tmp_path / "out").iterdir()) == set(gpu_check.RETURNED)


def test_the_full_plan_runs_the_kernels_first_and_the_shipped_precisions(tmp_path):
    check = gpu_check.Check(tmp_path / "out", tmp_path / "work", smoke=False, budget=None, wheels=None)
    names = [s.name for s in check.plan()]
    assert names == ["environment", "packages", "kernel_correctness", "kernel_timings", "shards",
                     "trainer_zero2_bf16", "plain_bf16", "trainer_zero2_fp16", "plain_fp16", "trainer_zero2_fp32",
                     "plain_fp32", "trainer_zero2_bf16_autocast"]
    shipped = {p.stem for p in (ROOT / "configs" / "deepspeed").glob("*.json")}
    assert set(check.s["ds_configs"]) <= shipped
    assert check.budget <= 300  # a rerun fits in a 10-minute call
    caps = {s.name: s.cap for s in check.plan()}
    assert sum(caps[n] for n in names[:4]) < check.budget - gpu_check.RESERVE  # the kernels always get their time
    assert check.s["correct_sizes"] == [37, 4096, 8191]
    assert {s.name: s.needs for s in check.plan()}["kernel_correctness"] == ("torch", "triton")


def test_process_group_options_name_the_device_index():
    import torch

    options = gpu_check.process_group_options(True, 3)
    assert options["device_id"] == torch.device("cuda", 3) and options["device_id"].index == 3
    assert gpu_check.process_group_options(False, 0) == {}


def test_no_bare_cuda_device_for_init_process_group():
    """init_process_group refuses a device_id without an index (a bare "cuda" device): none in the code."""
    bare = re.compile(r"""device_id["']?\s*[:=]\s*torch\.device\(\s*["']cuda["']\s*\)""")
    offenders = [str(path.relative_to(ROOT)) for folder in ("rct_dist", "bench", "tests") for path in
                 (ROOT / folder).rglob("*.py") if bare.search(path.read_text(encoding="utf-8"))]
    assert offenders == [], offenders


def test_logs_archive_keeps_heads_and_tails_under_its_cap(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(60):
        (logs / f"log{i:02d}.log").write_bytes(os.urandom(100_000).hex().encode())  # 200 KB, incompressible-ish
    archive = tmp_path / "logs.tar.gz"
    result = gpu_check.write_logs_archive(logs, archive)
    assert archive.stat().st_size <= gpu_check.LOG_ARCHIVE_BYTES and result["left_out"]
    assert len(result["kept"]) + len(result["left_out"]) == 60
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"logs/{result['kept'][0]}").read()
    assert len(member) < 2 * gpu_check.LOG_PART + 100 and b"bytes left out" in member


# --- the wheel recipe (docs/gpu_check.md) ----------------------------------------------------------

def _doc_commands(kind: str) -> list[str]:
    """The doc's `python -m pip KIND ...` lines."""
    text = DOC.read_text(encoding="utf-8")
    return [line.split("  #")[0].strip() for line in text.splitlines()
            if line.startswith(f"python -m pip {kind} ")]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _requires(dist: str) -> set[str]:
    names = set()
    for req in importlib.metadata.requires(dist) or []:
        if "extra ==" in req:
            continue
        names.add(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_wheel_list_is_the_closure_of_deepspeed_and_webdataset_minus_the_gpu_image():
    pins = _pins()
    deepspeed_pin = gpu_check.DEEPSPEED_WHEEL.split("==")[1]
    assert _doc_commands("wheel") == [f"python -m pip wheel --no-deps -w wheels {gpu_check.DEEPSPEED_WHEEL}"]
    assert importlib.metadata.version("deepspeed") == deepspeed_pin  # the version the tests run with
    closure, todo = set(), ["deepspeed", "webdataset"]
    while todo:
        dist = todo.pop()
        if dist in closure or dist in GPU_IMAGE_HAS:
            continue
        closure.add(dist)
        todo += sorted(_requires(dist))
    assert closure - {"deepspeed"} == set(pins), (closure, pins)
    for name, version in pins.items():  # pinned to what runs here
        assert importlib.metadata.version(name) == version, name


def _wheel_from_installed(dist_name: str, folder: Path) -> Path:
    """A wheel of an installed distribution (its recorded files, dist-info included): the wheels the recipe
    downloads, made without a package index."""
    dist = importlib.metadata.distribution(dist_name)
    name = dist.metadata["Name"].replace("-", "_")
    wheel = folder / f"{name}-{dist.version}-py3-none-any.whl"
    base = Path(dist.locate_file(""))
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if ".." in file.parts or "__pycache__" in file.parts or not path.is_file():
                continue
            z.write(path, str(path.relative_to(base)))
    return wheel


def test_recipe_install_offline_into_a_target_folder(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist in ["deepspeed", *_pins()]:
        _wheel_from_installed(dist, wheels)
    # every distribution is here at the same version: the check keeps them, installs nothing
    kept = gpu_check.install_wheels(wheels, tmp_path / "unused", tmp_path / "pip.log", 120)
    assert kept["installed"] == [] and set(kept["kept"]) == {"deepspeed", *_pins()}
    # as on a machine without them: the check's install, offline, no dependency resolution
    monkeypatch.setattr(gpu_check, "installed_version", lambda dist: None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    target = tmp_path / "site"
    result = gpu_check.install_wheels(wheels, target, tmp_path / "pip.log", 240)
    assert result["exit"] == 0, (tmp_path / "pip.log").read_text()[-3000:]
    assert "--no-index" in result["command"] and "--no-deps" in result["command"] and len(result["installed"]) == 9
    # the documented command, as written, into another folder
    (command,) = _doc_commands("install")
    words = [w for w in shlex.split(command) if w != "wheels/*.whl"]
    words = [str(tmp_path / "site2") if w == "site" else w for w in words]
    done = subprocess.run([sys.executable, *words[1:], *map(str, sorted(wheels.glob("*.whl")))],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = ("import json, deepspeed, webdataset, pydantic, hjson, braceexpand; "
             "print(json.dumps([m.__file__ for m in (deepspeed, webdataset, pydantic, hjson, braceexpand)]))")
    for folder in (target, tmp_path / "site2"):
        env = {**os.environ, "PYTHONPATH": str(folder)}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert all(f.startswith(str(folder)) for f in json.loads(done.stdout.strip().splitlines()[-1]))


def _index_answers() -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=3):
            return True
    except OSError:
        return False


def test_recipe_downloads_one_wheel_per_pin_for_the_gpu_python(tmp_path):
    if not _index_answers():
        pytest.skip("the package index does not answer: the download half of the recipe needs it")
    (tmp_path / "bench").symlink_to(ROOT / "bench")
    for command in [*_doc_commands("download"), *_doc_commands("wheel")]:
        words = shlex.split(command)
        done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)
        assert done.returncode == 0, command + "\n" + done.stderr[-3000:]
    wheels = sorted((tmp_path / "wheels").glob("*.whl"))
    found = dict(gpu_check.wheel_name(w) for w in wheels)
    assert found == {**_pins(), "deepspeed": gpu_check.DEEPSPEED_WHEEL.split("==")[1]}, found
    (core,) = [w.name for w in wheels if w.name.startswith("pydantic_core")]
    assert "-cp312-cp312-" in core and "manylinux" in core and "x86_64" in core
    assert all(w.name.endswith("-none-any.whl") for w in wheels if w.name != core)
    assert sum(w.stat().st_size for w in wheels) < 16 * 2**20
