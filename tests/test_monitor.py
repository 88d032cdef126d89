"""Monitoring read back from disk: TensorBoard purge on resume, the config as text and hparams, the
projector files, results.jsonl; and each backbone's own preprocessing with the teacher's exact
re-normalisation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from multiprocess import run_ranks
from rct_dist.config import config_to_dict, load_config
from rct_dist.data.transforms import build_transform
from rct_dist.models import FrozenTeacher
from rct_dist.models.preprocess import Preprocess, preprocess_for, renormalization
from rct_dist.train.monitor import (
    MISSING_THUMBNAIL,
    PROJECTOR_CONFIG,
    Monitor,
    flatten_hparams,
    gather_thumbnails,
    projector_sample,
    write_projector,
)
from rct_dist.eval.retrieval_picture import ThumbnailCache

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAGS = ["eval/recall@1", "eval/map@r"]


def events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_steps(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# --- TensorBoard: purge on resume -------------------------------------------------------------------

def test_resume_purges_events_after_the_checkpoint(tmp_path):
    config = config_to_dict(load_config(None))
    first = Monitor(tmp_path, enabled=True)
    first.start(config, TAGS, step=0)
    for step in range(1, 11):
        first.scalars({"loss/total": float(step)}, step)
    first.close(finished=False)  # crashed after step 10; its last checkpoint was at step 6

    resumed = Monitor(tmp_path, enabled=True)
    resumed.start(config, TAGS, step=6)
    assert resumed.writer is not None and resumed.purge_step == 7
    for step in range(7, 11):
        resumed.scalars({"loss/total": 100.0 + step}, step)
    resumed.close()

    got = scalar_steps(events(tmp_path), "loss/total")
    assert [s for s, _ in got] == list(range(1, 11))  # each step once
    assert dict(got) == {**{s: float(s) for s in range(1, 7)}, **{s: 100.0 + s for s in range(7, 11)}}


def test_without_purge_the_reader_sees_doubled_steps(tmp_path):
    """The check above can fail: a plain writer reopened on the same folder doubles steps 7..10."""
    from torch.utils.tensorboard import SummaryWriter

    for start in (1, 7):
        writer = SummaryWriter(str(tmp_path))
        for step in range(start, 11):
            writer.add_scalar("x", step, step)
        writer.close()
    steps = [s for s, _ in scalar_steps(events(tmp_path), "x")]
    assert sorted(steps) != sorted(set(steps))


# --- TensorBoard: resolved config as text and hparams ---------------------------------------------

def test_config_text_and_hparams_read_back(tmp_path):
    cfg = load_config(None, ["data.pk=[5,4]", "data.batch_size=20", "optim.lr=3.0e-4", "run.name=abc"])
    config = config_to_dict(cfg)
    monitor = Monitor(tmp_path, enabled=True)
    monitor.start(config, TAGS, step=0)
    monitor.scalars({"eval/recall@1": 0.25, "eval/map@r": 0.125}, 5)
    monitor.scalars({"eval/recall@1": 0.5, "eval/map@r": 0.375}, 10)
    monitor.close()

    acc = events(tmp_path)
    (text,) = acc.Tensors("config/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    block = re.fullmatch(r"```yaml\n(.*)```", markdown, re.S)
    assert block is not None and yaml.safe_load(block.group(1)) == config

    contents = acc.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(contents["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == TAGS
    start = HParamsPluginData.FromString(contents["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["run.name"].string_value == "abc"
    assert start["optim.lr"].number_value == pytest.approx(3e-4)
    assert start["data.pk"].string_value == "[5, 4]"  # lists as strings
    assert start["eval.ks"].string_value == "[1, 2, 4, 8]"
    assert start["data.samples_per_epoch"].string_value == "null"
    assert start["job"].string_value == "transfer"
    assert set(start) == set(flatten_hparams(config))
    end = HParamsPluginData.FromString(contents["_hparams_/session_end_info"]).session_end_info
    assert end.status == Status.Value("STATUS_SUCCESS")
    # The hparams metrics are these scalars; their last values are the final metrics.
    assert scalar_steps(acc, "eval/recall@1")[-1] == (10, 0.5)
    assert scalar_steps(acc, "eval/map@r")[-1] == (10, 0.375)


def test_flatten_hparams():
    flat = flatten_hparams({"job": "x", "a": {"b": 1, "c": [0.5, 1.0], "d": None, "e": True}})
    assert flat == {"job": "x", "a.b": 1, "a.c": "[0.5, 1.0]", "a.d": "null", "a.e": True}


# --- Projector ---------------------------------------------------------------------------------------

THUMB = 8
COUNT = 30


def sample_data():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(COUNT, 3, 16, 16, generator=g)
    embeddings = torch.randn(COUNT, 5, generator=g)
    labels = torch.arange(COUNT) % 4
    keys = [f"k{i:03d}" for i in range(COUNT)]
    return images, embeddings, labels, keys


def projector_rank(rank: int, world: int, n: int):
    images, embeddings, labels, keys = sample_data()
    cache = ThumbnailCache(size=THUMB)
    mine = [i for i in range(COUNT) if i % world == rank and i != 7]  # no rank keeps sample 7
    cache.add(images[mine], [keys[i] for i in mine])
    return projector_sample(embeddings, labels, keys, cache, n=n, seed=1)


def test_projector_sample_is_the_same_on_one_and_two_ranks():
    single = projector_rank(0, 1, COUNT)
    two = run_ranks(projector_rank, 2, COUNT)
    assert two[1] is None
    for a, b in zip(single, two[0]):
        assert torch.equal(a, b)
    images, embeddings, labels, keys = sample_data()
    thumbs = ThumbnailCache(size=THUMB).thumbnails(images)
    assert torch.equal(single[0], embeddings) and torch.equal(single[1], labels)  # n = all: every row, in order
    assert torch.equal(single[2][:7], thumbs[:7]) and torch.equal(single[2][8:], thumbs[8:])
    assert (single[2][7] == MISSING_THUMBNAIL).all()


def test_projector_sample_caps_and_is_seeded():
    a = projector_rank(0, 1, 10)
    b = projector_rank(0, 1, 10)
    assert a[0].shape == (10, 5) and a[2].shape == (10, 3, THUMB, THUMB)
    assert torch.equal(a[0], b[0])
    _, embeddings, _, _ = sample_data()
    rows = [int((embeddings == row).all(1).nonzero()) for row in a[0]]
    assert rows == sorted(rows) and len(set(rows)) == 10
    assert projector_rank(0, 1, 0) is None


def read_projector_config(log_dir):
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    return text_format.Parse((log_dir / PROJECTOR_CONFIG).read_text(), ProjectorConfig())


def test_projector_files_read_back(tmp_path):
    embeddings, labels, thumbs = projector_rank(0, 1, 10)
    monitor = Monitor(tmp_path / "tb", enabled=True)
    monitor.start({"job": "x"}, TAGS)
    monitor.evaluation(0, 20, {"recall": {1: 0.5}, "map_at_r": 0.25, "projector": (embeddings, labels, thumbs)},
                       0.5, "export")
    monitor.evaluation(1, 40, {"recall": {1: 0.6}, "map_at_r": 0.3, "projector": (embeddings, labels, thumbs)},
                       0.6, "export")
    monitor.close()

    config = read_projector_config(tmp_path / "tb")
    assert [e.tensor_name for e in config.embeddings] == ["eval:20", "eval:40"]
    entry = config.embeddings[0]
    assert list(entry.sprite.single_image_dim) == [THUMB, THUMB]
    tensors = np.loadtxt(tmp_path / "tb" / entry.tensor_path, delimiter="\t")
    np.testing.assert_allclose(tensors, embeddings.numpy(), rtol=1e-5, atol=1e-6)
    metadata = (tmp_path / "tb" / entry.metadata_path).read_text().splitlines()
    assert metadata == [str(v) for v in labels.tolist()]
    sprite = np.asarray(Image.open(tmp_path / "tb" / entry.sprite.image_path))
    assert sprite.shape == (4 * THUMB, 4 * THUMB, 3)  # 10 tiles -> a 4 x 4 grid
    for i in range(10):
        r, c = divmod(i, 4)
        tile = sprite[r * THUMB:(r + 1) * THUMB, c * THUMB:(c + 1) * THUMB]
        assert np.array_equal(tile, thumbs[i].permute(1, 2, 0).numpy())

    # A resume at step 30 forgets step 40's projector, as TensorBoard forgets its events.
    resumed = Monitor(tmp_path / "tb", enabled=True)
    resumed.start({"job": "x"}, TAGS, step=30)
    resumed.close()
    assert [e.tensor_name for e in read_projector_config(tmp_path / "tb").embeddings] == ["eval:20"]
    assert not (tmp_path / "tb" / "projector" / "00000040").exists()


def test_write_projector_replaces_the_same_step(tmp_path):
    embeddings, labels, thumbs = projector_rank(0, 1, 4)
    write_projector(tmp_path, 5, embeddings, labels, thumbs)
    write_projector(tmp_path, 5, embeddings * 2, labels, None)
    (entry,) = read_projector_config(tmp_path).embeddings
    np.testing.assert_allclose(np.loadtxt(tmp_path / entry.tensor_path, delimiter="\t"), 2 * embeddings.numpy(),
                               rtol=1e-5)
    assert not entry.sprite.image_path


def gather_rank(rank: int, world: int):
    images, _, _, keys = sample_data()
    cache = ThumbnailCache(size=THUMB)
    cache.add(images[rank::world], keys[rank::world])
    return gather_thumbnails(keys[::-1], cache, torch.device("cpu"))


def test_gather_thumbnails_across_ranks():
    got = run_ranks(gather_rank, 3)
    images, _, _, _ = sample_data()
    assert got[1] is None and got[2] is None
    assert torch.equal(got[0], ThumbnailCache(size=THUMB).thumbnails(images).flip(0))


# --- results.jsonl -----------------------------------------------------------------------------------

def test_results_jsonl_appends_across_resume_on_rank_0_only(tmp_path):
    results = tmp_path / "results.jsonl"
    metrics = lambda r1: {"recall": {1: r1, 2: r1 + 0.1}, "map_at_r": r1 / 2}  # noqa: E731
    first = Monitor(tmp_path / "tb", enabled=True, tensorboard=False, results_file=results)
    first.evaluation(0, 10, metrics(0.5), 0.5, "export")
    first.evaluation(1, 20, metrics(0.4), 0.5, None)
    first.close()
    before = results.read_bytes()
    other_rank = Monitor(tmp_path / "tb", enabled=False, results_file=results)
    other_rank.evaluation(1, 20, metrics(0.9), 0.9, "export")
    resumed = Monitor(tmp_path / "tb", enabled=True, tensorboard=False, results_file=results)
    resumed.evaluation(2, 30, metrics(0.7), 0.7, "export")

    assert results.read_bytes().startswith(before)  # appended, never rewritten
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["exported"]) for r in lines] == [(1, 10, "export"), (2, 20, None),
                                                                      (3, 30, "export")]
    assert lines[0]["recall"] == {"1": 0.5, "2": 0.6} and lines[0]["map_at_r"] == 0.25
    assert [r["best_r1"] for r in lines] == [0.5, 0.5, 0.7]
    assert all(isinstance(r["time"], float) for r in lines) and lines[0]["time"] <= lines[2]["time"]
    assert not (tmp_path / "tb").exists()  # tensorboard off: no writer was opened


# --- Preprocessing from the backbone ---------------------------------------------------------------

def test_backbone_preprocessing_is_resolved_from_timm():
    clip = Preprocess.of_backbone("vit_base_patch16_clip_224.openai")
    assert clip.mean == pytest.approx(CLIP_MEAN) and clip.std == pytest.approx(CLIP_STD)
    assert clip.interpolation == "bicubic" and clip.crop_pct == pytest.approx(0.9)
    resnet = Preprocess.of_backbone("resnet50")
    assert resnet.mean == pytest.approx(IMAGENET_MEAN) and resnet.std == pytest.approx(IMAGENET_STD)
    assert resnet.interpolation == "bicubic" and resnet.crop_pct == pytest.approx(0.95)
    small = Preprocess.of_backbone("rct_cnn3_small")
    assert small.mean == pytest.approx(IMAGENET_MEAN) and small.std == pytest.approx(IMAGENET_STD)
    assert (small.interpolation, small.crop_pct) == ("bilinear", 1.0)


def test_the_transforms_defaults_are_the_default_preprocessing():
    """data's transforms (which know no backbone) default to what models declares for a backbone without
    a config, so a transform built without a Preprocess and an export without one agree."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(build_transform).parameters.items()}
    declared = Preprocess()
    assert tuple(defaults["mean"]) == declared.mean and tuple(defaults["std"]) == declared.std
    assert (defaults["interpolation"], defaults["crop_pct"]) == (declared.interpolation, declared.crop_pct)
    assert Preprocess.of_backbone("no_such_backbone_anywhere") == declared
    from rct_dist import config
    from rct_dist.models import preprocess

    assert config.INTERPOLATIONS == preprocess.INTERPOLATIONS  # the config's copy (loads without torch)


