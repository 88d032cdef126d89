"""What a broken transfer cannot pass.

`teacher_agreement` measures how much of its teacher's geometry a transfer run's student holds, next to
the same student untrained: the end-to-end and demo tests (test_train.py, test_demo.py) assert a floor on
it, measured on real runs and on deliberately broken ones (the transfer loss multiplied by zero; the
student and teacher swapped in the trainer's loss call; a loader repeating its first batch).

Two broken variants are guarded here directly, in one short transfer run on the digits shards with spies
on the trainer's loss call and on the batches it trains on: the argument order of the loss call (the RC
loss is not symmetric: only the teacher is L2-normalised, and only the student carries gradient) and a
loader that repeats one batch (every batch of an epoch must be new, and the epoch must cover the split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rct_dist.config import load_config
from rct_dist.data.batch import valid_rows
from rct_dist.data.loader import ShardIndex, make_loader
from rct_dist.data.transforms import build_transform
from rct_dist.eval import extract_embeddings
from rct_dist.losses import RelaxedContrastiveLoss
from rct_dist.models import load_exported
from rct_dist.models.preprocess import Preprocess, preprocess_for, renormalization
from rct_dist.train import loop
from rct_dist.train.build import build_task, build_teacher, teacher_dim

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# The agreement of a student with its teacher


def _embed(net: torch.nn.Module, cfg, split: str) -> torch.Tensor:
    """Embeddings of `split` (sorted by key) as the trainer's evaluation computes them."""
    preprocess = preprocess_for(cfg)
    loader = make_loader(Path(cfg.data.root) / split, batch_size=cfg.eval.batch_size, train=False,
                         image_size=cfg.data.image_size, workers=0,
                         transform=build_transform(cfg.data.image_size, False, **preprocess.transform_kwargs()))
    embeddings, _, _ = extract_embeddings(net, valid_rows(loader), device="cpu")
    return embeddings.double()


def _neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """(n, n) 0/1 matrix: row i marks i's k nearest neighbours (itself excluded)."""
    distances = torch.cdist(embeddings, embeddings).fill_diagonal_(float("inf"))
    marks = torch.zeros_like(distances)
    return marks.scatter_(1, distances.topk(k, largest=False).indices, 1.0)


def _pair_distances(embeddings: torch.Tensor) -> torch.Tensor:
    n = embeddings.shape[0]
    upper = torch.triu_indices(n, n, 1)
    return torch.cdist(embeddings, embeddings)[upper[0], upper[1]]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def teacher_agreement(run_dir: Path, split: str | None = None, k: int = 10) -> dict[str, dict[str, float]]:
    """How much of the teacher's geometry the student of the transfer run `run_dir` holds on `split`
    (default the run's eval split: held-out classes), for its exported student and for the same student
    untrained (the run's config and seed, no step taken):

    `knn`: the mean fraction of an image's k nearest neighbours under the teacher that are among its k
    nearest under the student; `rho`: the Spearman correlation of all pairwise distances, teacher's and
    student's. The teacher is the run's, fed as the trainer feeds it, and L2-normalised (as the RC loss
    sees it); the student's embeddings are taken as they are.
    """
    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    split = split or cfg.data.eval_split
    teacher = build_teacher(cfg, torch.device("cpu"))
    teacher.normalize_inputs(*(renormalization(preprocess_for(cfg), Preprocess.of_backbone(teacher.config["backbone"]))
                               or (None, None)))
    t = torch.nn.functional.normalize(_embed(teacher, cfg, split), dim=1)
    loop.seed_everything(cfg.run.seed)  # as train() builds the student it then trains
    index = ShardIndex.load(Path(cfg.data.root) / cfg.data.train_split)
    untrained = build_task(cfg, index.classes, teacher_dim(cfg, index)).net
    near_t, far_t = _neighbours(t, k), _pair_distances(t)
    result = {}
    for name, net in (("student", load_exported(Path(run_dir) / "export")), ("untrained", untrained)):
        s = _embed(net, cfg, split)
        result[name] = {"knn": ((_neighbours(s, k) * near_t).sum(1) / k).mean().item(),
                        "rho": _spearman(far_t, _pair_distances(s))}
    return result


def gain(agreement: dict[str, dict[str, float]], what: str) -> float:
    """The trained student's agreement above the untrained student's."""
    return agreement["student"][what] - agreement["untrained"][what]


def test_agreement_of_a_student_with_itself_and_with_noise():
    """The two measures on known cases: a model that is its teacher up to scale agrees fully, noise hardly."""
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(60, 8, dtype=torch.float64), dim=1)
    near_t = _neighbours(t, 5)
    assert ((_neighbours(3 * t, 5) * near_t).sum(1) / 5).mean().item() == 1.0
    assert _spearman(_pair_distances(t), _pair_distances(3 * t)) == pytest.approx(1.0)
    noise = torch.randn(60, 8, dtype=torch.float64)
    assert ((_neighbours(noise, 5) * near_t).sum(1) / 5).mean().item() < 0.3
    assert abs(_spearman(_pair_distances(t), _pair_distances(noise))) < 0.2


