"""One-command GPU check: the RC kernels' correctness on the GPU, their timings, then the real trainer in
each shipped precision against a plain PyTorch loop. Built so that one short call on a borrowed GPU machine
is never wasted (docs/gpu_check.md).

    python bench/gpu_check.py OUT_DIR [--wheels WHEELS_DIR]     # one GPU, about 5 minutes at most
    python bench/gpu_check.py OUT_DIR --smoke                    # CPU, tiny sizes (the CI test, about 1 minute)

The output folder is the argument, else the OUT environment variable. It receives at most 8 small files
(`RETURNED`): `summary.json` (every section's status, figures and errors; rewritten after each section),
`report.md` (the same as tables) and `logs.tar.gz` (each subprocess's log, head and tail, capped at
2 MiB). Work files (JPEGs, shards, runs, full logs, installed wheels) go to a scratch folder outside
the output folder (`--work`, default a new temporary folder, removed at the end unless `--keep-work`).

Sections, in this order, each with its own deadline inside a total budget (`--budget`, 300 s), so a
slow section cannot eat the others; each runs whatever another lacks, and one whose packages are
missing is skipped with the reason:

1. environment: versions (Python, torch, CUDA, cuDNN, NCCL, the GPU, every package the check uses),
   printed first;
2. packages: with `--wheels DIR`, the wheels of missing (or older) distributions are installed
   offline (`pip install --no-index --no-deps --target WORK/site`), then every module is imported in
   a child process and its status recorded;
3. kernel_correctness (torch, triton): Triton vs torch tiled vs torch untiled, each against float64,
   at N = 37, 4,096 and 8,191 (one duplicate row): value, pull and push terms, gradient, with a
   tolerance per precision mode;
4. kernel_timings (torch, triton): forward + backward at D = 512, Triton first, then the torch tiled
   path; sizes whose time, extrapolated as N^2, would not fit the deadline are skipped and said so;
5. shards, then the real trainer (`rct-dist transfer`, one process, ResNet-50 teacher -> ResNet-18
   student, 224 px, 2 views) under each shipped DeepSpeed config as shipped (zero2_bf16, zero2_fp16,
   zero2_fp32, zero2_bf16_autocast), each followed by a plain PyTorch loop of the same models, loader
   and batch (autocast; GradScaler for fp16) and the RC loss's share of its step.

Exit status: 0 when no section failed or timed out (skipped sections are reported, not failures).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

# --- what comes back ------------------------------------------------------------------------------
RETURNED = ("summary.json", "report.md", "logs.tar.gz")
MAX_FILES = 8  # files the check writes into the output folder, at most
MAX_FILE_BYTES = 4 * 2**20  # each of them, at most
LOG_ARCHIVE_BYTES = 2 * 2**20  # logs.tar.gz: the logs' kept text, uncompressed, at most this
LOG_PART = 24 * 2**10  # of each log, the first and the last this many bytes

BUDGET = 300.0  # seconds, the whole check: a rerun fits in the same 10-minute call
RESERVE = 5.0  # seconds kept back from the budget to write the files

# --- packages -------------------------------------------------------------------------------------
# import name -> distribution name
MODULES = {"torch": "torch", "triton": "triton", "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml",
           "torchvision": "torchvision", "timm": "timm", "deepspeed": "deepspeed", "webdataset": "webdataset",
           "tensorboard": "tensorboard", "safetensors": "safetensors", "tqdm": "tqdm", "hjson": "hjson",
           "pydantic": "pydantic", "sklearn": "scikit-learn"}
KERNEL_NEEDS = ("torch", "triton")
TRAIN_NEEDS = ("torch", "numpy", "PIL", "yaml", "torchvision", "timm", "deepspeed", "webdataset", "tensorboard",
               "safetensors", "tqdm", "sklearn")
WHEELS_FILE = ROOT / "bench" / "gpu_wheels.txt"  # the binary wheels of docs/gpu_check.md's recipe
DEEPSPEED_WHEEL = "deepspeed==0.19.8"  # an sdist: its pure-Python wheel is built with `pip wheel --no-deps`

# --- kernels --------------------------------------------------------------------------------------
PRECISIONS = ("ieee", "tf32", "bf16")  # RelaxedContrastiveLoss(kernel="triton", precision=...)
# Largest error allowed against float64: relative for the value and its pull and push terms, relative to
# the largest gradient entry for the gradient. The torch paths compute in fp32 with IEEE products ("ieee").
# ieee: the CPU tests' 1e-5 for values; 1e-4 for the gradient, since the torch tiled path itself is 3e-5
# off at a duplicate row (Gram-form noise at zero distance). tf32 and bf16: about 5x the expected 1e-3
# and 1e-2 of their products' rounding.
TOLERANCES = {"ieee": {"value": 1e-5, "grad": 1e-4}, "tf32": {"value": 5e-3, "grad": 5e-3},
              "bf16": {"value": 5e-2, "grad": 5e-2}}
GOAL = {"method": "triton_bf16", "n": 65536, "seconds": 0.030, "peak_extra_mib": 2048}  # issue 17, one H100
DUPLICATE = (0, 1)  # row 1 is a copy of row 0 (student and teacher): zero distances under a square root


def sizes(smoke: bool) -> dict[str, Any]:
    """Every size of the check; --smoke shrinks them to CPU seconds (and uses the package's small CNNs)."""
    if smoke:
        return dict(device="cpu", budget=240.0, ds_configs=("zero2_bf16", "zero2_fp32", "zero2_bf16_autocast"),
                    correct_sizes=[37, 64], correct_dim=16,
                    correct_tile=16, time_tile=128, time_dim=16, torch_sizes=[256, 512],
                    triton_sizes={"bf16": [48], "tf32": [48], "ieee": [48]}, images=64, test_images=16,
                    side=48, image_size=32, batch=8, steps=4, log_every=2, workers=1, shard_size=16,
                    shard_workers=1, teacher="rct_cnn4", student="rct_cnn3_small",
                    caps=dict(environment=20, packages=120, kernel_correctness=90, kernel_timings=60, shards=60,
                              trainer=120, plain=90))
    workers = max(1, min(15, (os.cpu_count() or 2) - 1))
    return dict(device="cuda", budget=BUDGET, ds_configs=("zero2_bf16", "zero2_fp16", "zero2_fp32",
                                                          "zero2_bf16_autocast"),
                correct_sizes=[37, 4096, 8191], correct_dim=512, correct_tile=1024, time_tile=8192, time_dim=512,
                triton_sizes={"bf16": [8192, 16384, 32768, 65536, 131072], "tf32": [8192, 16384, 32768, 65536],
                              "ieee": [8192, 16384, 32768]},  # ieee: CUDA-core fp32, the smaller sizes
                torch_sizes=[8192, 16384, 32768, 65536],
                images=2048, test_images=256, side=320, image_size=224, batch=128, steps=30, log_every=10,
                workers=workers, shard_size=128, shard_workers=8, teacher="resnet50", student="resnet18",
                caps=dict(environment=20, packages=60, kernel_correctness=50, kernel_timings=60, shards=30,
                          trainer=45, plain=30))


def precision(ds_config: str) -> str:
    """zero2_bf16_autocast -> bf16 (what the plain loop autocasts to), zero2_fp32 -> fp32."""
    return next((p for p in ("bf16", "fp16", "fp32") if p in ds_config), "fp32")


def process_group_options(cuda: bool, local_rank: int) -> dict[str, Any]:
    """Keywords for init_process_group: on CUDA the device with its index (a bare torch.device("cuda")
    is refused by init_process_group's device_id)."""
    import torch

    return {"device_id": torch.device("cuda", local_rank)} if cuda else {}


@dataclasses.dataclass
class Section:
    name: str
    needs: tuple[str, ...]
    cap: float  # seconds, at most
    run: Callable[[float], Any]  # deadline (time.monotonic()) -> result for summary.json


class Skip(Exception):
    """A section that cannot run here, with the reason."""


class Check:
    def __init__(self, out: Path, work: Path, smoke: bool, budget: float | None, wheels: Path | None) -> None:
        self.out, self.work, self.smoke, self.wheels = out, work, smoke, wheels
        self.s = sizes(smoke)
        self.budget = budget if budget is not None else self.s["budget"]
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.available: dict[str, str] = {}  # module -> version, for the modules that import
        self.summary: dict[str, Any] = {"smoke": smoke, "budget_s": self.budget, "work_dir": str(work),
                                        "returned_files": list(RETURNED), "sections": {}, "skipped": [],
                                        "sizes": {k: v for k, v in self.s.items() if k != "caps"}}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env["PYTHONUNBUFFERED"] = "1"

    def left(self) -> float:
        return self.budget - RESERVE - (time.monotonic() - self.start)

    # --- running ----------------------------------------------------------------------------------
    def run(self, name: str, cmd: list[str], deadline: float, env: dict[str, str] | None = None
            ) -> tuple[int | None, str, str]:
        """A subprocess until `deadline`: (exit status or None when it was stopped, stdout, stderr);
        its output in the scratch logs/NAME.log."""
        timeout = max(1.0, deadline - time.monotonic())
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env, cwd=ROOT,
                                  timeout=timeout)
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            code = None
            stdout, stderr = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                              for x in (e.stdout, e.stderr))
        status = f"stopped at its deadline after {timeout:.0f} s" if code is None else f"exit {code}"
        (self.logs / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{status}\n--- stdout\n{stdout}\n"
                                               f"--- stderr\n{stderr}")
        return code, stdout, stderr

    def section(self, section: Section) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[{elapsed:6.1f} s] {section.name}", flush=True)
        record: dict[str, Any] = {"needs": list(section.needs)}
        self.summary["sections"][section.name] = record
        missing = [m for m in section.needs if m not in self.available]
        allowed = min(section.cap, self.left())
        if missing:
            record.update(status="skipped", reason="missing packages: " + ", ".join(
                f"{m} ({MODULES.get(m, m)})" for m in missing) + "; see docs/gpu_check.md, --wheels")
        elif allowed < 5:
            record.update(status="skipped", reason=f"out of the total budget ({self.budget:.0f} s)")
        else:
            record["deadline_s"] = round(allowed, 1)
            began = time.monotonic()
            try:
                record["result"] = section.run(began + allowed)
                record["status"] = "ok"
                problems = record["result"].get("problems") if isinstance(record["result"], dict) else None
                if problems:
                    record.update(status="failed", reason="; ".join(problems))
            except Skip as e:
                record.update(status="skipped", reason=str(e))
            except TimeoutError as e:
                record.update(status="timed out", reason=str(e))
            except Exception as e:  # noqa: BLE001 - recorded, and the next section still runs
                record.update(status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
            record["seconds"] = round(time.monotonic() - began, 1)
        if record["status"] == "skipped":
            self.summary["skipped"].append(f"{section.name}: {record['reason']}")
        print(f"  {record['status']}" + (f": {record['reason']}" if record.get("reason") else ""), flush=True)
        self.write()

    def worker(self, name: str, kind: str, settings: dict[str, Any], deadline: float,
               env: dict[str, str] | None = None) -> tuple[list[dict], int | None]:
        """This script's `--worker KIND` in a child process: the JSON lines it printed before it ended or
        was stopped, and its exit status (None when stopped at the deadline)."""
        settings = {**settings, "deadline": deadline - time.monotonic()}
        code, stdout, stderr = self.run(name, [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                                               json.dumps(settings)], deadline, env)
        rows = []
        for line in stdout.splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        if code not in (0, None):
            last = (stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"error": f"worker exit {code}: {last[:300]}"})
        return rows, code

    # --- 1, 2 -------------------------------------------------------------------------------------
    def environment(self, deadline: float) -> dict[str, Any]:
        env: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                               "platform": platform.platform(), "cpus": os.cpu_count()}
        for module, dist in MODULES.items():
            env[dist] = installed_version(dist) or "not installed"
        code, stdout, _ = self.run("environment", [sys.executable, "-c", GPU_PROBE], deadline)
        if code == 0 and stdout.strip():
            env.update(json.loads(stdout.strip().splitlines()[-1]))
        self.summary["environment"] = env
        print("  " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
        if not self.smoke and not env.get("cuda_available"):
            self.summary["no_gpu"] = "torch sees no CUDA device: the GPU sections will fail; use --smoke on a CPU"
        return {}

    def packages(self, deadline: float) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.wheels is not None:
            target = self.work / "site"
            result["install"] = install_wheels(self.wheels, target, self.logs / "pip_install.log",
                                               max(1.0, deadline - time.monotonic() - 20))
            if result["install"]["installed"]:
                self.env["PYTHONPATH"] = os.pathsep.join((str(target), self.env["PYTHONPATH"]))
        code, stdout, _ = self.run("imports", [sys.executable, "-c", IMPORT_PROBE, json.dumps(list(MODULES))],
                                   deadline)
        if code is None:
            raise TimeoutError("importing the packages did not finish by the deadline")
        status = json.loads(stdout.strip().splitlines()[-1])
        self.available = {m: s["version"] for m, s in status.items() if s["ok"]}
        result["modules"] = {m: (s["version"] if s["ok"] else f"missing: {s['error']}") for m, s in status.items()}
        result["missing"] = [m for m, s in status.items() if not s["ok"]]
        return result

    # --- 3, 4 -------------------------------------------------------------------------------------
    def kernel_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.s["device"] == "cpu":
            env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on CPU tensors
        return env

    def kernel_correctness(self, deadline: float) -> dict[str, Any]:
        s = self.s
        rows, code = self.worker("kernel_correctness", "correctness",
                                 dict(sizes=s["correct_sizes"], dim=s["correct_dim"], tile=s["correct_tile"],
                                      device=s["device"]), deadline, self.kernel_env())
        problems = [f"N={r['n']} {r['path']}: " + (r.get("failed") or f"{', '.join(r['over'])} over tolerance")
                    for r in rows if r.get("over")]
        problems += [r["error"] for r in rows if "error" in r]
        done = {r["n"] for r in rows if "path" in r}
        if code is None:
            problems.append(f"stopped at its deadline; sizes done: {sorted(done)}")
        if not any("path" in r for r in rows):
            problems.append("no comparison finished")
        return {"rows": [r for r in rows if "path" in r], "tolerances": TOLERANCES, "problems": problems,
                "interpreter": s["device"] == "cpu"}

    def kernel_timings(self, deadline: float) -> dict[str, Any]:
        s = self.s
        rows, code = self.worker("kernel_timings", "timings",
                                 dict(triton_sizes=s["triton_sizes"], torch_sizes=s["torch_sizes"], dim=s["time_dim"],
                                      tile=s["time_tile"], device=s["device"], triton="triton" in self.available),
                                 deadline, self.kernel_env())
        problems = [r["error"] for r in rows if "error" in r]
        problems += [f"{r['method']} N={r['n']}: {r['failed']}" for r in rows if "failed" in r]
        if code is None:
            problems.append("stopped at its deadline (the rows are complete ones)")
        for r in rows:
            if "skipped" in r:
                self.summary["skipped"].append(f"kernel_timings {r['method']} N={r['n']}: {r['skipped']}")
        goal = next((r for r in rows if r.get("method") == GOAL["method"] and r.get("n") == GOAL["n"]
                     and "seconds" in r), None)
        return {"goal": {**GOAL, "measured": goal and {k: goal[k] for k in ("seconds", "peak_extra_mib")},
                         "met": bool(goal) and goal["seconds"] <= GOAL["seconds"]
                         and (goal["peak_extra_mib"] or 0) <= GOAL["peak_extra_mib"]},
                "dim": s["time_dim"], "device": s["device"], "tile": s["time_tile"],
                "interpreter": s["device"] == "cpu",
                "rows": [r for r in rows if "error" not in r], "problems": problems}

    # --- 5 ----------------------------------------------------------------------------------------
    def shards(self, deadline: float) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        s, rng = self.s, np.random.default_rng(0)
        data, folder = self.work / "data", self.work / "data" / "jpegs"
        # 16 classes; make-shards' --split-classes half sends the first 8 to train, the last 8 to test.
        for split, count, first in (("train", s["images"], 0), ("test", s["test_images"], 8)):
            for i in range(count):
                if time.monotonic() > deadline - 10:
                    raise TimeoutError(f"writing JPEGs: {i} of {count} {split} images by the deadline")
                side = s["side"]
                pixels = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
                target = folder / f"class{first + i % 8:03d}"
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).resize((side, side), Image.BILINEAR).save(target / f"{split}{i:06d}.jpg",
                                                                                   quality=90)
        code, _, _ = self.run("make_shards", [
            sys.executable, "-m", "rct_dist.cli", "make-shards", "--source", "folder", "--root", str(folder),
            "--out", str(data / "shards"), "--split-classes", "half", "--shard-size", str(s["shard_size"]),
            "--workers", str(s["shard_workers"])], deadline)
        if code != 0:
            raise RuntimeError("make-shards " + ("timed out" if code is None else "failed") + ": logs/make_shards.log")
        shutil.rmtree(folder, ignore_errors=True)
        return {"train_images": s["images"], "test_images": s["test_images"], "side": s["side"]}

    def config(self, ds_config: str, name: str) -> Path:
        s = self.s
        text = f"""
run: {{name: {name}, out_dir: {self.work / 'runs'}, overwrite: true}}
job: transfer
data: {{root: {self.work / 'data' / 'shards'}, image_size: {s['image_size']}, views: 2, batch_size: {s['batch']},
        workers: {s['workers']}, shuffle_buffer: 512, resampled: true, samples_per_epoch: {s['batch'] * s['steps']},
        uint8_batches: true}}
model: {{backbone: {s['student']}, embedding_size: 512, pretrained: false}}
teacher: {{source: model, backbone: {s['teacher']}, embedding_size: 512, pretrained: false}}
loss: {{name: rc}}
optim: {{lr: 1.0e-4, epochs: 1}}
deepspeed: {{config: {ds_config}}}
eval: {{batch_size: 128}}
log: {{every_steps: {s['log_every']}, retrieval_images: 0, projector_samples: 0}}
"""
        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path

    def needs_shards(self) -> None:
        if self.summary["sections"].get("shards", {}).get("status") != "ok":
            raise Skip("no shards (see the shards section)")

    def trainer(self, ds_config: str, deadline: float) -> dict[str, Any]:
        self.needs_shards()
        name = f"trainer_{ds_config}"
        code, _, stderr = self.run(name, [sys.executable, "-m", "rct_dist.cli", "transfer", "--config",
                                          str(self.config(ds_config, name))], deadline)
        if code is None:
            raise TimeoutError(f"stopped at its deadline: logs/{name}.log")
        if code != 0:
            raise RuntimeError(f"exit {code}: {_last_error(stderr)} (logs/{name}.log)")
        return window_summary(read_scalars(self.work / "runs" / name / "tensorboard"))

    def plain(self, mode: str, deadline: float) -> dict[str, Any]:
        self.needs_shards()
        name = f"plain_{mode}"
        code, stdout, stderr = self.run(name, [sys.executable, str(Path(__file__).resolve()), "--plain-worker",
                                               str(self.config(f"zero0_{mode}", name)), mode], deadline)
        if code is None:
            raise TimeoutError(f"stopped at its deadline: logs/{name}.log")
        if code != 0:
            raise RuntimeError(f"exit {code}: {_last_error(stderr)} (logs/{name}.log)")
        return json.loads(stdout.strip().splitlines()[-1])

    def plan(self) -> list[Section]:
        caps, torch_needs = self.s["caps"], ("torch",)
        sections = [Section("environment", (), caps["environment"], self.environment),
                    Section("packages", (), caps["packages"], self.packages),
                    Section("kernel_correctness", KERNEL_NEEDS, caps["kernel_correctness"], self.kernel_correctness),
                    Section("kernel_timings", torch_needs, caps["kernel_timings"], self.kernel_timings),
                    Section("shards", ("numpy", "PIL", "webdataset", "yaml"), caps["shards"], self.shards)]
        plain_done = set()
        for ds_config in self.s["ds_configs"]:
            sections.append(Section(f"trainer_{ds_config}", TRAIN_NEEDS, caps["trainer"],
                                    lambda deadline, c=ds_config: self.trainer(c, deadline)))
            mode = precision(ds_config)
            if mode not in plain_done:
                plain_done.add(mode)
                sections.append(Section(f"plain_{mode}", TRAIN_NEEDS, caps["plain"],
                                        lambda deadline, m=mode: self.plain(m, deadline)))
        return sections

    # --- files ------------------------------------------------------------------------------------
    def write(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.start, 1)
        self.summary["logs_archive"] = write_logs_archive(self.logs, self.out / "logs.tar.gz")
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        (self.out / "report.md").write_text(report(self.summary))


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["?"])[-1].strip()[:300]


