"""What a run shows while it trains, on rank 0 only: TensorBoard scalars, pictures, the resolved config
(text and hparams), a projector view of the eval embeddings, a progress bar, and `results.jsonl`.

- Resume: the TensorBoard writer opens lazily, after `start(..., step=S)` has set `purge_step=S + 1`,
  so events a crashed run wrote after its last checkpoint (step S) are hidden and the replayed steps
  appear once.
- Config: the resolved config as YAML (a code block in the TEXT tab, tag `config`) and as hparams,
  one `section.key` per entry (lists and null as strings). The hparams metrics are the eval scalars
  `eval/recall@<min k>` and `eval/map@r` of the same run, so the HPARAMS tab shows their latest values,
  the final metrics once the run has ended.
- Projector: `write_projector` writes `projector/<step>/{tensors,metadata}.tsv` and `sprite.png`
  (the thumbnails `ThumbnailCache` kept while the eval pass ran, gathered from every rank by
  `projector_sample`) and lists them in `projector_config.pbtxt`.
- `results.jsonl` in the run folder: one JSON line per evaluation, appended with a single write and
  fsynced, never truncated; after a resume a step evaluated twice has two lines, the later one counts.
- Messages (`say`: evaluations, resumes, early stops) are INFO records of the `rct_dist.train` logger:
  with `rct_dist.logs.setup_logging` on stderr and in the run's `train.log`. The progress bar stays a
  bar on stderr; at an epoch's end (or when the run stops inside one) its final state is one INFO line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rct_dist.atomic import atomic_write
from rct_dist.distributed import all_gather_rows, all_gather_stats, world_rank

PROJECTOR_FOLDER = "projector"
PROJECTOR_CONFIG = "projector_config.pbtxt"
MISSING_THUMBNAIL = 48  # gray level of a sprite tile whose image no rank kept

log = logging.getLogger("rct_dist.train")


def distance_correlation(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Pearson correlation of the pairwise distances of teacher and student on one batch: how much of
    the teacher's geometry the student already has (1 = same up to scale)."""
    n = teacher.shape[0]
    upper = torch.triu_indices(n, n, 1, device=teacher.device)
    t = torch.cdist(teacher.float(), teacher.float())[upper[0], upper[1]]
    s = torch.cdist(student.float(), student.float())[upper[0], upper[1]]
    return torch.corrcoef(torch.stack([t, s]))[0, 1].item()


