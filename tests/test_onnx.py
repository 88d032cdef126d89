"""ONNX export of a student: onnxruntime gives the PyTorch eval-mode embeddings at any batch size, the
input contract travels with the model, and `run_export(..., onnx=True)` exports a trained checkpoint.

Skipped as a whole where onnx or onnxruntime is not installed (the `onnx` extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason='ONNX export needs the onnx package: pip install "rct-dist[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='checking ONNX exports needs onnxruntime: pip install "rct-dist[onnx]"')

from rct_dist.config import load_config  # noqa: E402
from rct_dist.data.loader import ShardIndex, make_loader  # noqa: E402
from rct_dist.data.transforms import build_transform  # noqa: E402
from rct_dist.jobs import run_export  # noqa: E402
from rct_dist.models import build_model, export_onnx, load_exported, read_onnx_contract  # noqa: E402
from rct_dist.models import export as export_module  # noqa: E402
from rct_dist.train.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4  # of the largest output magnitude; float32 exports land near 1e-6


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_matches(sess, model: torch.nn.Module, images: torch.Tensor) -> None:
    """onnxruntime's embeddings of `images` equal the model's eval output to RTOL of their scale."""
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    got = sess.run(["embeddings"], {"images": images.numpy()})[0]
    assert got.shape == expected.shape and got.dtype == np.float32
    scale = float(np.abs(expected).max())
    assert scale > 0
    assert float(np.abs(got - expected).max()) <= RTOL * scale


def trained_bn_stats(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Move BatchNorm running statistics away from their init, so eval and train outputs differ."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape) * 2 + 0.5)


@pytest.mark.parametrize(("backbone", "size", "normalize"), [("rct_cnn3_small", 28, False), ("resnet18", 64, True)])
def test_onnx_equals_torch_at_two_batch_sizes(tmp_path, backbone, size, normalize):
    torch.manual_seed(0)
    model = build_model(backbone, 64, normalize=normalize)
    trained_bn_stats(model, (3, size, size))
    assert model.training

    path = export_onnx(model, tmp_path / "out" / "model.onnx", size)
    assert path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert model.training  # the caller's mode is kept
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.json"]  # no temp files

    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("images", "embeddings")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, size, size]  # free batch axis
    assert isinstance(out.shape[0], str) and out.shape[1:] == [64]
    generator = torch.Generator().manual_seed(7)
    for batch in (2, 5):
        assert_matches(sess, model, torch.randn(batch, 3, size, size, generator=generator))
    if normalize:
        got = sess.run(None, {"images": torch.randn(3, 3, size, size).numpy()})[0]
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_dynamo_exporter_equals_torch(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    model = build_model("rct_cnn3_small", 32)
    trained_bn_stats(model, (3, 24, 24))
    path = export_onnx(model, tmp_path / "model.onnx", 24, exporter="dynamo")
    assert read_onnx_contract(path)["exporter"] == "dynamo" and read_onnx_contract(path)["opset"] == 18
    sess = session(path)
    for batch in (1, 4):
        assert_matches(sess, model, torch.randn(batch, 3, 24, 24))


def test_fixed_batch_export_keeps_batch_one(tmp_path):
    torch.manual_seed(0)
    model = build_model("rct_cnn3_small", 16)
    sess = session(export_onnx(model, tmp_path / "m.onnx", 20, batch_dynamic=False, opset=13))
    assert sess.get_inputs()[0].shape == [1, 3, 20, 20]
    assert_matches(sess, model, torch.randn(1, 3, 20, 20))
    assert read_onnx_contract(tmp_path / "m.onnx")["opset"] == 13


def test_contract_matches_eval_transform_and_metadata(tmp_path):
    model = build_model("rct_cnn3_small", 16, normalize=True)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.75], "interpolation": "bicubic", "crop_pct": 0.9}
    path = export_onnx(model, tmp_path / "model.onnx", 40, preprocess=preprocess)
    contract = json.loads((tmp_path / "model.onnx.json").read_text())
    assert read_onnx_contract(path) == contract
    assert contract["input"]["shape"] == ["batch", 3, 40, 40]
    assert contract["output"] == {"name": "embeddings", "dtype": "float32", "shape": ["batch", 16],
                                  "l2_normalized": True}
    assert contract["model"]["backbone"] == "rct_cnn3_small"
    assert (contract["input"]["mean"], contract["input"]["std"]) == (preprocess["mean"], preprocess["std"])

    # the resize and crop the contract states are those of the evaluation transform itself
    steps = {type(t).__name__: t for t in build_transform(40, False, **preprocess).transforms}
    assert contract["resize"]["shorter_side"] == steps["Resize"].size
    assert contract["resize"]["interpolation"] == steps["Resize"].interpolation.value == "bicubic"
    assert [contract["resize"]["center_crop"]] * 2 == list(steps["CenterCrop"].size)
    torch.testing.assert_close(torch.as_tensor(steps["Normalize"].mean, dtype=torch.float64),
                               torch.tensor(preprocess["mean"], dtype=torch.float64))

    defaults = json.loads(Path(export_onnx(model, tmp_path / "d.onnx", 40)).with_suffix(".onnx.json").read_text())
    assert defaults["resize"]["shorter_side"] == 45  # floor(40 / 0.875)
    assert defaults["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r'pip install "rct-dist\[onnx\]"'):
        export_onnx(build_model("rct_cnn3_small", 8), tmp_path / "model.onnx", 16)
    assert not any(tmp_path.iterdir())


def test_failed_export_names_the_backbone(tmp_path):
    with pytest.raises(RuntimeError, match="backbone 'rct_cnn3_small' failed"):
        export_onnx(build_model("rct_cnn3_small", 8), tmp_path / "model.onnx", 16, opset=1)
    assert not (tmp_path / "model.onnx").exists()


def test_verification_rejects_a_graph_that_differs(tmp_path, monkeypatch):
    """An export whose weights differ from the model's (simulated exporter bug) is not written."""
    original = export_module._run_exporter

    def wrong_weights(net, *args):
        import copy

        other = copy.deepcopy(net)
        with torch.no_grad():
            other.head.fc.bias += 0.1
        original(other, *args)

    monkeypatch.setattr(export_module, "_run_exporter", wrong_weights)
    with pytest.raises(RuntimeError, match="backbone 'rct_cnn3_small' differs from PyTorch"):
        export_onnx(build_model("rct_cnn3_small", 8), tmp_path / "model.onnx", 16)
    assert not (tmp_path / "model.onnx").exists()


