"""Bad input fuzzing (issue 11, point 6): every mutation of a valid config or command line is refused with
one line naming what is wrong, never a traceback, and before anything heavy starts.

The rule each case is held to (`refused`):
- `rct_dist.cli.main(argv)`, run in-process, raises SystemExit with status 2 (the status argparse uses
  for usage errors, and rct-dist for config and data errors);
- stderr holds exactly one non-empty line, starting `rct-dist`, and no "Traceback". argparse's own errors
  are one line too: rct-dist's parser prints `rct-dist SUB: error: MESSAGE (see `rct-dist SUB --help`)`
  instead of argparse's usage block; config, override and data errors read `rct-dist SUB: MESSAGE`;
- that line holds the words the case names: the offending key (`data.pk`), flag (`--shard-size`) or file;
- nothing started: the trainer, `init_distributed` (process groups, DeepSpeed) and the jobs' own start-up are
  replaced by a sentinel that fails the test if reached, torch.distributed is not initialised afterwards,
  and no run folder was made.

The valid inputs the mutations start from are checked too: they reach the trainer's sentinel (so each
failure below is the mutation's). Cases are systematic (every leaf key of every config section gets wrong
types, -1, 0 where 0 is invalid, an out-of-range int and a misspelt name) plus seeded random ones (garbled
override strings, garbled YAML files: those must load or be refused by the rule, never crash).

"Batch not divisible by views" has no case: `data.batch_size` counts images and each image yields
`data.views` views, so every batch size fits every view count; views <= 0 is covered.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

import rct_dist.cli as cli
from rct_dist.config import SECTIONS


class Reached(BaseException):
    """Start-up was reached: the input was not refused before it (BaseException: nothing catches it)."""


def _sentinel(what: str):
    def reached(*args, **kwargs):
        raise Reached(f"{what} reached: the input was not refused before start-up")

    return reached


@pytest.fixture(autouse=True)
def no_start_up(monkeypatch):
    import rct_dist.demo
    import rct_dist.jobs
    import rct_dist.train.engine
    import rct_dist.train.loop

    monkeypatch.setattr(rct_dist.train.loop, "train", _sentinel("the trainer"))
    for module in (rct_dist.train.engine, rct_dist.jobs, rct_dist.demo):
        monkeypatch.setattr(module, "init_distributed", _sentinel("init_distributed"))
    monkeypatch.setenv("RCT_DIST_DATA", "/data")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    already = dist.is_initialized()  # an in-process run of an earlier test module may have left one
    yield
    assert dist.is_initialized() == already, "a bad input started a process group"


# ----------------------------------------------------------------------------------------------------------
# The valid starting points: digits shards, a small export, and a teacher and a transfer config on them.


@dataclass
class Paths:
    tmp: Path
    digits: Path
    export: Path
    runs: Path
    a_file: Path
    empty: Path

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, digits=self.digits, export=self.export, runs=self.runs,
                           file=self.a_file, empty=self.empty)


@pytest.fixture(scope="module")
def paths(digits_shards, tmp_path_factory) -> Paths:
    from rct_dist.models import build_model, export_model

    tmp = tmp_path_factory.mktemp("fuzz")
    export = export_model(build_model("rct_cnn3_small", 8), tmp / "export")
    (tmp / "a_file.txt").write_text("not a folder\n")
    (tmp / "empty").mkdir()
    return Paths(tmp, digits_shards, Path(export), tmp / "runs", tmp / "a_file.txt", tmp / "empty")


def teacher_config(p: Paths) -> dict[str, Any]:
    return {
        "job": "train-teacher",
        "run": {"name": "fuzz", "out_dir": str(p.runs)},
        "data": {"root": str(p.digits), "image_size": 16, "views": 2, "pk": [5, 4], "batch_size": 20,
                 "workers": 0, "samples_per_epoch": 200},
        "model": {"backbone": "rct_cnn3_small", "embedding_size": 16},
        "loss": {"name": "proxy_anchor"},
        "optim": {"lr": 1.0e-3, "epochs": 1},
        "deepspeed": {"config": "zero0_fp32"},
        "log": {"every_steps": 10, "tensorboard": False},
    }


def transfer_config(p: Paths) -> dict[str, Any]:
    config = teacher_config(p)
    config.update(job="transfer", loss={"name": "rc"}, teacher={"source": "export", "export": str(p.export)})
    return config


def write_config(folder: Path, config: dict[str, Any] | str, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# The rule.


def refused(argv: list[str], words: typing.Sequence[str], capsys, runs: Path | None = None) -> str:
    """Run the CLI on `argv`; assert the rule of the module docstring; return the error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    shown = f"argv={argv}\nstderr:\n{err}"
    assert "Traceback" not in err, shown
    assert info.value.code == 2, f"exit status {info.value.code!r}\n{shown}"
    assert len(lines) == 1, f"{len(lines)} lines\n{shown}"
    assert lines[0].startswith("rct-dist"), shown
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"the error does not name {missing}\n{shown}"
    if runs is not None:
        assert not runs.exists(), f"a run folder was made before the input was refused\n{shown}"
    return lines[0]


def test_the_valid_starting_points_reach_the_trainer(paths, tmp_path, capsys):
    for config in (teacher_config(paths), transfer_config(paths), config_using(paths, "teacher", "backbone")):
        with pytest.raises(Reached, match="the trainer"):
            cli.main([config["job"], "--config", str(write_config(tmp_path, config))])
    assert not paths.runs.exists()
    cli.main(["configs", "--resolved", str(write_config(tmp_path, teacher_config(paths)))])
    assert "batch_size: 20" in capsys.readouterr().out
    with pytest.raises(Reached, match="init_distributed"):
        cli.main(["eval", "--export", str(paths.export), "--data", str(paths.digits / "test")])
    with pytest.raises(Reached, match="init_distributed"):
        cli.main(["embed", "--export", str(paths.export), "--data", str(paths.digits / "test"),
                  "--out", str(tmp_path / "emb")])


