"""Models: embedding head, small CNNs in timm, frozen teacher, pretrained files, safetensors export."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import rct_dist.models.export as export_module
from rct_dist.losses import RelaxedContrastiveLoss
from rct_dist.models import (
    EmbeddingHead,
    FrozenTeacher,
    build_model,
    export_model,
    load_as_timm,
    load_exported,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(n: int = 4, in_chans: int = 3, size: int = 28) -> torch.Tensor:
    return torch.randn(n, in_chans, size, size)


def _trained(model: nn.Module, in_chans: int = 3) -> nn.Module:
    """One train-mode forward, so BN running statistics differ from their initial values."""
    with torch.no_grad():
        model.train()(_images(8, in_chans))
    return model.eval()


# --- head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_features, embedding_size", [(64, 16), (64, 64), (8, 32)])
def test_head_orthogonal_init_and_zero_bias(in_features: int, embedding_size: int) -> None:
    w = EmbeddingHead(in_features, embedding_size).fc.weight.detach()
    assert w.shape == (embedding_size, in_features)
    gram = w @ w.T if embedding_size <= in_features else w.T @ w
    assert torch.allclose(gram, torch.eye(min(w.shape)), atol=1e-5)
    assert torch.count_nonzero(EmbeddingHead(in_features, embedding_size).fc.bias) == 0


def test_head_sums_average_and_max_pooling() -> None:
    head = EmbeddingHead(8, 5)
    with torch.no_grad():
        head.fc.bias.normal_()
    x = torch.randn(3, 8, 4, 6)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1) + F.adaptive_max_pool2d(x, 1).flatten(1)
    expected = pooled @ head.fc.weight.T + head.fc.bias
    assert torch.allclose(head(x), expected, atol=1e-6)
    channels_last = EmbeddingHead(8, 5, feature_fmt="NHWC")
    channels_last.load_state_dict(head.state_dict())
    assert torch.allclose(channels_last(x.permute(0, 2, 3, 1)), expected, atol=1e-6)


def test_head_normalize_flag() -> None:
    x = torch.randn(3, 8, 2, 2) * 10
    raw = EmbeddingHead(8, 5, normalize=False)
    unit = EmbeddingHead(8, 5, normalize=True)
    unit.load_state_dict(raw.state_dict())
    assert not torch.allclose(raw(x).norm(dim=1), torch.ones(3))
    assert torch.allclose(unit(x), F.normalize(raw(x), dim=1))


def test_head_rejects_non_feature_maps() -> None:
    with pytest.raises(ValueError, match="4-D feature map"):
        EmbeddingHead(8, 5)(torch.randn(3, 10, 8))
    with pytest.raises(ValueError, match="NCHW or NHWC"):
        EmbeddingHead(8, 5, feature_fmt="NLC")


# --- backbones ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("rct_cnn4", (64, 1, 1)), ("rct_cnn3_small", (32, 3, 3))])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_small_cnns_are_timm_models(name: str, shape: tuple[int, ...], in_chans: int) -> None:
    backbone = timm.create_model(name, num_classes=0, global_pool="", in_chans=in_chans)
    assert backbone(_images(2, in_chans)).shape == (2, *shape)
    assert backbone.num_features == shape[0]
    classifier = timm.create_model(name, num_classes=7, in_chans=in_chans)
    assert classifier(_images(2, in_chans)).shape == (2, 7)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_build_model_small_cnn(in_chans: int) -> None:
    model = build_model("rct_cnn3_small", 16, in_chans=in_chans)
    assert model(_images(2, in_chans)).shape == (2, 16)
    assert model.config == dict(backbone="rct_cnn3_small", embedding_size=16, normalize=False, in_chans=in_chans)


def test_build_model_resnet18_random_init() -> None:
    model = build_model("resnet18", 24, normalize=True).eval()
    out = model(_images(2, 3, 32))
    assert out.shape == (2, 24)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_build_model_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        build_model("rct_cnn4", 0)


# --- pretrained weights -------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No hub: huggingface_hub reads HF_HUB_OFFLINE at import, so patch its constant too; empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize("backbone", ["resnet18", "rct_cnn4"])
def test_pretrained_without_file_offline_says_how_to_pass_one(offline: None, backbone: str) -> None:
    with pytest.raises(RuntimeError, match=r"pretrained_file=PATH.*model\.pretrained_file"):
        build_model(backbone, 8, pretrained=True)


def test_pretrained_file_loads_local_weights(offline: None, tmp_path) -> None:
    source = timm.create_model("resnet18", num_classes=10)  # a classifier checkpoint, as on the hub
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model("resnet18", 8, pretrained_file=str(path))
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(source.state_dict()) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())


def test_pretrained_file_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_file not found"):
        build_model("rct_cnn4", 8, pretrained_file=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("backbone", ["rct_cnn4", "resnet18"])  # timm loads strictly / non-strictly
def test_pretrained_file_of_other_names_is_refused(tmp_path, backbone: str) -> None:
    """An EmbeddingModel state dict (keys "backbone.*") must not leave a silently random backbone."""
    wrong = tmp_path / "prefixed.safetensors"
    save_file(dict(build_model(backbone, 8).state_dict()), str(wrong))
    with pytest.raises(RuntimeError, match="pretrained_file"):
        build_model(backbone, 8, pretrained_file=str(wrong))


# --- frozen teacher -----------------------------------------------------------------------------


def test_frozen_teacher_never_trains_nor_changes() -> None:
    teacher = FrozenTeacher(_trained(build_model("rct_cnn4", 32)))
    student = build_model("rct_cnn3_small", 8)
    both = nn.ModuleDict(dict(teacher=teacher, student=student)).train()
    assert student.training and not teacher.training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    images = _images(6)
    target = teacher(images)
    assert not target.requires_grad and target.dtype == torch.float32
    RelaxedContrastiveLoss()(student(images), target).backward()
    optimizer.step()
    teacher.train()
    both.train()
    teacher(images)

    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_frozen_teacher_bf16_returns_close_fp32() -> None:
    model = _trained(build_model("rct_cnn4", 32))
    images = _images(4)
    exact = FrozenTeacher(model)(images)
    half = FrozenTeacher(model, dtype="bf16")(images)
    assert half.dtype == torch.float32
    assert not torch.equal(half, exact)
    assert (half - exact).norm() / exact.norm() < 5e-2


def test_frozen_teacher_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        FrozenTeacher(build_model("rct_cnn4", 8), dtype="fp16x")


def test_frozen_teacher_from_timm_and_export(tmp_path) -> None:
    teacher = FrozenTeacher.from_timm("rct_cnn4", 16, pretrained=False, in_chans=1)
    assert teacher.config["in_chans"] == 1 and not teacher.training
    export_model(teacher.model, tmp_path)
    again = FrozenTeacher.from_export(tmp_path)
    images = _images(3, 1)
    assert torch.equal(teacher(images), again(images))


# --- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, in_chans, normalize, size",
    [("rct_cnn4", 1, True, 28), ("rct_cnn3_small", 3, False, 28), ("resnet18", 3, False, 32)],
)
def test_export_round_trip_identical(tmp_path, backbone: str, in_chans: int, normalize: bool, size: int) -> None:
    model = _trained(build_model(backbone, 16, normalize=normalize, in_chans=in_chans), in_chans)
    export_model(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "backbone.safetensors",
        "config.json",
        "model.safetensors",
    ]
    images = _images(3, in_chans, size)
    expected = model(images)
    restored = load_exported(tmp_path / "export").eval()
    assert restored.config == model.config
    assert torch.equal(restored(images), expected)
    as_timm = load_as_timm(tmp_path / "export").eval()
    assert torch.equal(as_timm(images), expected)
    assert torch.equal(as_timm[1](as_timm[0](images)), expected)


def test_load_as_timm_backbone_comes_from_timms_loader(tmp_path) -> None:
    """[0] is loaded by timm from backbone.safetensors: other values there give other outputs."""
    model = build_model("rct_cnn4", 8).eval()
    export_model(model, tmp_path)
    save_file({k: v + 1 for k, v in model.backbone.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    images = _images(2)
    assert torch.equal(load_exported(tmp_path).eval()(images), model(images))
    assert not torch.equal(load_as_timm(tmp_path).eval()(images), model(images))


def test_load_exported_never_unpickles(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_model(build_model("rct_cnn3_small", 8), tmp_path)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_exported(tmp_path)
    load_as_timm(tmp_path)


def test_export_overwrites_atomically(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed export leaves the previous export whole and no temporary files."""
    export_model(build_model("rct_cnn3_small", 8), tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = export_module.save_file
    calls: list[object] = []

    def save_then_fail(tensors, path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(export_module, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(build_model("rct_cnn3_small", 8), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def _broken(tmp_path, edit) -> object:
    export_model(build_model("rct_cnn3_small", 8), tmp_path)
    edit(tmp_path)
    return tmp_path


def _edit_config(**changes):
    def edit(folder) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return edit


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda f: (f / "config.json").unlink(), FileNotFoundError, "config.json is missing"),
        (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors is missing"),
        (lambda f: (f / "config.json").write_text("{not json"), ValueError, "not valid JSON"),
        (_edit_config(embedding_size=None), ValueError, r"lacks the keys \['embedding_size'\]"),
        (_edit_config(in_chans="3"), ValueError, "in_chans must be a int"),
        (_edit_config(format="other"), ValueError, "not an rct-dist export"),
        (_edit_config(format_version=99), ValueError, "format_version 99"),
        (_edit_config(embedding_size=9), ValueError, r"head\.fc\.weight: shape \(8, 32\) in file, \(9, 32\)"),
        (lambda f: (f / "model.safetensors").write_bytes(b"garbage"), ValueError, "not a readable safetensors"),
    ],
)
def test_load_exported_clear_errors(tmp_path, edit, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        load_exported(_broken(tmp_path, edit))


def test_load_as_timm_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="backbone.safetensors is missing"):
        load_as_timm(_broken(tmp_path, lambda f: (f / "backbone.safetensors").unlink()))