def test_bad_arguments(tmp_path):
    model = build_model("rct_cnn3_small", 8)
    with pytest.raises(ValueError, match=r"\.onnx file"):
        export_onnx(model, tmp_path, 16)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "m.onnx", 16, exporter="jit")
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(model, tmp_path / "m.onnx", 0)
    with pytest.raises(TypeError, match="EmbeddingModel"):
        export_onnx(model.backbone, tmp_path / "m.onnx", 16)


RUN = """
run: {{name: tiny, out_dir: {out}}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0,
        samples_per_epoch: 100}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
loss: {{name: proxy_anchor}}
optim: {{lr: 1.0e-3, epochs: 1}}
deepspeed: {{config: {ds}}}
eval: {{batch_size: 256}}
log: {{every_steps: 10, tensorboard: false}}
"""


def test_run_export_writes_checked_onnx_of_the_checkpoint(digits_shards, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(RUN.format(out=tmp_path / "runs", data=digits_shards,
                                 ds=ROOT / "configs" / "deepspeed" / "zero0_fp32.json"))
    train(load_config(str(config), ["job=train-teacher"]))

    out = run_export(tmp_path / "runs" / "tiny", out=tmp_path / "export", onnx=True)
    assert {"model.onnx", "model.onnx.json", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    student = load_exported(out).eval()  # the checkpoint's student, from the safetensors files
    contract = read_onnx_contract(out / "model.onnx")
    assert contract["input"]["shape"] == ["batch", 3, 16, 16] and contract["output"]["shape"] == ["batch", 16]

    sess = session(out / "model.onnx")
    generator = torch.Generator().manual_seed(3)
    for batch in (1, 6):
        assert_matches(sess, student, torch.randn(batch, 3, 16, 16, generator=generator))
    # real digits, as the run's evaluation loader feeds them
    loader = make_loader(ShardIndex.load(digits_shards / "test"), batch_size=64, train=False, image_size=16,
                         workers=0, rank=0, world=1)
    images = next(iter(loader)).images
    assert images.shape == (64, 3, 16, 16)
    assert_matches(sess, student, images)