# ----------------------------------------------------------------------------------------------------------
# Systematic value mutations of every leaf key, written into the teacher config's YAML file.

def _walk(prefix: str, cls: type):
    """(section, key, type) of every leaf key under `prefix`, into sub-sections (`loss.rc`, key `sigma`)."""
    for key, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from _walk(f"{prefix}.{key}", tp)
        else:
            yield prefix, key, tp


LEAVES: list[tuple[str, str, Any]] = [leaf for section, cls in SECTIONS.items() for leaf in _walk(section, cls)]
# Sub-sections (section, key): `loss.rc` is ("loss", "rc").
SUBSECTIONS: list[tuple[str, str]] = sorted({(s.rsplit(".", 1)[0], s.rsplit(".", 1)[1]) for s, _, _ in LEAVES
                                             if "." in s})
# Numeric keys for which 0 is a valid value; every other numeric key must refuse 0 (a new key must be
# classified here, which is the point: a size that silently accepts 0 is what this test exists to catch).
ZERO_OK = {
    "run.seed", "data.workers", "data.shuffle_buffer", "data.hflip", "loss.proxy_anchor.margin", "loss.supervised_weight",
    "loss.rc.chunk_size", "loss.rkd.distance_weight", "loss.rkd.angle_weight",
    "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip", "optim.epochs", "optim.warmup_epochs_new_layers",
    "optim.early_stop_patience", "optim.max_nonfinite_steps", "log.retrieval_images", "log.projector_samples",
    "checkpoint.every_steps",
}


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _wrong_types(tp: Any) -> list[tuple[str, Any]]:
    base, optional = _base(tp)
    values: list[tuple[str, Any]] = [("dict", {"a": 1})]
    if not optional:
        values.append(("null", None))
    if base is int:
        values += [("str", "ten"), ("list", [1]), ("bool", True), ("fraction", 2.5), ("nan", float("nan")),
                   ("huge", 10**30), ("-huge", -(10**30))]
    elif base is float:
        values += [("str", "fast"), ("list", [0.5]), ("bool", True), ("nan", float("nan")), ("inf", float("inf")),
                   ("-inf", float("-inf")), ("1e999", "1e999")]
    elif base is bool:
        values += [("str", "sometimes"), ("int", 1), ("zero", 0), ("list", [True]), ("float", 0.5)]
    elif base is str:
        values += [("int", 5), ("list", ["a"]), ("bool", True), ("float", 1.5)]
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        values += [("str", "3x2"), ("scalar", 5), ("bad-item", [1, "x"]), ("nested", [[1], [2]]),
                   ("bool-item", [True, 2])]
        values += [("float-item", [1.5, 2])] if item is int else [("nan-item", [float("nan"), 1.0])]
    else:  # pragma: no cover - a new kind of key: add its wrong values above
        raise AssertionError(f"no wrong values for type {tp}")
    return values


def _numeric(tp: Any) -> bool:
    return _base(tp)[0] in (int, float)


VALUE_CASES = []
for _section, _key, _tp in LEAVES:
    _name = f"{_section}.{_key}"
    for _label, _value in _wrong_types(_tp):
        VALUE_CASES.append(pytest.param(_section, _key, _value, id=f"{_name}={_label}"))
    if _numeric(_tp):
        VALUE_CASES.append(pytest.param(_section, _key, -1, id=f"{_name}=-1"))
        if _name not in ZERO_OK:
            VALUE_CASES.append(pytest.param(_section, _key, 0, id=f"{_name}=0"))
    elif _base(_tp)[0] is str and _name not in ("run.out_dir", "data.root"):  # '' is '.' there, checked later
        VALUE_CASES.append(pytest.param(_section, _key, "", id=f"{_name}=empty"))
for _section, _key in SUBSECTIONS:  # a sub-section is a mapping (null: its defaults)
    for _label, _value in (("scalar", 5), ("str", "x"), ("list", [{"a": 1}]), ("bool", True)):
        VALUE_CASES.append(pytest.param(_section, _key, _value, id=f"{_section}.{_key}={_label}"))


def put(config: dict[str, Any], section: str, key: str, value: Any) -> None:
    """config[section][key] = value, `section` dotted for sub-sections (`loss.rc`)."""
    holder = config
    for part in section.split("."):
        holder = holder.setdefault(part, {})
    holder[key] = value


def config_using(p: Paths, section: str, key: str) -> dict[str, Any]:
    """A valid config in which `section.key` is used: teacher keys need a transfer from that teacher source,
    a loss's options (`loss.rkd`) that loss, `loss.supervised_weight` a transfer."""
    if section.startswith("loss.") and section != "loss.proxy_anchor" or (section, key) == ("loss", "supervised_weight"):
        config = transfer_config(p)
        config["loss"] = {"name": section.split(".")[1] if "." in section else "rc"}
        return config
    if section != "teacher":
        return teacher_config(p)
    config = transfer_config(p)
    if key != "export":
        config["teacher"] = {"source": "model", "backbone": "rct_cnn4", "embedding_size": 16}
    return config


@pytest.mark.parametrize("section, key, value", VALUE_CASES)
def test_every_leaf_key_refuses_bad_values(section, key, value, paths, tmp_path, capsys):
    config = config_using(paths, section, key)
    put(config, section, key, value)
    refused([config["job"], "--config", write_config(tmp_path, config)], [f"{section}.{key}"], capsys, paths.runs)


@pytest.mark.parametrize("value", [5, ["train-teacher"], {"a": 1}, None, True, "", "train_teacher"])
def test_job_refuses_bad_values(value, paths, tmp_path, capsys):
    config = {**teacher_config(paths), "job": value}
    refused(["configs", "--resolved", write_config(tmp_path, config)], ["job"], capsys)