GPU_PROBE = """
import json, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
               capability=".".join(map(str, torch.cuda.get_device_capability(0))), cudnn=torch.backends.cudnn.version(),
               nccl=".".join(map(str, torch.cuda.nccl.version())), bf16_supported=torch.cuda.is_bf16_supported())
print(json.dumps(env))
"""

IMPORT_PROBE = """
import importlib, json, sys
status = {}
for name in json.loads(sys.argv[1]):
    try:
        module = importlib.import_module(name)
        status[name] = {"ok": True, "version": str(getattr(module, "__version__", "?")),
                        "file": str(getattr(module, "__file__", ""))}
    except Exception as e:
        status[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(status))
"""


# --- wheels -----------------------------------------------------------------------------------------

def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _newer(wheel_version: str, have: str | None) -> bool:
    if have is None:
        return True
    try:
        from packaging.version import Version

        return Version(wheel_version) > Version(have)
    except Exception:  # noqa: BLE001 - no packaging, or an odd version: install unless equal
        return wheel_version != have


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return name.lower().replace("_", "-").replace(".", "-"), version


def install_wheels(wheels: Path, target: Path, log: Path, timeout: float) -> dict[str, Any]:
    """Install, offline, the wheels of `wheels` whose distribution this interpreter lacks or has older,
    into `target` (put first on the path: `sys.path` here, PYTHONPATH for the children):

        python -m pip install --no-index --no-deps --no-compile --target TARGET WHEEL ...

    --no-deps: the folder holds exactly what is missing (docs/gpu_check.md), nothing is resolved.
    """
    chosen, kept = [], {}
    for wheel in sorted(wheels.glob("*.whl")):
        dist, version = wheel_name(wheel)
        have = installed_version(dist)
        if _newer(version, have):
            chosen.append(wheel)
        else:
            kept[dist] = have
    result: dict[str, Any] = {"wheels": str(wheels), "target": str(target), "kept": kept,
                              "installed": [wheel.name for wheel in chosen]}
    if not chosen:
        return result
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(target), *map(str, chosen)]
    result["command"] = " ".join(cmd)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log.write_text(f"$ {result['command']}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}")
        result["exit"] = done.returncode
    except subprocess.TimeoutExpired:
        result["exit"] = None
    if result["exit"] == 0:
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    return result