def test_config_overrides_win_and_are_validated():
    base = ["model.backbone=vit_base_patch16_clip_224.openai"]
    assert preprocess_for(load_config(None, base)).mean == pytest.approx(CLIP_MEAN)
    cfg = load_config(None, base + ["data.mean=[0.5,0.5,0.5]", "data.interpolation=bilinear", "data.crop_pct=1"])
    got = preprocess_for(cfg)
    assert got.mean == (0.5, 0.5, 0.5) and got.std == pytest.approx(CLIP_STD)  # std not overridden
    assert (got.interpolation, got.crop_pct) == ("bilinear", 1.0)
    assert preprocess_for(cfg, "resnet50").mean == (0.5, 0.5, 0.5)  # an export's backbone, same overrides
    assert preprocess_for(load_config(None, base), "resnet50").std == pytest.approx(IMAGENET_STD)
    for bad, match in [("data.mean=[0.5,0.5]", "data.mean"), ("data.std=[0.2,0,0.2]", "data.std"),
                       ("data.interpolation=bicubik", "did you mean 'bicubic'"), ("data.crop_pct=0", "crop_pct"),
                       ("data.crop_pct=1.5", "crop_pct"), ("log.projector_samples=-1", "projector_samples")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [bad])


def test_transform_uses_the_resolved_crop_and_normalisation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    clip = Preprocess.of_backbone("vit_base_patch16_clip_224.openai")
    x = build_transform(20, False, **clip.override(interpolation="bilinear", crop_pct=1.0).transform_kwargs())(image)
    raw = build_transform(20, False, crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))(image)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(x, (raw - mean) / std)


def test_teacher_renormalisation_is_exact():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    student = Preprocess.of_backbone("resnet50")
    teacher_own = Preprocess.of_backbone("vit_base_patch16_clip_224.openai").override(
        interpolation=student.interpolation, crop_pct=student.crop_pct)
    x_student = build_transform(32, False, **student.transform_kwargs())(image)[None]
    x_teacher = build_transform(32, False, **teacher_own.transform_kwargs())(image)[None]
    scale, shift = renormalization(student, teacher_own)
    torch.testing.assert_close(x_student * scale + shift, x_teacher, rtol=0, atol=2e-6)
    assert renormalization(student, Preprocess.of_backbone("resnet18")) is None

    torch.manual_seed(0)
    teacher = FrozenTeacher.from_timm("rct_cnn4", 8, pretrained=False)
    plain = teacher(x_teacher)
    teacher.normalize_inputs(scale, shift)
    assert "input_scale" not in teacher.state_dict()  # nothing new in checkpoints or exports
    torch.testing.assert_close(teacher(x_student), plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(teacher.model(x_student), plain, atol=1e-3)  # without it the teacher sees other inputs
    teacher.normalize_inputs(None, None)
    torch.testing.assert_close(teacher(x_teacher), plain)