# ----------------------------------------------------------------------------------------------------------
# Unknown names: every key and section misspelt (the close name is suggested), plus seeded random edits.


def _edits(name: str, rng: random.Random) -> str:
    """One random edit of `name`: delete, swap, replace or insert a character."""
    i = rng.randrange(len(name))
    kind = rng.choice(("delete", "swap", "replace", "insert"))
    letter = rng.choice(string.ascii_lowercase + "_")
    if kind == "delete" and len(name) > 3:
        return name[:i] + name[i + 1:]
    if kind == "swap" and i + 1 < len(name):
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    if kind == "replace":
        return name[:i] + letter + name[i + 1:]
    return name[:i] + letter + name[i:]


MISSPELT = [pytest.param(s, k, k + k[-1], id=f"{s}.{k}+{k[-1]}") for s, k, _ in LEAVES]
_rng = random.Random(1106)
_fields = {s: {k for s2, k, _ in LEAVES if s2 == s} | {k for s2, k in SUBSECTIONS if s2 == s} for s, _, _ in LEAVES}
for _ in range(60):
    _s, _k, _ = _rng.choice(LEAVES)
    _bad = _edits(_k, _rng)
    if _bad not in _fields[_s]:
        MISSPELT.append(pytest.param(_s, _k, _bad, id=f"{_s}.{_k}->{_bad}"))


@pytest.mark.parametrize("section, key, bad", MISSPELT)
def test_misspelt_keys_are_named_with_a_suggestion(section, key, bad, paths, tmp_path, capsys):
    config = teacher_config(paths)
    put(config, section, bad, 1)
    line = refused(["train-teacher", "--config", write_config(tmp_path, config)],
                   [f"unknown key '{section}.{bad}'", "valid:"], capsys, paths.runs)
    if bad == key + key[-1]:  # one letter doubled: the key it came from is the closest
        assert f"did you mean '{section}.{key}'" in line, line
    # and the same through an override
    refused(["configs", "--resolved", "cub/teacher", f"{section}.{bad}=1"], [f"'{section}.{bad}'"], capsys)


@pytest.mark.parametrize("section, bad, suggestion", [
    *[(s, s + s[-1], s) for s in SECTIONS],
    ("optm", "optm", "optim"), ("trainer", "trainer", None), ("Data", "Data", "data"), ("base2", "base2", None),
])
def test_unknown_sections_are_named(section, bad, suggestion, paths, tmp_path, capsys):
    config = {**teacher_config(paths), bad: {"x": 1}}
    line = refused(["train-teacher", "--config", write_config(tmp_path, config)],
                   [f"unknown section '{bad}'", "checkpoint"], capsys)
    if suggestion:
        assert f"did you mean '{suggestion}'" in line, line


# ----------------------------------------------------------------------------------------------------------
# Whole files: syntax errors, wrong shapes, base chains, and the --config argument itself.

YAML_ERRORS = {
    "open-flow": "optim: [\n",
    "mapping-in-value": "optim: lr: 1\n",
    "unclosed-quote": "run:\n  name: 'fuzz\n",
    "tab-indent": "run:\n\tname: fuzz\n",
    "bad-indent": "data:\n  - 1\n  b: 2\n",
    "open-mapping": "{data: {root: x}\n",
    "at-sign": "run: @x\n",
    "duplicate-anchor-ref": "run: *nothing\n",
}


@pytest.mark.parametrize("text", list(YAML_ERRORS.values()), ids=list(YAML_ERRORS))
def test_yaml_syntax_errors_name_file_and_line(text, tmp_path, capsys):
    path = write_config(tmp_path, text)
    refused(["transfer", "--config", path], [str(path), "not valid YAML", "line "], capsys)