def flatten_hparams(config: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """`{"data": {"pk": [5, 4]}}` -> `{"data.pk": "[5, 4]"}`: scalars kept, lists and None as strings."""
    flat: dict[str, int | float | str | bool] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    visit("", config)
    return flat


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line with a single O_APPEND write, then fsync: a reader or a crash
    sees whole lines only, and earlier lines are never rewritten."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def gather_thumbnails(keys: Sequence[str], cache, device: torch.device) -> torch.Tensor | None:
    """(len(keys), 3, size, size) uint8 thumbnails of `keys` from every rank's `ThumbnailCache` on rank 0
    (gray where no rank kept one), None on other ranks. Collective: every rank calls it with the same keys."""
    have = [i for i, key in enumerate(keys) if key in cache]
    counts = [s[0] for s in all_gather_stats([len(have)], device)]
    size = cache.size
    local = torch.zeros(len(have), 3 * size * size, dtype=torch.uint8)
    for row, i in enumerate(have):
        local[row] = cache[keys[i]].flatten()
    index = torch.tensor(have, dtype=torch.int64)[:, None]
    if max(counts) > 0:  # the same decision on every rank
        local = all_gather_rows(local.to(device), counts, with_grad=False).cpu()
        index = all_gather_rows(index.to(device), counts, with_grad=False).cpu()
    if world_rank() != 0:
        return None
    out = torch.full((len(keys), 3, size, size), MISSING_THUMBNAIL, dtype=torch.uint8)
    filled = torch.zeros(len(keys), dtype=torch.bool)
    for row, i in enumerate(index[:, 0].tolist()):
        if not filled[i]:  # rank order, first wins
            out[i] = local[row].view(3, size, size)
            filled[i] = True
    return out


def projector_sample(embeddings: torch.Tensor, labels: torch.Tensor, keys: Sequence[str], cache, n: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A seeded subset of at most `n` rows of the gathered eval set, for `write_projector`: (embeddings,
    labels, uint8 thumbnails) on rank 0, None elsewhere. The subset depends on the seed and the set's size
    only (the rows are sorted by key), not on the number of ranks. Collective when `n` > 0."""
    total = embeddings.shape[0]
    n = min(n, total)
    if n < 1:
        return None
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    thumbs = gather_thumbnails([keys[i] for i in pick.tolist()], cache, embeddings.device)
    if thumbs is None:
        return None
    return embeddings[pick.to(embeddings.device)].float().cpu(), labels[pick.to(labels.device)].cpu(), thumbs


def _sprite(thumbs: torch.Tensor) -> torch.Tensor:
    """(N, 3, s, s) uint8 -> (3, c*s, c*s) uint8 with c = ceil(sqrt(N)), row-major, black padding."""
    n, _, size, _ = thumbs.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    grid = torch.zeros(cols * cols, 3, size, size, dtype=torch.uint8)
    grid[:n] = thumbs
    return grid.view(cols, cols, 3, size, size).permute(2, 0, 3, 1, 4).reshape(3, cols * size, cols * size)


def _read_projector_config(log_dir: Path):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    path = log_dir / PROJECTOR_CONFIG
    if path.is_file():
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    return config


def _write_projector_config(log_dir: Path, config) -> None:
    from google.protobuf import text_format

    text = text_format.MessageToString(config).encode("utf-8")
    atomic_write(log_dir / PROJECTOR_CONFIG, lambda stream: stream.write(text))


def _entry_step(entry) -> int | None:
    match = re.fullmatch(rf"{PROJECTOR_FOLDER}/(\d+)/tensors\.tsv", entry.tensor_path)
    return int(match.group(1)) if match else None


def write_projector(log_dir: Path, step: int, embeddings: torch.Tensor, labels: torch.Tensor,
                    thumbs: torch.Tensor | None, tag: str = "eval") -> Path:
    """Embeddings, labels and thumbnails of `step` in TensorBoard's projector format; returns their folder.

    `log_dir/projector/<step>/` holds tensors.tsv, metadata.tsv (one label per line) and sprite.png;
    `log_dir/projector_config.pbtxt` lists every step (an entry for the same step is replaced)."""
    from PIL import Image

    folder = Path(log_dir) / PROJECTOR_FOLDER / f"{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in embeddings.float().tolist())
    atomic_write(folder / "tensors.tsv", lambda stream: stream.write(rows.encode("utf-8")))
    names = "".join(f"{label}\n" for label in labels.tolist())
    atomic_write(folder / "metadata.tsv", lambda stream: stream.write(names.encode("utf-8")))
    relative = f"{PROJECTOR_FOLDER}/{step:08d}"
    config = _read_projector_config(Path(log_dir))
    kept = [e for e in config.embeddings if e.tensor_path != f"{relative}/tensors.tsv"]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    entry = config.embeddings.add()
    entry.tensor_name = f"{tag}:{step}"
    entry.tensor_path = f"{relative}/tensors.tsv"
    entry.metadata_path = f"{relative}/metadata.tsv"
    if thumbs is not None:
        picture = Image.fromarray(_sprite(thumbs).permute(1, 2, 0).numpy())
        atomic_write(folder / "sprite.png", lambda stream: picture.save(stream, format="PNG"))
        entry.sprite.image_path = f"{relative}/sprite.png"
        entry.sprite.single_image_dim.extend([thumbs.shape[3], thumbs.shape[2]])
    _write_projector_config(Path(log_dir), config)
    return folder


def purge_projector(log_dir: Path, after_step: int) -> None:
    """Forget projector entries (and their folders) of steps after `after_step`, as TensorBoard's
    `purge_step` forgets a crashed run's later events."""
    if not (Path(log_dir) / PROJECTOR_CONFIG).is_file():
        return
    config = _read_projector_config(Path(log_dir))
    kept = []
    for entry in config.embeddings:
        step = _entry_step(entry)
        if step is not None and step > after_step:
            shutil.rmtree(Path(log_dir) / PROJECTOR_FOLDER / f"{step:08d}", ignore_errors=True)
        else:
            kept.append(entry)
    if len(kept) != len(config.embeddings):
        del config.embeddings[:]
        config.embeddings.extend(kept)
        _write_projector_config(Path(log_dir), config)


def bar_summary(bar, stopped: bool = False) -> str:
    """A tqdm bar's state as one line. The bar counts this rank's batches (micro-batches: with gradient
    accumulation several make one optimizer step); the rate counts those this process ran (a resumed
    epoch's bar starts at the resume point)."""
    from tqdm import tqdm

    state = bar.format_dict
    done, total, elapsed = state["n"], state["total"], state["elapsed"]
    ran = done - (state.get("initial") or 0)
    rate = f"{ran / elapsed:.2f} batches/s" if elapsed > 0 and ran > 0 else "no batches" if ran <= 0 else "-"
    resumed = f", resumed at {state['initial']}" if state.get("initial") else ""
    postfix = f", {state['postfix'].replace('=', ' ')}" if state.get("postfix") else ""
    where = "stopped at " if stopped else ""
    return (f"{state['prefix'] or 'epoch'}: {where}{done}/{total} batches in {tqdm.format_interval(elapsed)} "
            f"({rate}{resumed}){postfix}")


class Monitor:
    """TensorBoard writer, tqdm bar and results file that exist on rank 0 and do nothing elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool = True,
                 results_file: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self.results_file = results_file if enabled else None
        self.purge_step: int | None = None
        self.bar = None
        self._writer = None
        self._hparams = False

    @property
    def writer(self):
        """The SummaryWriter, opened at first use (so `start` can set its purge step first); None when off."""
        if self.tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def start(self, config: dict[str, Any], metric_tags: Sequence[str], step: int = 0) -> None:
        """Begin (or resume at global `step`): later events of an earlier attempt are purged, and the
        resolved `config` is logged as text and hparams with `metric_tags` as the hparams metrics."""
        if not self.tensorboard:
            return
        if self._writer is not None:
            raise RuntimeError("Monitor.start must come before anything is written")
        self.purge_step = step + 1
        purge_projector(self.log_dir, step)
        import yaml
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
        self.writer.add_text("config", f"```yaml\n{text}```", step)
        experiment, session_start, _ = hparams(flatten_hparams(config), {tag: 0.0 for tag in metric_tags})
        self.writer.file_writer.add_summary(experiment, step)
        self.writer.file_writer.add_summary(session_start, step)
        self._hparams = True

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def evaluation(self, epoch: int, step: int, metrics: dict[str, Any], best_r1: float,
                   exported: str | None, split: str = "eval") -> None:
        """Log one evaluation (from `run_evaluation`): scalars under `split/` (`eval/` is the test split,
        `val/` the validation split), retrieval picture, projector, a summary line, and a `results.jsonl`
        line. Rank 0's call does it all; other ranks' calls do nothing. `best_r1`: the selection score."""
        picture = metrics.pop("retrieval_picture", None)
        projector = metrics.pop("projector", None)
        if not self.enabled:
            return
        recall = metrics["recall"]
        self.scalars({f"{split}/recall@{k}": v for k, v in recall.items()}, step)
        self.scalars({f"{split}/map@r": metrics["map_at_r"]}, step)
        if picture is not None:
            self.image(f"{split}/retrieval", picture, step)
        if projector is not None and self.writer is not None:
            self.writer.flush()
            write_projector(self.log_dir, step, *projector)
        name = "" if split == "eval" else f" {split}"
        self.say(f"epoch {epoch + 1}{name}: " + "  ".join(f"R@{k} {100 * v:.2f}" for k, v in recall.items())
                 + f"  MAP@R {100 * metrics['map_at_r']:.2f}")
        if self.results_file is not None:
            append_line(self.results_file, {
                "epoch": epoch + 1, "step": step, "time": time.time(), "split": "test" if split == "eval" else split,
                "recall": {str(k): v for k, v in recall.items()}, "map_at_r": metrics["map_at_r"],
                "best_r1": best_r1, "exported": exported,
            })

    def train_epoch(self, epoch: int, step: int, record: dict[str, Any]) -> None:
        """One `split: train` line in results.jsonl at an epoch's end (skipped data, skipped steps), and
        its numbers as `data/...` / `train/...` scalars."""
        if not self.enabled:
            return
        self.scalars({f"data/{kind}": float(n) for kind, n in record.get("skipped", {}).items()}, step)
        if "nonfinite_steps" in record:
            self.scalars({"train/nonfinite_steps": float(record["nonfinite_steps"])}, step)
        if self.results_file is not None:
            append_line(self.results_file, {"epoch": epoch + 1, "step": step, "time": time.time(), "split": "train",
                                            **record})

    def start_epoch(self, epoch: int, epochs: int, batches: int, initial: int = 0) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=batches, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr,
                            dynamic_ncols=True, leave=False)

    def advance(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update()

    def say(self, text: str) -> None:
        """One INFO line of the `rct_dist.train` logger (rank 0's; a progress bar is redrawn below it)."""
        if self.enabled:
            log.info(text)

    def end_epoch(self, stopped: bool = False) -> None:
        """Close the bar, its final state logged as one line: `epoch E/N: n/total batches in mm:ss (r batches/s,
        this process), loss x` (`stopped at` when the run ends inside the epoch)."""
        if self.bar is not None:
            line = bar_summary(self.bar, stopped)
            self.bar.close()
            self.bar = None
            log.info(line)

    def close(self, finished: bool = True) -> None:
        """Flush and close; `finished` marks the hparams session as ended successfully."""
        self.end_epoch(stopped=not finished)
        if self._writer is not None:
            if finished and self._hparams:
                from torch.utils.tensorboard.summary import hparams

                _, _, session_end = hparams({}, {})
                self._writer.file_writer.add_summary(session_end)
            self._writer.flush()
            self._writer.close()
            self._writer = None
