"""What a run trains and against what, built from its config: the task (student + criterion) and the
frozen teacher. Shared by the training loop and the jobs (export rebuilds the same task)."""

from __future__ import annotations

import torch

from rct_dist.config import Config
from rct_dist.data.loader import ShardIndex
from rct_dist.losses import (
    DarkRankLoss,
    EmbeddingRegressionLoss,
    PKTLoss,
    ProxyAnchorLoss,
    RelaxedContrastiveLoss,
    RKDLoss,
)
from rct_dist.models import FrozenTeacher, build_model
from rct_dist.models.export import read_config
from rct_dist.train.task import TransferTask


def teacher_dim(cfg: Config, train_index: ShardIndex | None = None) -> int:
    """Width of the teacher's embeddings, known before any teacher runs (the regression loss needs it)."""
    t = cfg.teacher
    if t.source == "export":
        return int(read_config(t.export)["embedding_size"])
    if t.source == "shards" and train_index is not None and train_index.teacher_dim is not None:
        return train_index.teacher_dim
    return t.embedding_size


def build_task(cfg: Config, num_classes: int, teacher_size: int | None = None) -> TransferTask:
    """Student + criterion of a run, each loss built with every option of its `loss.<name>` section;
    `teacher_size` (default `teacher_dim(cfg)`) sizes the regression map."""
    net = build_model(cfg.model.backbone, cfg.model.embedding_size, pretrained=cfg.model.pretrained,
                      pretrained_file=cfg.model.pretrained_file, normalize=cfg.model.normalize,
                      feature_blocks=cfg.model.feature_blocks, freeze_bn=cfg.model.freeze_bn)
    loss = cfg.loss
    supervised = None
    if cfg.job == "train-teacher" or loss.supervised_weight > 0:
        pa = loss.proxy_anchor  # (its lr_multiplier is the optimizer's: train/loop.py passes it to build_engine)
        supervised = ProxyAnchorLoss(num_classes, cfg.model.embedding_size, margin=pa.margin, alpha=pa.alpha)
    if cfg.job == "train-teacher":
        return TransferTask(net, supervised=supervised)
    rc, rkd, darkrank = loss.rc, loss.rkd, loss.darkrank
    transfer = {
        "rc": lambda: RelaxedContrastiveLoss(sigma=rc.sigma, delta=rc.delta, normalize_student=rc.normalize_student,
                                             reduction=rc.reduction, chunk_size=rc.chunk_size, kernel=rc.kernel,
                                             precision=rc.precision),
        "rkd": lambda: RKDLoss(distance_weight=rkd.distance_weight, angle_weight=rkd.angle_weight,
                               chunk_elements=rkd.angle_chunk_elements),
        "pkt": lambda: PKTLoss(eps=loss.pkt.eps),
        "darkrank": lambda: DarkRankLoss(alpha=darkrank.alpha, beta=darkrank.beta, permute_len=darkrank.permute_len),
        "regression": lambda: EmbeddingRegressionLoss(cfg.model.embedding_size, teacher_size or teacher_dim(cfg),
                                                      normalize_teacher=loss.regression.normalize_teacher),
    }[loss.name]()
    return TransferTask(net, transfer=transfer, supervised=supervised, supervised_weight=loss.supervised_weight)


def build_teacher(cfg: Config, device: torch.device) -> FrozenTeacher | None:
    """The frozen teacher model; None for `teacher.source: shards`, whose embeddings come with the batches.

    A stored (black-box) teacher embedded each image once, not each augmented view: every view of an
    image gets that one embedding, as every view gets the image's label.
    """
    t = cfg.teacher
    if t.source == "shards":
        return None
    if t.source == "export":
        teacher = FrozenTeacher.from_export(t.export, dtype=t.dtype)
    elif t.source == "model":
        teacher = FrozenTeacher.from_timm(t.backbone, t.embedding_size, pretrained=t.pretrained,
                                          pretrained_file=t.pretrained_file, dtype=t.dtype)
    else:
        raise ValueError(f"teacher.source {t.source!r} is not supported (use 'model', 'export' or 'shards')")
    return teacher.to(device)