# ---------------------------------------------------------------------------------------------------------
# The trainer's loss call and the batches it trains on, spied in one short transfer run

CONFIG = """
run: {{name: spied, out_dir: {out}}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
loss: {{name: rc}}
optim: {{lr: 1.0e-3, epochs: 1}}
deepspeed: {{config: {ds}}}
eval: {{batch_size: 256}}
log: {{every_steps: 100, tensorboard: false, retrieval_images: 0, projector_samples: 0}}
checkpoint: {{every_steps: 0, keep: 1}}
"""
STUDENT_DIM, TEACHER_DIM = 16, 32  # unequal, so that the two arguments cannot pass for each other


class _SpiedLoader:
    """A train loader that records the keys of every batch it hands the trainer."""

    def __init__(self, inner, seen: list[list[str]]) -> None:
        self._inner, self._seen = inner, seen

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __iter__(self):
        for batch in self._inner:
            self._seen.append(list(batch.keys))
            yield batch


@pytest.fixture(scope="module")
def spied_run(digits_shards, tmp_path_factory) -> dict[str, Any]:
    """One epoch of RC transfer on the digits shards (44 or 45 steps of 20 images x 2 views), recording
    the arguments of every call of the RC loss and the keys of every batch the trainer takes. A run that
    fails keeps what it recorded and its error."""
    out = tmp_path_factory.mktemp("spied")
    path = out / "rc.yaml"
    path.write_text(CONFIG.format(out=out / "runs", data=digits_shards,
                                  ds=ROOT / "configs" / "deepspeed" / "zero0_fp32.json"))
    calls: list[dict[str, Any]] = []
    seen: list[list[str]] = []
    loss_forward, real_make_loader = RelaxedContrastiveLoss.forward, loop.make_loader

    def spy_forward(self, student, teacher, return_parts=False):
        calls.append({"student_dim": student.shape[1], "student_grad": student.requires_grad,
                      "teacher_dim": teacher.shape[1], "teacher_grad": teacher.requires_grad})
        return loss_forward(self, student, teacher, return_parts=return_parts)

    def spy_make_loader(*args, **kwargs):
        loader = real_make_loader(*args, **kwargs)
        return _SpiedLoader(loader, seen) if kwargs.get("train") else loader

    error = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RelaxedContrastiveLoss, "forward", spy_forward)
        patch.setattr(loop, "make_loader", spy_make_loader)
        try:
            loop.train(load_config(str(path), ["job=transfer"]))
        except Exception as caught:  # (reported by the tests, after what was recorded)
            error = caught
    return {"calls": calls, "seen": seen, "error": error,
            "train_samples": ShardIndex.load(Path(digits_shards) / "train").samples}


def test_trainer_passes_the_student_as_student_and_the_teacher_as_teacher(spied_run):
    """The RC loss is not symmetric (only the teacher is normalised; only the student is trained): the
    trainer's loss call must pass the student's embeddings first and the teacher's second."""
    calls = spied_run["calls"]
    assert calls, f"the RC loss was never called (run error: {spied_run['error']!r})"
    first = calls[0]
    assert (first["student_dim"], first["teacher_dim"]) == (STUDENT_DIM, TEACHER_DIM), (
        f"the trainer passed {first['student_dim']}-d embeddings as `student` and {first['teacher_dim']}-d "
        f"as `teacher`: the student's are {STUDENT_DIM}-d, the teacher's {TEACHER_DIM}-d (student and teacher swapped)")
    assert first["student_grad"] and not first["teacher_grad"], (
        "`student` must carry the student's gradient and `teacher` none (student and teacher swapped)")
    assert spied_run["error"] is None, f"the spied run failed: {spied_run['error']!r}"
    assert len(calls) == len(spied_run["seen"])  # one call per step


def test_trainer_trains_on_new_batches_covering_the_split(spied_run):
    """Successive batches of an epoch are different samples, and the epoch covers the training split: a
    loader that repeats a batch (or a trainer that reuses one) fails here."""
    if spied_run["error"] is not None:
        raise spied_run["error"]
    seen = spied_run["seen"]
    assert len(seen) >= 40, len(seen)  # P x K epochs of digits' 901 training images: 44 or 45 batches of 20
    repeated = [i for i in range(1, len(seen)) if set(seen[i]) & set(seen[i - 1])]
    assert not repeated, f"batches {repeated[:5]} share samples with the batch before them (a repeated batch)"
    keys, total = {key for batch in seen for key in batch}, spied_run["train_samples"]
    # (measured 2026-12-07: 44 batches of 20, 880 distinct samples of 901)
    assert len(keys) >= 0.95 * total, f"one epoch trained on {len(keys)} distinct samples of the split's {total}"