# --- logs archive -----------------------------------------------------------------------------------

def _kept_text(data: bytes) -> bytes:
    if len(data) <= 2 * LOG_PART:
        return data
    cut = len(data) - 2 * LOG_PART
    return data[:LOG_PART] + f"\n[... {cut:,} bytes left out ...]\n".encode() + data[-LOG_PART:]


def write_logs_archive(logs: Path, archive: Path) -> dict[str, Any]:
    """logs.tar.gz of the scratch logs: each log's head and tail (LOG_PART each), in the order they were
    written, while their kept text stays within LOG_ARCHIVE_BYTES; the rest named in the summary."""
    kept, left_out, total = [], [], 0
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime):
            data = _kept_text(path.read_bytes())
            if total + len(data) + 1024 > LOG_ARCHIVE_BYTES:
                left_out.append(path.name)
                continue
            info = tarfile.TarInfo(f"logs/{path.name}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
            kept.append(path.name)
            total += len(data) + 1024
    archive.write_bytes(buffer.getvalue())
    return {"kept": kept, "left_out": left_out, "bytes": archive.stat().st_size}


# --- workers (child processes) ----------------------------------------------------------------------

def _emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def triton_precisions() -> list[str]:
    """Precision modes the installed kernels let a caller choose; ["ieee"] when there is no choice."""
    import inspect

    from rct_dist.losses import RelaxedContrastiveLoss

    return list(PRECISIONS) if "precision" in inspect.signature(RelaxedContrastiveLoss).parameters else ["ieee"]


def make_loss(path: str, tile: int):
    """path: torch_untiled | torch_tiled | triton_<precision>."""
    from rct_dist.losses import RelaxedContrastiveLoss

    if path == "torch_untiled":
        return RelaxedContrastiveLoss(chunk_size=0, kernel="torch")
    if path == "torch_tiled":
        return RelaxedContrastiveLoss(chunk_size=tile, kernel="torch")
    mode = path.split("_", 1)[1]
    extra = {} if triton_precisions() == ["ieee"] else {"precision": mode}
    return RelaxedContrastiveLoss(kernel="triton", **extra)


def _inputs(n: int, dim: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    if n > DUPLICATE[1]:
        student[DUPLICATE[1]], teacher[DUPLICATE[1]] = student[DUPLICATE[0]], teacher[DUPLICATE[0]]
    return student.to(device), teacher.to(device)


def _evaluate(loss_fn, student, teacher) -> dict[str, Any]:
    x = student.detach().clone().requires_grad_(True)
    loss, parts = loss_fn(x, teacher, return_parts=True)
    loss.backward()
    return {"value": loss.detach().double(), "pull": parts["pull"].double(), "push": parts["push"].double(),
            "grad": x.grad.double()}


def correctness_worker(settings: dict[str, Any]) -> None:
    """Each path against float64 (the torch untiled loss in float64), one JSON line per (N, path)."""
    import torch

    paths = ["torch_untiled", "torch_tiled", *(f"triton_{p}" for p in triton_precisions())]
    device, dim, tile = settings["device"], settings["dim"], settings["tile"]
    for n in settings["sizes"]:
        student, teacher = _inputs(n, dim, device, seed=n)
        ref = _evaluate(make_loss("torch_untiled", tile), student.double(), teacher.double())
        for path in paths:
            mode = path.split("_", 1)[1] if path.startswith("triton") else "ieee"
            try:
                got = _evaluate(make_loss(path, tile), student, teacher)
            except Exception as e:  # noqa: BLE001 - recorded; the other paths and sizes still run
                _emit({"n": n, "dim": dim, "path": path, "precision": mode, "failed": f"{type(e).__name__}: {e}"[:300],
                       "over": ["failed"]})
                continue
            errors = {k: (got[k] - ref[k]).abs().item() / max(ref[k].abs().item(), 1e-30)
                      for k in ("value", "pull", "push")}
            errors["grad"] = ((got["grad"] - ref["grad"]).abs().max() / ref["grad"].abs().max().clamp_min(1e-30)).item()
            tol = TOLERANCES[mode]
            over = [k for k, e in errors.items() if not e <= tol["grad" if k == "grad" else "value"]]
            judged = not (device == "cpu" and mode != "ieee")
            if not judged:  # Triton's interpreter does not round tf32/bf16 products as the GPU does
                over = []
            _emit({"n": n, "dim": dim, "path": path, "precision": mode, "value": got["value"].item(),
                   "reference": ref["value"].item(), "errors": errors, "over": over, "judged": judged,
                   "finite_grad": bool(torch.isfinite(got["grad"]).all())})
        del student, teacher, ref


def timings_worker(settings: dict[str, Any]) -> None:
    """Forward alone and forward + backward (medians of 3 after one warm-up call, which compiles the
    kernels) and the peak memory beyond the inputs; Triton first (bf16, tf32, ieee), then torch tiled."""
    import torch

    device, dim, tile = settings["device"], settings["dim"], settings["tile"]
    deadline = time.monotonic() + settings["deadline"]
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plan = [(f"triton_{p}", sizes) for p, sizes in settings["triton_sizes"].items() if p in triton_precisions()] \
        if settings["triton"] else []
    if not settings["triton"]:
        _emit({"method": "triton", "n": 0, "skipped": "triton is not installed"})
    plan.append(("torch_tiled", settings["torch_sizes"]))
    for path, ns in plan:
        try:
            loss_fn, previous = make_loss(path, tile), None
        except Exception as e:  # noqa: BLE001 - this path cannot run here; the next one still does
            _emit({"method": path, "n": 0, "failed": f"{type(e).__name__}: {e}"[:300]})
            continue
        for n in ns:
            if previous is not None:
                predicted = previous[1] * (n / previous[0]) ** 2 * 7 + 2  # warm-up, 3 + 3 timed, inputs
                if time.monotonic() + predicted > deadline:
                    _emit({"method": path, "n": n, "skipped": f"predicted {predicted:.0f} s exceeds the time left"})
                    break
            try:
                student, teacher = _inputs(n, dim, device, seed=1)
                student.requires_grad_(True)
                loss_fn(student, teacher).backward()  # warm-up (compilation, autotuning) at the full size
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                seconds, forward = [], []
                for _ in range(3):
                    student.grad = None
                    began = time.perf_counter()
                    loss = loss_fn(student, teacher)
                    loss.backward()
                    sync()
                    seconds.append(time.perf_counter() - began)
                extra = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
                for _ in range(3):
                    began = time.perf_counter()
                    loss_fn(student, teacher)
                    sync()
                    forward.append(time.perf_counter() - began)
                _emit({"method": path, "n": n, "seconds": statistics.median(seconds),
                       "forward_seconds": statistics.median(forward), "peak_extra_mib": extra, "loss": loss.item()})
                previous = (n, statistics.median(seconds))
            except Exception as e:  # noqa: BLE001 - out of memory, say: the next method still runs
                _emit({"method": path, "n": n, "failed": f"{type(e).__name__}: {e}"[:300]})
                break
            finally:
                student = teacher = None
                if cuda:
                    torch.cuda.empty_cache()


def plain_worker(config_file: str, mode: str) -> dict[str, Any]:
    """The same transfer without DeepSpeed: models, loader, batch and device feed of the trainer."""
    import torch
    import torch.distributed as dist

    from rct_dist.config import load_config
    from rct_dist.data.loader import ShardIndex, make_loader
    from rct_dist.data.transforms import build_transform
    from rct_dist.distributed import free_port
    from rct_dist.models.preprocess import preprocess_for
    from rct_dist.train.build import build_task, build_teacher
    from rct_dist.train.feed import DeviceFeed, prepare_models
    from rct_dist.train.loop import seed_everything
    from rct_dist.train.timing import StepTimer, device_sync

    cfg = load_config(config_file)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, **process_group_options(cuda, local_rank))
    seed_everything(cfg.run.seed)
    preprocess = preprocess_for(cfg)
    index = ShardIndex.load(Path(cfg.data.root) / cfg.data.train_split)
    task = build_task(cfg, index.classes)
    teacher = build_teacher(cfg, device)
    prepare_models(cfg, device, task.net, teacher)
    task.to(device).train()
    optimizer = torch.optim.AdamW(task.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    feed = DeviceFeed.for_run(cfg, preprocess, device, torch.float32)
    loader = make_loader(index, batch_size=cfg.data.batch_size, train=True, image_size=cfg.data.image_size,
                         views=cfg.data.views, seed=cfg.run.seed, workers=cfg.data.workers,
                         shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                         samples_per_epoch=cfg.data.samples_per_epoch, rank=0, world=1,
                         transform=build_transform(cfg.data.image_size, True, scale=tuple(cfg.data.crop_scale),
                                                   hflip=cfg.data.hflip, uint8=cfg.data.uint8_batches,
                                                   **preprocess.transform_kwargs()))
    timer, windows = StepTimer(sync=device_sync(device)), []
    timer.start()
    for step, batch in enumerate(loader, 1):
        images, labels, _, n_images, n_views = feed(batch.images, batch.labels)
        timer.data_ready()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                target = teacher(images)
            loss, _, student = task(images, labels, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        timer.step_done(n_images, n_views)
        if step % cfg.log.every_steps == 0:
            windows.append(timer.read().scalars(1))
        timer.next_step()
    result = {key: statistics.median(w[f"throughput/{key}"] for w in (windows[1:] or windows))
              for key in ("images_per_s", "views_per_s", "data_wait_fraction", "step_seconds")}
    result["windows"] = len(windows)
    result["loss_share"] = loss_share(task.transfer, student.float(), target.float(), result["step_seconds"],
                                      device)
    dist.destroy_process_group()
    return result


def loss_share(loss_fn, student, teacher, step_seconds: float, device) -> dict[str, float]:
    """Seconds of the RC loss forward + backward (all-gather included) on one step's embeddings, and
    their share of the whole step."""
    from rct_dist.train.timing import device_sync

    sync = device_sync(device) or (lambda: None)
    student = student.detach().requires_grad_(True)
    loss_fn(student, teacher).backward()  # warm-up
    sync()
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        student.grad = None
        loss_fn(student, teacher).backward()
    sync()
    seconds = (time.perf_counter() - start) / repeats
    return {"rows": student.shape[0], "seconds": seconds, "share_of_step": seconds / step_seconds,
            "note": "world size 1: the all-gather moves nothing between devices"}


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def window_summary(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """Medians of the logged windows after the first (which holds start-up: cuDNN autotuning, workers)."""
    def median(tag: str) -> float | None:
        values = [v for _, v in scalars.get(tag, [])]
        values = values[1:] if len(values) > 1 else values
        return statistics.median(values) if values else None

    return {"windows": len(scalars.get("throughput/images_per_s", [])),
            **{key: median(f"throughput/{key}") for key in
               ("images_per_s", "views_per_s", "data_wait_fraction", "step_seconds")}}


# --- report -----------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def report(summary: dict[str, Any]) -> str:
    sections = summary["sections"]
    lines = ["# GPU check" + (" (smoke: CPU, tiny sizes, not a measurement)" if summary["smoke"] else ""), "",
             f"Ran {summary.get('seconds', 0):.0f} s of a {summary['budget_s']:.0f} s budget.", "",
             "| section | status | seconds | note |", "|---|---|---:|---|"]
    for name, r in sections.items():
        lines.append(f"| {name} | {r.get('status', 'running')} | {_fmt(r.get('seconds'))} | "
                     f"{str(r.get('reason', '')).replace('|', '/')[:300]} |")
    env = summary.get("environment", {})
    if env:
        lines += ["", "## Environment", "", "| item | value |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in env.items())]
    install = sections.get("packages", {}).get("result", {}).get("install")
    if install:
        lines += ["", f"Installed from {install['wheels']}: {', '.join(install['installed']) or 'nothing'} "
                  f"(exit {install.get('exit', '-')}); kept: {install['kept'] or 'none'}."]
    correct = sections.get("kernel_correctness", {}).get("result")
    if correct and correct.get("rows"):
        lines += ["", "## Kernel correctness against float64" + (" (Triton's interpreter: tf32/bf16 not judged)"
                                                                  if correct["interpreter"] else ""), "",
                  f"Tolerances: {json.dumps(correct['tolerances'])}", "",
                  "| N | path | value | value err | pull err | push err | grad err | within tolerance |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in correct["rows"]:
            if "failed" in r:
                lines.append(f"| {r['n']:,} | {r['path']} | failed: {r['failed']} | | | | | no |")
                continue
            e = r["errors"]
            verdict = ("no: " + ", ".join(r["over"])) if r["over"] else "yes" if r.get("judged", True) else "not judged"
            lines.append(f"| {r['n']:,} | {r['path']} | {r['value']:.6g} | {e['value']:.1e} | {e['pull']:.1e} | "
                         f"{e['push']:.1e} | {e['grad']:.1e} | {verdict} |")
    timing = sections.get("kernel_timings", {}).get("result")
    if timing and timing.get("rows"):
        lines += ["", f"## RC loss forward + backward (D = {timing['dim']}, {timing['device']}"
                  + (", Triton's interpreter: not a timing" if timing["interpreter"] else "") + ")", "",
                  "| method | N | forward + backward s | forward s | peak extra MiB |", "|---|---:|---:|---:|---:|"]
        for r in timing["rows"]:
            if "seconds" in r:
                lines.append(f"| {r['method']} | {r['n']:,} | {r['seconds']:.4f} | {r['forward_seconds']:.4f} | "
                             f"{_fmt(r['peak_extra_mib'], 0)} |")
            else:
                lines.append(f"| {r['method']} | {r['n']:,} | {r.get('failed') or 'skipped: ' + r['skipped']} | | |")
        goal = timing.get("goal") or {}
        lines += ["", f"Goal ({goal.get('method')}, N = {goal.get('n', 0):,}: "
                  f"<= {goal.get('seconds', 0) * 1000:.0f} ms, <= {goal.get('peak_extra_mib', 0):,} MiB "
                  "beyond the inputs): "
                  + ("met" if goal.get("met") else f"not met (measured: {goal.get('measured') or 'none'})")]
    trainer_rows = [(n[len("trainer_"):], r) for n, r in sections.items() if n.startswith("trainer_")]
    if trainer_rows:
        lines += ["", "## Transfer (images/s count dataset images; each is 2 views)", "",
                  "| DeepSpeed config | status | DeepSpeed images/s | plain PyTorch images/s | DeepSpeed / plain | "
                  "data wait (DS) | step s (DS) | RC loss share of a plain step |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for ds_config, r in trainer_rows:
            t = r.get("result") or {}
            p = sections.get(f"plain_{precision(ds_config)}", {}).get("result") or {}
            ratio = (t["images_per_s"] / p["images_per_s"]) if t.get("images_per_s") and p.get("images_per_s") \
                else None
            share = (p.get("loss_share") or {}).get("share_of_step")
            lines.append(f"| {ds_config} | {r.get('status')} | {_fmt(t.get('images_per_s'))} | "
                         f"{_fmt(p.get('images_per_s'))} | {_fmt(ratio, 2)} | {_fmt(t.get('data_wait_fraction'), 2)} | "
                         f"{_fmt(t.get('step_seconds'), 3)} | {_fmt(share, 3)} |")
    if summary["skipped"]:
        lines += ["", "## Skipped", "", *(f"- {s}" for s in summary["skipped"])]
    archive = summary.get("logs_archive") or {}
    if archive.get("left_out"):
        lines += ["", f"Logs left out of logs.tar.gz (size cap): {', '.join(archive['left_out'])}."]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="output folder (default: $OUT); receives at most "
                        f"{MAX_FILES} small files")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install missing packages from (offline; "
                        "docs/gpu_check.md)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, the Triton kernels in Triton's "
                        "interpreter, the trainer under the shipped configs a CPU runs (not fp16): tests the script")
    parser.add_argument("--budget", type=float, help=f"total seconds (default {BUDGET:.0f}; --smoke: 240)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        parser.error("give an output folder, or set OUT")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="rct-dist-gpu-check-")))
    if work == out or out in work.parents:
        parser.error(f"the scratch folder {work} must not lie inside the output folder {out}")
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, args.smoke, args.budget, args.wheels.resolve() if args.wheels else None)
    print(f"gpu check: output {out} (at most {MAX_FILES} files), scratch {work}, budget {check.budget:.0f} s",
          flush=True)
    try:
        for section in check.plan():
            check.section(section)
    finally:
        check.write()
        if not (args.keep_work or args.work):
            shutil.rmtree(work, ignore_errors=True)
    print((out / "report.md").read_text())
    bad = [n for n, r in check.summary["sections"].items() if r["status"] in ("failed", "timed out")]
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-worker":
        print(json.dumps(plain_worker(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker":
        {"correctness": correctness_worker, "timings": timings_worker}[sys.argv[2]](json.loads(sys.argv[3]))
    else:
        sys.exit(main())