@pytest.mark.parametrize("text, words", [
    ("- 1\n- 2\n", ["must hold a mapping", "list"]),
    ("42\n", ["must hold a mapping", "int"]),
    ("just words\n", ["must hold a mapping", "str"]),
    ("optim: 3\n", ["'optim'", "mapping"]),
    ("optim: [1, 2]\n", ["'optim'", "mapping"]),
    ("data: just words\n", ["'data'", "mapping"]),
    ("base: 5\n", ["base", "path string"]),
    ("base: [a.yaml]\n", ["base", "path string"]),
    ("base: nope.yaml\n", ["nope.yaml"]),
    ("base: .\n", ["base", "is not a file"]),
    ("base: run.yaml\n", ["cycle", "run.yaml"]),
    ("base: list.yaml\n", ["list.yaml", "must hold a mapping"]),
    ("base: cycle_a.yaml\n", ["cycle", "cycle_a.yaml", "cycle_b.yaml"]),
    ("base: broken.yaml\n", ["broken.yaml", "not valid YAML"]),
    ("data:\n  root: ${RCT_FUZZ_UNSET_VARIABLE}/x\n", ["data.root", "RCT_FUZZ_UNSET_VARIABLE"]),
    ("deepspeed:\n  config: zero9_bf16\n", ["deepspeed.config", "zero9_bf16"]),
    ("deepspeed:\n  config: /nonexistent/ds.json\n", ["deepspeed.config", "/nonexistent/ds.json"]),
    ("model:\n  pretrained_file: pkg:no_such_package_fuzz/w.pth\n", ["model.pretrained_file", "not installed"]),
    ("1: 2\n", ["unknown section '1'"]),
    ("data:\n  1: 2\n", ["unknown key 'data.1'"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_files_of_the_wrong_shape(text, words, tmp_path, capsys):
    write_config(tmp_path, "- 1\n", "list.yaml")
    write_config(tmp_path, "base: cycle_b.yaml\n", "cycle_a.yaml")
    write_config(tmp_path, "base: cycle_a.yaml\n", "cycle_b.yaml")
    write_config(tmp_path, "optim: [\n", "broken.yaml")
    refused(["transfer", "--config", write_config(tmp_path, text)], words, capsys)


def test_config_argument_that_is_not_a_config(paths, tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01 not text")
    refused(["transfer", "--config", binary], [str(binary), "UTF-8"], capsys)
    refused(["transfer", "--config", tmp_path / "nope.yaml"], ["nope.yaml", "neither a file nor a built-in"], capsys)
    refused(["transfer", "--config", tmp_path], [str(tmp_path), "neither a file"], capsys)
    refused(["transfer", "--config", "cub/teachr"], ["cub/teachr", "did you mean cub/teacher"], capsys)
    refused(["configs", "nosuch/config"], ["nosuch/config"], capsys)


# ----------------------------------------------------------------------------------------------------------
# Overrides: malformed, unknown, wrong values, and the cross-field rules.

OVERRIDES = [
    ("data.batch_size", ["'data.batch_size'", "section.key=value", "no '='"]),
    ("=3", ["'=3'", "section.key=value"]),
    ("data..x=1", ["'data..x=1'", "section.key=value"]),
    ("data.=1", ["'data.=1'", "section.key=value"]),
    (".batch_size=1", ["'.batch_size=1'", "section.key=value"]),
    ("a.b.c=1", ["'a.b.c=1'", "section.key=value"]),
    ("data=3", ["'data=3'", "section.key=value"]),
    ("job", ["'job'", "section.key=value"]),
    ("data.batch_size: 3", ["'data.batch_size: 3'", "section.key=value"]),
    ("nosuch.key=1", ["unknown section 'nosuch'"]),
    ("data.nosuch=1", ["unknown key 'data.nosuch'"]),
    ("data.batchsize=4", ["'data.batchsize'", "did you mean 'data.batch_size'"]),
    ("data.batch_size==3", ["data.batch_size", "expected int"]),
    ("data.batch_size=", ["data.batch_size", "expected int"]),
    ("data.batch_size=3 4", ["data.batch_size", "expected int"]),
    ("data.pk=[1,2", ["'data.pk=[1,2'", "not valid YAML", "line 1"]),
    ("eval.ks=[1,", ["'eval.ks=[1,'", "not valid YAML"]),
    ("optim.lr={", ["'optim.lr={'", "not valid YAML"]),
    ("data.pk=[5,4,1]", ["data.pk", "two positive"]),
    ("data.pk=[5]", ["data.pk", "two positive"]),
    ("data.pk=[5,-4]", ["data.pk", "two positive"]),
    ("data.pk=[4,4]", ["data.pk", "16 images", "data.batch_size=20"]),
    ("data.pk=[10,2]", ["data.pk", "P=10"]),
    ("data.crop_scale=[0.9,0.5]", ["data.crop_scale"]),
    ("data.crop_scale=[0.5,1.5]", ["data.crop_scale"]),
    ("data.crop_scale=[0.5]", ["data.crop_scale"]),
    ("data.hflip=1.5", ["data.hflip"]),
    ("data.crop_pct=1.5", ["data.crop_pct"]),
    ("data.mean=[0.5,0.5]", ["data.mean"]),
    ("data.std=[0.5,0,0.5]", ["data.std"]),
    ("data.interpolation=bilinar", ["data.interpolation", "did you mean 'bilinear'"]),
    (("data.decode=gpu", "data.uint8_batches=true"), ["data.uint8_batches"]),
    ("data.val_split=test", ["data.val_split", "must differ"]),
    ("data.val_split=train", ["data.val_split", "must differ"]),
    ("eval.select=val", ["eval.select", "data.val_split"]),
    ("optim.early_stop_patience=2", ["optim.early_stop_patience", "data.val_split"]),
    ("optim.decay_gamma=1.5", ["optim.decay_gamma"]),
    ("eval.ks=[]", ["eval.ks"]),
    ("eval.ks=[0,1]", ["eval.ks"]),
    ("eval.metric=cos", ["eval.metric", "cosine"]),
    ("loss.name=rc", ["loss.name", "proxy_anchor"]),
    # keys that moved, and keys with no effect on this run (job train-teacher: no teacher, Proxy-Anchor only)
    ("loss.sigma=0.5", ["loss.sigma", "moved to loss.rc.sigma"]),
    ("loss.margin=0.2", ["loss.margin", "moved to loss.proxy_anchor.margin"]),
    ("optim.proxy_lr_multiplier=10", ["optim.proxy_lr_multiplier", "moved to loss.proxy_anchor.lr_multiplier"]),
    ("loss.rc.sigma=0.5", ["loss.rc.sigma", "no effect", "loss.name proxy_anchor"]),
    ("loss.supervised_weight=1", ["loss.supervised_weight", "no effect", "job train-teacher"]),
    ("teacher.backbone=rct_cnn4", ["teacher.backbone", "no effect", "job train-teacher"]),
    ("job=transfr", ["'job=transfr'", "contradicts the subcommand"]),
    ("job=transfer", ["'job=transfer'", "contradicts the subcommand"]),
    ("run.name=..", ["run.name"]),
    ("run.name=/abs/run", ["run.name"]),
    ("run.name=a/../..", ["run.name"]),
    ("data.root=${RCT_FUZZ_UNSET_VARIABLE}/x", ["data.root", "RCT_FUZZ_UNSET_VARIABLE"]),
    ("deepspeed.config=zero2_bf17", ["deepspeed.config", "zero2_bf16"]),
    ("model.pretrained_file=pkg:no_such_package_fuzz/w.pth", ["model.pretrained_file"]),
]


@pytest.mark.parametrize("overrides, words", OVERRIDES, ids=[" ".join(o) if isinstance(o, tuple) else o
                                                              for o, _ in OVERRIDES])
def test_bad_overrides(overrides, words, paths, tmp_path, capsys):
    """Each string is one argument (`data.batch_size=3 4` included); a tuple is several."""
    overrides = list(overrides) if isinstance(overrides, tuple) else [overrides]
    refused(["train-teacher", "--config", write_config(tmp_path, teacher_config(paths)), *overrides], words,
            capsys, paths.runs)


@pytest.mark.parametrize("override, words", [
    ("loss.name=proxy_anchor", ["job transfer", "loss.name", "'proxy_anchor'"]),
    ("teacher.source=export teacher.export=null", ["teacher.export", "not set"]),
    ("teacher.source=exprt", ["teacher.source", "did you mean 'export'"]),
    ("teacher.dtype=fp16", ["teacher.dtype"]),
    ("loss.delta=2", ["loss.delta", "moved to loss.rc.delta"]),
    ("teacher.backbone=rct_cnn4", ["teacher.backbone", "no effect", "teacher.source export"]),
    ("teacher.source=model teacher.export=x", ["teacher.export", "no effect", "teacher.source model"]),
    ("teacher.source=shards teacher.dtype=bf16", ["teacher.dtype", "no effect", "teacher.source shards"]),
    ("loss.pkt.eps=0.1", ["loss.pkt.eps", "no effect", "loss.name rc"]),
    ("loss.proxy_anchor.margin=0.2", ["loss.proxy_anchor.margin", "no effect", "supervised_weight 0"]),
    ("loss.rc.kernel=triton loss.rc.chunk_size=0", ["loss.rc.chunk_size", "loss.rc.kernel"]),
    ("loss.name=rkd loss.rkd.distance_weight=0 loss.rkd.angle_weight=0", ["loss.rkd.distance_weight", "both 0"]),
])
def test_bad_transfer_overrides(override, words, paths, tmp_path, capsys):
    argv = ["transfer", "--config", write_config(tmp_path, transfer_config(paths)), *override.split(" ")]
    refused(argv, words, capsys, paths.runs)


# ----------------------------------------------------------------------------------------------------------
# What the config names on disk: refused by the preflight before any process group or run folder.


@pytest.fixture(scope="module")
def broken_roots(paths, tmp_path_factory) -> dict[str, Path]:
    """Copies of the digits train split's index, each damaged one way, as data.root folders (the shards
    linked, the test split whole)."""
    root, digits = tmp_path_factory.mktemp("broken"), paths.digits
    meta = json.loads((digits / "train" / "index.json").read_text())
    variants = {
        "not-json": "{ this is not json",
        "a-list": json.dumps([1, 2]),
        "no-shards-key": json.dumps({k: v for k, v in meta.items() if k != "shards"}),
        "wrong-format": json.dumps({**meta, "format": "something-else"}),
        "counts-disagree": json.dumps({**meta, "samples": meta["samples"] + 1}),
        "missing-shard": json.dumps({**meta, "shards": ["nope-000000.tar", *meta["shards"][1:]]}),
        "binary": b"\xff\xfe\x00garbage",
    }
    out = {}
    for name, content in variants.items():
        split = root / name / "train"
        split.mkdir(parents=True)
        for shard in meta["shards"]:
            (split / shard).symlink_to(digits / "train" / shard)
        (split / "index.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        (root / name / "test").symlink_to(digits / "test")
        out[name] = root / name
    return out


PREFLIGHT = [
    # data.root and the splits
    ("data.root={tmp}/no-such-root", ["data.root", "no-such-root"]),
    ("data.root={file}", ["data.root", "a_file.txt", "is a file"]),
    ("data.root={empty}", ["data.train_split", "index.json", "empty"]),
    ("data.root=", ["data.root is not set"]),
    ("data.train_split=trian", ["data.train_split", "trian", "index.json"]),
    ("data.eval_split=tset", ["data.eval_split", "tset", "index.json"]),
    ("data.val_split=val", ["data.val_split", "val", "index.json"]),
    ("data.eval_split={empty}", ["data.eval_split", "empty", "index.json"]),
    # batch geometry against the train split (5 classes, 901 images) and the eval split (896 images)
    ("data.pk=[6,2] data.batch_size=12", ["data.pk", "P=6", "5 classes"]),
    ("data.pk=[50,2] data.batch_size=100", ["data.pk", "P=50", "5 classes"]),
    ("data.pk=null data.batch_size=1000 data.samples_per_epoch=null", ["data.batch_size=1000", "901 samples"]),
    ("data.pk=[5,100] data.batch_size=500", ["data.batch_size=500", "data.samples_per_epoch=200"]),
    ("data.samples_per_epoch=10", ["data.batch_size=20", "data.samples_per_epoch=10"]),
    ("eval.ks=[1,896]", ["eval.ks", "Recall@896", "896"]),
    ("eval.ks=[100000]", ["eval.ks", "data.eval_split"]),
    # models and files
    ("model.backbone=resnet18x", ["model.backbone", "resnet18x", "did you mean resnet18"]),
    ("model.backbone=", ["model.backbone"]),
    ("model.backbone=torchvision/mobilenet_v9", ["model.backbone", "mobilenet_v9"]),
    ("model.feature_blocks=3", ["model.feature_blocks", "torchvision"]),
    ("model.pretrained_file={tmp}/no-weights.pth", ["model.pretrained_file", "no-weights.pth"]),
    ("model.pretrained_file={empty}", ["model.pretrained_file", "is a folder"]),
    ("deepspeed.config={file}", ["deepspeed.config", "a_file.txt", "JSON"]),
    ("deepspeed.config={tmp}/list.json", ["deepspeed.config", "list.json", "JSON object"]),
    # the run folder and resuming
    ("run.resume={tmp}/no-checkpoint", ["run.resume", "no-checkpoint", "does not exist"]),
    ("run.resume={empty}", ["run.resume", "COMPLETE"]),
    ("run.out_dir={file}", ["run.out_dir", "a_file.txt"]),
    ("run.out_dir={tmp} run.name=occupied", ["occupied", "exists", "run.resume=auto", "run.overwrite=true"]),
]


@pytest.mark.parametrize("overrides, words", PREFLIGHT, ids=[o for o, _ in PREFLIGHT])
def test_preflight_refuses_what_is_on_disk(overrides, words, paths, tmp_path, capsys):
    (paths.tmp / "list.json").write_text("[1, 2]")
    (paths.tmp / "occupied").mkdir(exist_ok=True)
    (paths.tmp / "occupied" / "config.yaml").write_text("run: {}\n")
    argv = ["train-teacher", "--config", write_config(tmp_path, teacher_config(paths)),
            *paths.fill(overrides).split(" ")]
    refused(argv, [paths.fill(w) for w in words], capsys, paths.runs)


@pytest.mark.parametrize("damage", ["not-json", "a-list", "no-shards-key", "wrong-format", "counts-disagree",
                                    "missing-shard", "binary"])
def test_damaged_split_index_is_named(damage, paths, broken_roots, capsys):
    config = teacher_config(paths)
    config["data"]["root"] = str(broken_roots[damage])
    line = refused(["train-teacher", "--config", write_config(paths.tmp, config, f"{damage}.yaml")],
                   ["data.train_split"], capsys, paths.runs)
    assert "index.json" in line or "nope-000000.tar" in line, line


@pytest.mark.parametrize("overrides, words", [
    ("teacher.export={tmp}/no-export", ["teacher.export", "no-export", "does not exist"]),
    ("teacher.export={empty}", ["teacher.export", "config.json"]),
    ("teacher.export={file}", ["teacher.export", "a_file.txt"]),
    ("teacher.export={tmp}/bad-export", ["teacher.export", "bad-export", "JSON"]),
    ("teacher.export={tmp}/no-weights-export", ["teacher.export", "model.safetensors"]),
    ("teacher.source=model teacher.export=null teacher.backbone=resnet5O", ["teacher.backbone", "resnet5O"]),
    ("teacher.source=model teacher.export=null teacher.backbone=rct_cnn4 teacher.pretrained_file={tmp}/t.pth",
     ["teacher.pretrained_file", "t.pth"]),
    ("teacher.source=shards teacher.export=null", ["teacher.source", "shards", "teacher embeddings",
                                                   "embed --into-shards"]),
])
def test_transfer_preflight(overrides, words, paths, tmp_path, capsys):
    (paths.tmp / "bad-export").mkdir(exist_ok=True)
    (paths.tmp / "bad-export" / "config.json").write_text("{ not json")
    (paths.tmp / "no-weights-export").mkdir(exist_ok=True)
    (paths.tmp / "no-weights-export" / "config.json").write_text((paths.export / "config.json").read_text())
    argv = ["transfer", "--config", write_config(tmp_path, transfer_config(paths)), *paths.fill(overrides).split(" ")]
    refused(argv, [paths.fill(w) for w in words], capsys, paths.runs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="data.decode gpu is valid where CUDA is")
def test_gpu_decode_without_cuda(paths, tmp_path, capsys):
    refused(["train-teacher", "--config", write_config(tmp_path, teacher_config(paths)), "data.decode=gpu"],
            ["data.decode", "CUDA"], capsys, paths.runs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="loss.rc.kernel triton is valid where CUDA is")
def test_triton_kernel_without_cuda(paths, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    refused(["transfer", "--config", write_config(tmp_path, transfer_config(paths)), "loss.rc.kernel=triton"],
            ["loss.rc.kernel", "triton"], capsys, paths.runs)


def test_world_size_counts_in_the_batch_check(paths, tmp_path, capsys, monkeypatch):
    """Launched as 16 ranks, 16 x 20 images per step are more than samples_per_epoch=200."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    refused(["train-teacher", "--config", write_config(tmp_path, teacher_config(paths))],
            ["data.batch_size=20", "16 rank(s)", "data.samples_per_epoch=200"], capsys, paths.runs)


# ----------------------------------------------------------------------------------------------------------
# Command-line arguments of every subcommand.

CLI = [
    # parser level
    ("", ["required", "command"]),
    ("trian", ["invalid choice: 'trian'"]),
    ("--bogus", ["required", "command"]),  # argparse checks the subcommand first
    ("configs --bogus", ["--bogus"]),
    ("--local_rank=abc configs", ["--local_rank", "'abc'"]),
    ("world --bogus", ["--bogus"]),
    # train-teacher / transfer
    ("transfer", ["--config"]),
    ("train-teacher --conifg {cfg}", ["--config"]),
    ("train-teacher --config {cfg} --bogus", ["--bogus"]),
    ("train-teacher --config {cfg} --config", ["--config", "expected one argument"]),
    # make-shards
    ("make-shards --out {tmp}/shards", ["--source"]),
    ("make-shards --source digits", ["--out"]),
    ("make-shards --source nope --out {tmp}/shards", ["--source", "'nope'"]),
    ("make-shards --source digits --out {tmp}/shards --shard-size 0", ["--shard-size", "0"]),
    ("make-shards --source digits --out {tmp}/shards --shard-size -5", ["--shard-size", "-5"]),
    ("make-shards --source digits --out {tmp}/shards --shard-size abc", ["--shard-size", "abc"]),
    ("make-shards --source digits --out {tmp}/shards --shard-size 1.5", ["--shard-size", "1.5"]),
    ("make-shards --source digits --out {tmp}/shards --workers 0", ["--workers"]),
    ("make-shards --source digits --out {tmp}/shards --limit-classes -1", ["--limit-classes"]),
    ("make-shards --source digits --out {tmp}/shards --val-classes 0", ["--val-classes"]),
    ("make-shards --source digits --out {tmp}/shards --val-classes 5", ["--val-classes", "5"]),
    ("make-shards --source digits --out {tmp}/shards --val-seed x", ["--val-seed", "'x'"]),
    ("make-shards --source digits --out {tmp}/shards --val-seed 3", ["--val-seed", "--val-classes"]),
    ("make-shards --source digits --out {tmp}/shards --val-classes 1 --val-split a/b", ["--val-split", "a/b"]),
    ("make-shards --source digits --out {tmp}/shards --split-classes thirds", ["--split-classes", "thirds"]),
    ("make-shards --source cub --root {tmp}/no-cub --out {tmp}/shards", ["no-cub"]),
    ("make-shards --source cub --out {tmp}/shards", ["cub", "--root"]),
    ("make-shards --source digits --out {file}", ["--out", "a_file.txt"]),
    # eval
    ("eval", ["--config", "--export", "--data"]),
    ("eval --nmi=3", ["--nmi"]),
    ("eval --raw --export {export}", ["--raw", "--export"]),
    ("eval --raw", ["--raw", "--config", "--data"]),
    ("eval --export {tmp}/no-export --data {digits}/test", ["--export", "no-export"]),
    ("eval --export {empty} --data {digits}/test", ["--export", "config.json"]),
    ("eval --export {export} --data {tmp}/no-split", ["--data", "no-split", "index.json"]),
    ("eval --export {export} --data {digits}/test eval.ks=[1,5000]", ["eval.ks", "Recall@5000"]),
    ("eval --export {export} --data {digits}/test eval.ks=[0]", ["eval.ks"]),
    ("eval --export {export} --data {digits}/test data.bogus=1", ["data.bogus"]),
    ("eval --config {cfg}", ["the run's export", "export"]),
    ("eval --config {cfg} --export {export} data.eval_split=nope", ["data.eval_split", "nope"]),
    ("eval --raw --data {digits}/test model.backbone=nonet", ["model.backbone", "nonet"]),
    ("eval --raw --data {digits}/test model.pretrained_file={tmp}/w.pth", ["model.pretrained_file", "w.pth"]),
    # embed
    ("embed --export {export} --data {digits}/test", ["--out"]),
    ("embed --data {digits}/test --out {tmp}/emb", ["--export"]),
    ("embed --export {tmp}/no-export --data {digits}/test --out {tmp}/emb", ["--export", "no-export"]),
    ("embed --export {export} --data {tmp}/no-split --out {tmp}/emb", ["--data", "no-split"]),
    ("embed --export {export} --data {digits}/test --out {file}", ["--out", "a_file.txt"]),
    ("embed --export {export} --data {digits}/test --out {tmp}/emb --into-shards {digits}/test",
     ["--into-shards", "the split being read"]),
    ("embed --export {export} --data {digits}/test --out {tmp}/emb --into-shards {digits}/train",
     ["--into-shards", "--overwrite"]),
    ("embed --export {export} --data {digits}/test --out {tmp}/emb --into-shards {file}",
     ["--into-shards", "a_file.txt"]),
    ("embed --export {export} --data {digits}/test --out {tmp}/emb eval.batch_size=0", ["eval.batch_size"]),
    # export
    ("export", ["--run"]),
    ("export --run {tmp}/no-run", ["--run", "no-run", "does not exist"]),
    ("export --run {empty}", ["--run", "config.yaml"]),
    ("export --run {run}", ["--checkpoint", "no complete checkpoint"]),
    ("export --run {run} --checkpoint {tmp}/no-step", ["--checkpoint", "no-step"]),
    ("export --run {run} --checkpoint step000999", ["--checkpoint step000999", "checkpoints/step000999"]),
    ("export --run {run} --checkpoint step000005", ["--checkpoint step000005", "COMPLETE"]),
    ("export --run {run} --opset abc", ["--opset", "'abc'"]),
    ("export --run {run} --opset 0", ["--opset", "0"]),
    ("export --run {run} --opset 999", ["--opset", "999"]),
    ("export --run {run} --onnx-exporter tflite", ["--onnx-exporter", "tflite"]),
    ("export --run {badrun}", ["config.yaml", "data.batch_size"]),
    # configs
    ("configs cub/teacher optim.lr=1", ["--resolved", "optim.lr=1"]),
    ("configs --resolved cub/teacher optim.lrr=1", ["optim.lrr", "did you mean 'optim.lr'"]),
    ("configs --resolved cub/teacher optim.lr", ["'optim.lr'", "section.key=value"]),
    # study
    ("study", ["CONFIG"]),
    ("study nosuch-study", ["nosuch-study"]),
    ("study omniglot --dry-run --settings nosuch", ["--settings", "nosuch"]),
    ("study omniglot --dry-run --methods nosuch", ["--methods", "nosuch"]),
    ("study omniglot --dry-run --seeds x", ["--seeds", "'x'"]),
    ("study omniglot --out {file}", ["--out", "a_file.txt"]),
    ("study {file}", ["a_file.txt"]),
    ("study {binary}", ["binary.yaml", "UTF-8"]),
    # demo
    ("demo --epochs 0", ["--epochs", "0"]),
    ("demo --epochs -1", ["--epochs", "-1"]),
    ("demo --epochs abc", ["--epochs", "'abc'"]),
    ("demo --epochs 1.5", ["--epochs", "1.5"]),
    ("demo --teacher-epochs 0", ["--teacher-epochs"]),
    ("demo --classes 1", ["--classes", "1"]),
    ("demo --classes -3", ["--classes"]),
    ("demo --dataset mnist", ["--dataset", "mnist"]),
    ("demo --backbone vgg", ["--backbone", "vgg"]),
    ("demo --data {tmp}/no-omniglot", ["--data", "no-omniglot"]),
    ("demo --out {file}", ["--out", "a_file.txt"]),
]


@pytest.fixture(scope="module")
def cli_files(paths) -> dict[str, str]:
    run = paths.tmp / "a-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(teacher_config(paths)))
    (run / "checkpoints" / "step000005").mkdir(parents=True)  # a checkpoint never marked complete
    bad = paths.tmp / "bad-run"
    bad.mkdir()
    (bad / "config.yaml").write_text(yaml.safe_dump({**teacher_config(paths), "data": {"batch_size": -3}}))
    (paths.tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    cfg = write_config(paths.tmp, teacher_config(paths), "cli.yaml")
    return {"run": str(run), "badrun": str(bad), "binary": str(paths.tmp / "binary.yaml"), "cfg": str(cfg)}


@pytest.mark.parametrize("argv, words", CLI, ids=[a or "(nothing)" for a, _ in CLI])
def test_bad_command_lines(argv, words, paths, cli_files, capsys):
    def fill(text: str) -> str:
        return paths.fill(text.replace("{run}", cli_files["run"]).replace("{badrun}", cli_files["badrun"])
                          .replace("{binary}", cli_files["binary"]).replace("{cfg}", cli_files["cfg"]))

    refused(fill(argv).split(), [fill(w) for w in words], capsys, paths.runs)
    assert not (paths.tmp / "shards").exists() and not (paths.tmp / "emb").exists()


def test_local_rank_disagreeing_with_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    refused(["--local_rank=1", "configs"], ["--local_rank=1", "LOCAL_RANK=0"], capsys)


# ----------------------------------------------------------------------------------------------------------
# Seeded random garbage: garbled overrides and garbled YAML files load or are refused by the rule.

_ALPHABET = string.ascii_lowercase[:8] + "._=[]{}:,-0123456789 '\"$#!*&|>\\"
_KEYS = [f"{s}.{k}" for s, k, _ in LEAVES] + ["job"]


def _garbled_override(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # random characters
        return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 14)))
    key = rng.choice(_KEYS)
    if kind == 1:  # a real key, a random value
        return f"{key}=" + "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 10)))
    if kind == 2:  # a real key, a typed value of another kind
        value = rng.choice(["-1", "0", "1e999", ".nan", "[1, 2]", "{a: 1}", "null", "true", "x", "[]", "''",
                            str(2**64), "-2.5", "[[1]]", "~", "!!binary aGk="])
        return f"{key}={value}"
    return _edits(f"{key}=1", rng)  # a misspelt key


def _dotted(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def resolved_or_refusal(argv: list[str], shown: str, capsys) -> tuple[str, str | None]:
    """Run the CLI: (stdout, None) on success, else ("", the error line) after asserting the rule."""
    capsys.readouterr()
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        shown = f"{shown}\nstderr:\n{err}"
        assert "Traceback" not in err and exit_.code == 2 and len(lines) == 1, shown
        assert lines[0].startswith("rct-dist"), shown
        return "", lines[0]
    return capsys.readouterr().out, None


def overrides_applied_or_refused(config: str, overrides: list[str], capsys) -> str:
    """The rule for random overrides, with the outcome each should get: refused in one line that names
    an override (its key, or the override itself when it has no key); or accepted, and then every
    override's value is the resolved config's value for its key (the last one of a key wins)."""
    argv = ["configs", "--resolved", config, *overrides]
    out, line = resolved_or_refusal(argv, f"argv={argv}", capsys)
    if line is not None:
        def names(o: str) -> bool:  # the override, its key or a leading part of it (the unknown one), quoted
            key = o.partition("=")[0].strip()
            parts = key.split(".")
            prefixes = [repr(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
            return any(c and c in line for c in (o, repr(o), key, *prefixes))

        assert any(names(o) for o in overrides), f"the error names none of the overrides\nargv={argv}\n{line}"
        return "refused"
    resolved = yaml.safe_load(out)
    final = dict(o.split("=", 1) for o in overrides)
    for key, value in final.items():
        actual = resolved["job"] if key == "job" else _dotted(resolved, key)
        try:
            expected = yaml.safe_load(value)
        except yaml.YAMLError:  # accepted only by a text key, which keeps the text
            expected = value.strip()
        if isinstance(actual, str) and not isinstance(expected, str):
            expected = value.strip()  # a text key keeps its text, whatever YAML makes of it
        assert actual == expected, f"argv={argv}: {key} resolved to {actual!r}, the override gave {expected!r}"
    return "accepted"


@pytest.mark.parametrize("seed", range(80))
def test_random_overrides(seed, capsys):
    rng = random.Random(seed)
    overrides = [_garbled_override(rng) for _ in range(rng.randint(1, 3))]
    overrides_applied_or_refused("cub/compression", overrides, capsys)


@pytest.mark.parametrize("seed", range(60))
def test_random_yaml_edits(seed, paths, tmp_path, capsys):
    rng = random.Random(10_000 + seed)
    text = yaml.safe_dump(transfer_config(paths), sort_keys=False)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text))
        kind = rng.randrange(3)
        if kind == 0:
            text = text[:i] + text[i + rng.randint(1, 6):]
        elif kind == 1:
            text = text[:i] + rng.choice(_ALPHABET + "\n\t") + text[i:]
        else:  # a line moved elsewhere
            lines = text.splitlines(keepends=True)
            line = lines.pop(rng.randrange(len(lines)))
            lines.insert(rng.randrange(len(lines) + 1), line)
            text = "".join(lines)
    path = write_config(tmp_path, text)
    out, line = resolved_or_refusal(["configs", "--resolved", str(path)], f"file:\n{text}", capsys)
    if line is not None:
        return
    # Accepted: every leaf the edited file sets is the resolved config's value (the file was read as written).
    resolved, given = yaml.safe_load(out), yaml.safe_load(text)
    assert isinstance(given, dict), text

    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in leaves(given):
        actual = _dotted(resolved, key)
        if isinstance(actual, str) and not isinstance(value, str):
            value = str(value)
        assert actual == value or (isinstance(value, list) and actual == list(value)), \
            f"{key}: resolved {actual!r}, the file says {value!r}\n{text}"
