"""eval, embed and export on the digits shards: an export measures as its run measured it, stored teacher
embeddings travel in new shards and train a student, and a checkpoint exports to the run's student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from rct_dist.cli import main
from rct_dist.config import load_config
from rct_dist.data.loader import ShardIndex, make_loader
from rct_dist.jobs import run_embed, run_eval
from rct_dist.models import load_exported
from rct_dist.train.feed import views_flat
from rct_dist.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
run: {{name: {name}, out_dir: {out}}}
data: {{root: {data}, eval_split: {eval_split}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0,
        samples_per_epoch: 200}}
model: {{backbone: rct_cnn4, embedding_size: 32}}
loss: {{name: proxy_anchor}}
optim: {{lr: 1.0e-3, epochs: 1}}
deepspeed: {{config: {ds}}}
eval: {{batch_size: 128}}
log: {{every_steps: 10, tensorboard: false}}
"""


def run_config(path: Path, name: str, out: Path, data: Path, eval_split: str = "test",
               ds: str = "zero0_fp32") -> Path:
    path.write_text(CONFIG.format(name=name, out=out, data=data, eval_split=eval_split,
                                  ds=ROOT / "configs" / "deepspeed" / f"{ds}.json"))
    return path


@pytest.fixture(scope="module")
def teacher(digits_shards, tmp_path_factory):
    """A 1-epoch teacher run: (its config, its final metrics)."""
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config(str(run_config(tmp / "teacher.yaml", "teacher", tmp / "runs", digits_shards)), ["job=train-teacher"])
    return cfg, train(cfg)


def test_eval_of_export_matches_trainer(teacher):
    cfg, metrics = teacher
    result = run_eval(cfg)  # the run's export on the run's eval split
    assert result["samples"] == ShardIndex.load(Path(cfg.data.root) / "test").samples
    assert result["recall"][1] == pytest.approx(metrics["recall"][1], abs=1e-9)
    assert result["map_at_r"] == pytest.approx(metrics["map_at_r"], abs=1e-6)


def test_embed_into_shards_then_transfer_and_export(teacher, digits_shards, tmp_path):
    cfg, _ = teacher
    export = Path(cfg.run.out_dir) / cfg.run.name / "export"
    stored = tmp_path / "stored"
    summary = run_embed(cfg, export, digits_shards / "train", tmp_path / "emb", into_shards=stored / "train")

    index = ShardIndex.load(digits_shards / "train")
    embeddings = np.load(tmp_path / "emb" / "embeddings.npy", allow_pickle=False)
    labels = np.load(tmp_path / "emb" / "labels.npy", allow_pickle=False)
    keys = (tmp_path / "emb" / "keys.txt").read_text().splitlines()
    assert embeddings.shape == (index.samples, 32) and embeddings.dtype == np.float32
    assert labels.shape == (index.samples,) and labels.dtype == np.int64
    urls = [str(index.directory / name) for name in index.shards]
    assert keys == sorted(s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert summary["shards"]["samples"] == index.samples

    copy = ShardIndex.load(stored / "train")
    assert (copy.teacher_dim, copy.shard_samples, copy.classes) == (32, index.shard_samples, index.classes)
    row = {k: i for i, k in enumerate(keys)}
    loader = make_loader(copy, batch_size=20, train=True, image_size=16, views=2, workers=0, teacher_embeddings=True)
    first = next(iter(loader))
    images, batch_labels, batch_keys, stored_teacher = first.images, first.labels, first.keys, first.teacher
    assert images.shape == (20, 2, 3, 16, 16) and stored_teacher.dtype == torch.float32
    torch.testing.assert_close(stored_teacher, torch.from_numpy(embeddings[[row[k] for k in batch_keys]]),
                               rtol=0, atol=0)
    assert batch_labels.tolist() == labels[[row[k] for k in batch_keys]].tolist()
    with pytest.raises(ValueError, match="no teacher embeddings"):
        make_loader(index, batch_size=20, train=True, image_size=16, workers=0, teacher_embeddings=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_embed(cfg, export, digits_shards / "train", tmp_path / "emb", into_shards=stored / "train")

    # A student from the stored embeddings alone, under ZeRO-2 so export goes through zero_to_fp32.
    student_cfg = run_config(tmp_path / "rc.yaml", "rc", tmp_path / "runs", stored, eval_split=str(digits_shards / "test"),
                             ds="zero2_fp32")
    metrics = train(load_config(str(student_cfg), ["job=transfer", "loss.name=rc", "teacher.source=shards",
                                                   "model.backbone=rct_cnn3_small", "model.embedding_size=16"]))
    assert 0 < metrics["recall"][1] <= 1

    # One epoch: the final checkpoint holds the student the trainer exported as its best.
    run_dir = tmp_path / "runs" / "rc"
    main(["export", "--run", str(run_dir), "--out", str(tmp_path / "from-checkpoint")])
    torch.testing.assert_close(load_exported(tmp_path / "from-checkpoint").state_dict(),
                               load_exported(run_dir / "export").state_dict(), rtol=0, atol=0)
    assert json.loads((tmp_path / "from-checkpoint" / "config.json").read_text())["embedding_size"] == 16


def test_views_share_their_image_stored_teacher_embedding():
    images, labels, teacher = torch.randn(3, 2, 3, 4, 4), torch.arange(3), torch.randn(3, 5)
    flat, flat_labels, flat_teacher = views_flat(images, labels, teacher)
    assert flat.shape == (6, 3, 4, 4) and flat_labels.tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(flat_teacher, teacher[[0, 0, 1, 1, 2, 2]], rtol=0, atol=0)
