"""One-command GPU check: environment, RC loss at scale, and the real trainer against a plain PyTorch loop.

    python bench/gpu_check.py OUT_DIR [--wheels WHEELS_DIR]     # one GPU, about 8 minutes at most
    python bench/gpu_check.py OUT_DIR --smoke                    # CPU, tiny sizes, fp32 only (CI)

The output folder is the argument, else the OUT environment variable. Everything lands there:
`summary.json` (every figure, every error), `report.md` (the same as tables) and `logs/` (each
subprocess's output). A section that fails is recorded and the next one runs.

1. Imports. torch, torchvision, deepspeed, timm, webdataset, tensorboard and their dependencies are
   imported first; with `--wheels DIR` the missing ones are installed from that folder only
   (`pip install --no-index --find-links DIR`), into a folder put on the path when the
   interpreter's site-packages is read-only. Prepare DIR on a machine with a package index, with the
   GPU machine's Python version (deepspeed is an sdist: build its pure-Python wheel):

       pip download -d DIR --python-version 3.12 --only-binary=:all: webdataset timm tensorboard hjson \\
           pydantic pydantic_core annotated_types typing_inspection typing_extensions braceexpand \\
           py-cpuinfo msgpack ninja psutil einops pyyaml safetensors huggingface_hub
       pip wheel --no-deps deepspeed -w DIR

2. Environment: versions of Python, torch, CUDA, cuDNN, NCCL, deepspeed, timm, webdataset, the GPU.
3. `bench/loss.py` (each method and N in its own process): naive and core up to 65,536 rows
   (their N x N matrices outgrow memory after that), tiled and triton (when loss.py has it) up to
   1,048,576; D = 512. A method stops at its first failure; a size whose time, extrapolated as N^2
   from the previous one, would not fit the section's budget is skipped and said so.
4. The real trainer (`rct-dist transfer`, one process, nccl), ResNet-50 teacher -> ResNet-18 student,
   224 px, 2 views, no pretrained weights, on JPEG shards generated here and written with
   `rct-dist make-shards --source folder`; DeepSpeed bf16, fp16 and fp32 (ZeRO 0). Images/s is the
   median of the logged windows after the first (start-up) one.
5. A plain PyTorch loop (no DeepSpeed) over the same models, loader, batch and device feed, with
   torch.autocast for bf16/fp16 (GradScaler for fp16): images/s, the trainer's share of it, and the
   share of a step spent in the RC loss forward + backward with its all-gather (world size 1 here).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("torch", "torchvision", "numpy", "PIL", "yaml", "deepspeed", "timm", "webdataset", "tensorboard",
            "hjson", "pydantic", "safetensors")
MODES = ("bf16", "fp16", "fp32")


def sizes(smoke: bool) -> dict[str, Any]:
    """Every size of the check; --smoke shrinks them to a CPU minute (and uses the package's small CNNs)."""
    if smoke:
        return dict(device="cpu", modes=("fp32",), dim=32, loss_sizes=[256], dense_max=256, tile=128,
                    images=64, test_images=16, side=48, image_size=32, batch=8, steps=4, log_every=2,
                    workers=1, shard_size=16, shard_workers=1, budget=170, teacher="rct_cnn4", student="rct_cnn3_small")
    workers = max(1, min(15, (os.cpu_count() or 2) - 1))
    return dict(device="cuda", modes=MODES, dim=512, loss_sizes=[8192, 32768, 65536, 131072, 524288, 1048576],
                dense_max=65536, tile=8192, images=4096, test_images=256, side=320, image_size=224, batch=128,
                steps=50, log_every=10, workers=workers, shard_size=128, shard_workers=4, budget=470,
                teacher="resnet50", student="resnet18")


class Check:
    def __init__(self, out: Path, smoke: bool) -> None:
        self.out, self.smoke, self.s = out, smoke, sizes(smoke)
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.summary: dict[str, Any] = {"smoke": smoke, "sizes": self.s, "errors": {}, "skipped": []}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("HF_HUB_OFFLINE", "1")

    def left(self) -> float:
        return self.s["budget"] - (time.monotonic() - self.start)

    def run(self, name: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
        """A subprocess with its output in logs/NAME.log; None when it ran out of time."""
        log = self.logs / f"{name}.log"
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT,
                                  timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired as e:
            log.write_text(f"$ {' '.join(cmd)}\nTIMED OUT after {timeout:.0f} s\n{e.stdout or ''}\n{e.stderr or ''}")
            return None
        log.write_text(f"$ {' '.join(cmd)}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def section(self, name: str, fn, *args) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {name}", flush=True)
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded, and the next section still runs
            self.summary["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"  {name} failed: {e}", flush=True)
        self.write()

    # 1 + 2 -----------------------------------------------------------------------------------------
    def imports(self, wheels: Path | None) -> None:
        missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
        self.summary["missing_before"] = missing
        if missing and wheels:
            target = None
            site = Path(importlib.util.find_spec("pip").origin).parents[1] if importlib.util.find_spec("pip") else None
            if site is None or not os.access(site, os.W_OK):
                target = Path(tempfile.gettempdir()) / "rct-dist-gpu-check-packages"
            names = {"PIL": "pillow", "yaml": "pyyaml"}
            cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                   *(["--target", str(target)] if target else []), *(names.get(m, m) for m in missing)]
            done = self.run("pip_install", cmd, 300)
            if target:
                sys.path.insert(0, str(target))
                self.env["PYTHONPATH"] = os.pathsep.join((str(target), self.env["PYTHONPATH"]))
            importlib.invalidate_caches()
            self.summary["pip_install"] = {"command": cmd, "exit": None if done is None else done.returncode}
        still = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
        self.summary["missing"] = still
        if still:
            raise RuntimeError(f"missing modules {still}: pass --wheels DIR (see this script's docstring)")

    def environment(self) -> None:
        import torch

        env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                               "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                               "cuda_available": torch.cuda.is_available()}
        for package in ("torchvision", "deepspeed", "timm", "webdataset", "triton"):
            try:  # the installed distribution's version; importing deepspeed alone takes seconds
                env[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                env[package] = "not installed"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                       bf16_supported=torch.cuda.is_bf16_supported())
        self.summary["environment"] = env
        if not self.smoke and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device: run with --smoke on a CPU")

    # 3 ---------------------------------------------------------------------------------------------
    def loss(self) -> None:
        spec = importlib.util.spec_from_file_location("rct_bench_loss", ROOT / "bench" / "loss.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        methods = [m for m in getattr(bench, "METHODS", ("naive", "core", "tiled"))
                   if m != "triton" or self.s["device"] == "cuda"]
        s, rows = self.s, []
        deadline = time.monotonic() + min(self.left() * 0.4, 200)
        for method in methods:
            previous = None
            for n in s["loss_sizes"]:
                if method in ("naive", "core") and n > s["dense_max"]:
                    break
                budget = deadline - time.monotonic()
                if previous and previous[1] * (n / previous[0]) ** 2 * 2 + 10 > budget:
                    self.summary["skipped"].append(f"loss {method} N={n}: predicted time exceeds the budget left")
                    break
                settings = dict(method=method, n=n, dim=s["dim"], device=s["device"], tile=s["tile"], threads=0,
                                repeats=2 if n <= 131072 else 1)
                done = self.run(f"loss_{method}_{n}", [sys.executable, str(ROOT / "bench" / "loss.py"), "--worker",
                                                       *(str(settings[k]) for k in settings)], budget)
                if done is None or done.returncode != 0:
                    rows.append({"method": method, "n": n, "failed": "timed out" if done is None else
                                 (done.stderr.strip().splitlines() or ["?"])[-1][:200]})
                    break
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"method": method, "n": n, "seconds": result["seconds"],
                             "peak_mib": result["extra_mib"], "loss": result["loss"]})
                previous = (n, result["seconds"])
        self.summary["loss"] = {"dim": s["dim"], "device": s["device"], "tile": s["tile"], "rows": rows}

    # 4 ---------------------------------------------------------------------------------------------
    def shards(self) -> None:
        import numpy as np
        from PIL import Image

        s, rng = self.s, np.random.default_rng(0)
        data, folder = self.out / "data", self.out / "data" / "jpegs"
        # 16 classes; make-shards' --split-classes half sends the first 8 to train, the last 8 to test.
        for split, count, first in (("train", s["images"], 0), ("test", s["test_images"], 8)):
            for i in range(count):
                side = s["side"]
                pixels = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
                target = folder / f"class{first + i % 8:03d}"
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).resize((side, side), Image.BILINEAR).save(target / f"{split}{i:06d}.jpg",
                                                                                   quality=90)
        done = self.run("make_shards", [
            sys.executable, "-m", "rct_dist.cli", "make-shards", "--source", "folder", "--root", str(folder),
            "--out", str(data / "shards"), "--split-classes", "half", "--shard-size", str(s["shard_size"]),
            "--workers", str(s["shard_workers"])], 120)
        if done is None or done.returncode != 0:
            raise RuntimeError("make-shards failed: see logs/make_shards.log")
        self.summary["shards"] = {"train_images": s["images"], "test_images": s["test_images"], "side": s["side"]}

    def config(self, mode: str, name: str) -> Path:
        s = self.s
        text = f"""
run: {{name: {name}, out_dir: {self.out / 'runs'}, overwrite: true}}
job: transfer
data: {{root: {self.out / 'data' / 'shards'}, image_size: {s['image_size']}, views: 2, batch_size: {s['batch']},
        workers: {s['workers']}, shuffle_buffer: 512, resampled: true, samples_per_epoch: {s['batch'] * s['steps']},
        uint8_batches: true}}
model: {{backbone: {s['student']}, embedding_size: 512, pretrained: false}}
teacher: {{source: model, backbone: {s['teacher']}, embedding_size: 512, pretrained: false}}
loss: {{name: rc}}
optim: {{lr: 1.0e-4, epochs: 1}}
deepspeed: {{config: zero0_{mode}}}
eval: {{batch_size: 128}}
log: {{every_steps: {s['log_every']}, retrieval_images: 0, projector_samples: 0}}
"""
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path

    def trainer(self, mode: str) -> None:
        name = f"deepspeed_{mode}"
        done = self.run(name, [sys.executable, "-m", "rct_dist.cli", "transfer", "--config",
                               str(self.config(mode, name))], min(self.left(), 150))
        if done is None or done.returncode != 0:
            raise RuntimeError(f"{name} {'timed out' if done is None else 'failed'}: see logs/{name}.log")
        scalars = read_scalars(self.out / "runs" / name / "tensorboard")
        self.summary.setdefault("trainer", {})[mode] = window_summary(scalars)

    # 5 ---------------------------------------------------------------------------------------------
    def plain(self, mode: str) -> None:
        name = f"plain_{mode}"
        done = self.run(name, [sys.executable, str(Path(__file__).resolve()), "--plain-worker",
                               str(self.config(mode, name)), mode], min(self.left(), 150))
        if done is None or done.returncode != 0:
            raise RuntimeError(f"{name} {'timed out' if done is None else 'failed'}: see logs/{name}.log")
        self.summary.setdefault("plain", {})[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    def write(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.start, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        (self.out / "report.md").write_text(report(self.summary))


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


def plain_worker(config_file: str, mode: str) -> dict[str, Any]:
    """The same transfer without DeepSpeed: models, loader, batch and device feed of the trainer."""
    import torch
    import torch.distributed as dist

    from rct_dist.config import load_config
    from rct_dist.data.loader import ShardIndex, make_loader
    from rct_dist.data.transforms import build_transform, preprocess_for
    from rct_dist.train.feed import DeviceFeed, prepare_models
    from rct_dist.train.loop import build_task, build_teacher, seed_everything
    from rct_dist.train.timing import StepTimer, device_sync

    cfg = load_config(config_file)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, **({"device_id": device} if cuda else {}))
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
        images, labels = batch.images, batch.labels
        images, labels, _, n_images, n_views = feed(images, labels)
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
    import torch

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


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def report(summary: dict[str, Any]) -> str:
    env = summary.get("environment", {})
    lines = ["# GPU check" + (" (smoke: CPU, tiny sizes, not a measurement)" if summary["smoke"] else ""), "",
             f"Ran {summary.get('seconds', 0):.0f} s.", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    loss = summary.get("loss")
    if loss:
        lines += ["", f"## RC loss forward + backward (D = {loss['dim']}, {loss['device']}, tile {loss['tile']})", "",
                  "| method | N | seconds | peak MiB |", "|---|---:|---:|---:|"]
        for r in loss["rows"]:
            lines.append(f"| {r['method']} | {r['n']:,} | " + (f"failed: {r['failed']} | |" if "failed" in r else
                         f"{r['seconds']:.4f} | {r['peak_mib']:,.0f} |"))
    trainer, plain = summary.get("trainer", {}), summary.get("plain", {})
    if trainer or plain:
        lines += ["", "## Transfer, ResNet-50 -> ResNet-18 (images/s count dataset images; each is 2 views)", "",
                  "| mode | DeepSpeed images/s | plain PyTorch images/s | DeepSpeed / plain | data wait (DS) | "
                  "step s (DS) | RC loss share of a plain step |", "|---|---:|---:|---:|---:|---:|---:|"]
        for mode in MODES:
            t, p = trainer.get(mode, {}), plain.get(mode, {})
            if not t and not p:
                continue
            ratio = (t["images_per_s"] / p["images_per_s"]) if t.get("images_per_s") and p.get("images_per_s") \
                else None
            share = p.get("loss_share", {}).get("share_of_step")
            lines.append(f"| {mode} | {_fmt(t.get('images_per_s'))} | {_fmt(p.get('images_per_s'))} | "
                         f"{_fmt(ratio, 2)} | {_fmt(t.get('data_wait_fraction'), 2)} | "
                         f"{_fmt(t.get('step_seconds'), 3)} | {_fmt(share, 3)} |")
    if summary["errors"] or summary["skipped"]:
        lines += ["", "## Errors and skips", ""]
        lines += [f"- {k}: {v}" for k, v in summary["errors"].items()]
        lines += [f"- skipped {s}" for s in summary["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, help="output folder (default: $OUT)")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install missing packages from (offline)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, fp32 only: tests the script itself")
    args = parser.parse_args()
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        parser.error("give an output folder, or set OUT")
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.smoke)
    check.section("imports", check.imports, args.wheels)
    if "imports" in check.summary["errors"]:
        sys.exit(1)
    check.section("environment", check.environment)
    check.section("loss", check.loss)
    check.section("shards", check.shards)
    if "shards" not in check.summary["errors"]:
        for mode in check.s["modes"]:
            for kind in ("trainer", "plain"):
                if check.left() < 30:
                    check.summary["skipped"].append(f"{kind} {mode}: out of time")
                    continue
                check.section(f"{kind}_{mode}", getattr(check, kind), mode)
    check.write()
    print((out / "report.md").read_text())
    sys.exit(1 if check.summary["errors"] else 0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--plain-worker":
        print(json.dumps(plain_worker(sys.argv[2], sys.argv[3])))
    else:
        main()
