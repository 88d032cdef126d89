"""`rct-dist study CONFIG`: a grid of settings x methods x seeds through the real trainer, resumable, summarised
as results.md (tables and a computed verdict), results.jsonl and results.svg (a bar chart).

A study file (YAML) says what to compare; every run is an ordinary `train(cfg)` of a config built from
overrides, in this order: `base`, the teacher's or the setting's student overrides, the method's overrides
(the registry's, then `methods_overrides`), then `run.seed`, `run.out_dir`, `run.name` and `run.overwrite=true`
set by the study. The keys:

    name: omniglot                 # the study's name (default: the file's name without .yaml)
    out_dir: runs/study-omniglot   # default runs/study-<name>; `--out` replaces it
    config: null                   # a built-in config name or a YAML path (relative to this file) every run starts from
    seeds: [0, 1, 2]               # run.seed of every cell; the teachers use the first
    shards: {source: omniglot, root: embedded, limit_classes: 100, val_classes: 20}
                                   # make-shards arguments (dashes or underscores), written once to OUT/shards; runs
                                   # get data.root=OUT/shards (and data.val_split with val_classes). `root: embedded`
                                   # is the Omniglot copy in the package. Without `shards`, `base` sets data.root.
    base: ["optim.epochs=10"]      # overrides of every run
    teachers: {cnn4: ["model.backbone=rct_cnn4"]}   # each trained once with labels; students learn from its export
    settings:                      # name -> teacher (needed by transfer methods and the teacher reference),
      small: {teacher: cnn4, student: ["model.backbone=rct_cnn3_small"], description: "text"}
    methods: [labels, rc, rkd]     # from METHODS: labels, rc, rkd, pkt, darkrank, regression
    methods_overrides: {rc: ["loss.rc.sigma=0.5"]}
    references: [teacher, raw]     # rows per setting: the teacher's own test metrics; the student backbone's raw
                                   # pooled features (no head, no training)

`config` is relative to the study file (as a run config's `base:` is to its file); `out_dir`, `shards.root`
and paths in overrides are relative to the working directory, as in run configs. A run refuses keys that have
no effect on it (rct_dist/config.py), and `base` reaches every run, teachers included: a loss's options
(`loss.rc.sigma=0.5`) go in `methods_overrides`.

Teacher, setting and method names are letters, digits and `_`, so run names (`<setting>-<method>-s<seed>`,
`teacher-<name>`, `raw-<setting>`) never collide. The study sets job, loss.name, teacher.source/export
and the run.* keys: a list that sets them is refused.

Resuming: each finished run leaves OUT/cells/<run>.json (metrics, wall seconds, the config name, shards
arguments and overrides it was made with, and for students their teacher's). A later call skips a run whose
file records what the run would be made with now, reruns one whose inputs changed (saying what changed),
and restarts unfinished ones from scratch. results.* are rewritten atomically after every run, from every
cell file of the study's whole grid, so a killed or filtered study still leaves its partial table.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from rct_dist.atomic import atomic_write
from rct_dist.config import MOVED, ConfigError, config_keys, load_config, resolve_config_path, resolve_study_path
from rct_dist.svg_plot import Bar, Line, grouped_bars

TRANSFER_METHODS = ("rc", "rkd", "pkt", "darkrank", "regression")
METHODS: dict[str, tuple[str, ...]] = {  # the method's overrides; transfer methods add teacher.export
    "labels": ("job=train-teacher", "loss.name=proxy_anchor"),
    **{name: ("job=transfer", f"loss.name={name}", "teacher.source=export") for name in TRANSFER_METHODS},
}
TEACHER_OVERRIDES = ("job=train-teacher", "loss.name=proxy_anchor")
REFERENCES = ("teacher", "raw")
REFERENCE_LABELS = {"teacher": "teacher (reference)", "raw": "raw backbone features (reference)"}
TOP_KEYS = ("name", "out_dir", "config", "seeds", "shards", "base", "teachers", "settings", "methods",
            "methods_overrides", "references")
SETTING_KEYS = ("teacher", "student", "description")
KS = (1, 2, 4)
COLUMNS = ("R@1", "R@2", "R@4", "MAP@R")
NAME = re.compile(r"[A-Za-z0-9_]+")
# Keys the study sets itself, with why a list may not set them.
RESERVED = {
    "job": "the method sets it",
    "loss.name": "the method sets it",
    "run.name": "the study names runs <setting>-<method>-s<seed>",
    "run.out_dir": "the study puts runs in OUT/runs",
    "run.seed": "the study sets it from `seeds`",
    "run.overwrite": "the study restarts unfinished runs from scratch",
    "run.resume": "the study restarts unfinished runs from scratch",
}
METHOD_KEYS = {"teacher.source": "transfer methods learn from the setting's teacher export",
               "teacher.export": "transfer methods learn from the setting's teacher export"}
SHARD_KEYS_SET = {"out": "the study writes shards to OUT/shards", "overwrite": "the study decides it",
                  "help": "not an argument"}


# ----------------------------------------------------------------------------------------------- the study file

@dataclass(frozen=True)
class Setting:
    name: str
    teacher: str | None
    student: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    out_dir: str
    config: str | None  # as written
    config_path: str | None  # what load_config is given: a file path or a built-in name
    config_sha256: str | None  # of the config file's text: an edited file makes its runs stale
    seeds: tuple[int, ...]
    shards: dict[str, Any] | None  # make-shards arguments by dest name, `root: embedded` resolved
    base: tuple[str, ...]
    teachers: dict[str, tuple[str, ...]]
    settings: dict[str, Setting]
    methods: tuple[str, ...]
    methods_overrides: dict[str, tuple[str, ...]]
    references: tuple[str, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of repeated keys silently; a study names runs by its keys, so a repeat is an error."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _close(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(where: str, what: str, name: Any, valid: Sequence[str]) -> ConfigError:
    return ConfigError(f"{where}: unknown {what} {name!r}{_close(str(name), valid)}; valid: {', '.join(valid)}")


def _check_keys(where: str, mapping: dict, valid: Sequence[str]) -> None:
    for key in mapping:
        if key not in valid:
            raise _unknown(where, "key", key, valid)


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{where}: names are letters, digits and '_' (they make run names), got {value!r}")
    return value


def _str_list(where: str, value: Any) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _override_keys() -> list[str]:
    return config_keys()


def _overrides(where: str, value: Any, method_list: bool = False) -> tuple[str, ...]:
    """A list of `section.key=value` strings, their keys checked against the run config's."""
    valid = _override_keys()
    result = []
    for i, item in enumerate(_str_list(where, value)):
        here = f"{where}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(f"{here}: expected a 'section.key=value' string, got {item!r} (quote it in YAML)")
        dotted, sep, _ = item.partition("=")
        dotted = dotted.strip()
        if not sep:
            raise ConfigError(f"{here}: {item!r} must look like section.key=value")
        if dotted in MOVED:
            raise ConfigError(f"{here}: {dotted} moved to {MOVED[dotted]}")
        if dotted not in valid:
            raise _unknown(here, "config key", dotted, valid)
        why = RESERVED.get(dotted) or (None if method_list else METHOD_KEYS.get(dotted))
        if why:
            raise ConfigError(f"{here}: {dotted} is set by the study ({why})")
        result.append(item.strip())
    return tuple(result)


def _shard_options() -> dict[str, str]:
    """make-shards' options (the fields of rct_dist.data.shards.ShardOptions) -> their annotated type."""
    from dataclasses import fields

    from rct_dist.data.shards import ShardOptions

    return {option.name: str(option.type) for option in fields(ShardOptions)}


def shard_keywords(options: dict[str, Any]) -> dict[str, Any]:
    """The `shards` mapping as `make_shards` keywords, each value read as make-shards' flag would read it
    (a quoted number as an integer, a number as a name)."""
    kinds = _shard_options()
    keywords = {}
    for key, value in options.items():
        if "int" in kinds[key] and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"shards.{key}: expected an integer, got {value!r}") from None
        elif ("str" in kinds[key] or "Path" in kinds[key]) and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            value = str(value)
        keywords[key] = value
    return keywords


def _shards(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"shards: expected a mapping of make-shards arguments (source, root, ...), got {value!r}")
    actions = _shard_options()
    valid = [dest for dest in actions if dest not in SHARD_KEYS_SET]
    options = {}
    for key, item in value.items():
        dest = str(key).replace("-", "_")
        if dest in SHARD_KEYS_SET:
            raise ConfigError(f"shards.{key}: set by the study ({SHARD_KEYS_SET[dest]})")
        if dest not in actions:
            raise _unknown("shards", "make-shards argument", key, valid)
        if isinstance(item, (dict, list)) or item is None:
            raise ConfigError(f"shards.{key}: expected one value, got {item!r}")
        if isinstance(item, bool) and actions[dest] != "bool":
            raise ConfigError(f"shards.{key}: expected a value, got {item!r}")
        if dest == "root" and item == "embedded":
            from rct_dist.demo import EMBEDDED

            item = str(EMBEDDED)
        options[dest] = item
    if "source" not in options:
        raise ConfigError("shards: `source` is required (a make-shards source: digits, omniglot, cub, ...)")
    # Types, choices and their combination as make-shards checks them.
    from rct_dist.data.shards import ShardOptions

    try:
        ShardOptions(out=Path("shards"), overwrite=True, **shard_keywords(options))
    except ValueError as error:
        raise ConfigError(f"shards: {error}") from None
    return options


def _val_split(shards: dict[str, Any] | None) -> str | None:
    if not shards or shards.get("val_classes") is None:
        return None
    from rct_dist.data import shards as shards_module

    return str(shards.get("val_split") or getattr(shards_module, "VAL_SPLIT", "val"))


def _config(value: Any, folder: Path) -> tuple[str | None, str | None, str | None]:
    if value is None:
        return None, None, None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config: expected a built-in config name or a YAML path, got {value!r}")
    local = folder / value
    target = str(local) if local.is_file() else value
    try:
        path = resolve_config_path(target)
    except ConfigError as error:
        raise ConfigError(f"config: {error}") from None
    return value, target, hashlib.sha256(path.read_bytes()).hexdigest()


def load_study(path: str | Path) -> Study:
    """The validated study file: every key, name and override checked, one-line errors naming the key."""
    path = resolve_study_path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise ConfigError(f"cannot read study {path}: {error.strerror}") from None
    except ConfigError as error:
        raise ConfigError(f"study {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"study {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study {path} must hold a mapping of keys ({', '.join(TOP_KEYS)})")
    try:
        return _study(raw, path)
    except ConfigError as error:
        raise ConfigError(f"study {path}: {error}") from None


def _study(raw: dict, path: Path) -> Study:
    _check_keys("study", raw, TOP_KEYS)
    for key in ("seeds", "settings", "methods"):
        if key not in raw:
            raise ConfigError(f"{key}: required")
    name = raw.get("name", path.name.removesuffix(".yaml").removesuffix(".yml"))
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name: expected a non-empty string, got {name!r}")
    out_dir = raw.get("out_dir") or f"runs/study-{name}"
    if not isinstance(out_dir, str):
        raise ConfigError(f"out_dir: expected a path, got {out_dir!r}")
    config, config_path, config_sha = _config(raw.get("config"), path.parent)

    seeds = _str_list("seeds", raw["seeds"])
    if not seeds:
        raise ConfigError("seeds: empty; give at least one seed, e.g. seeds: [0]")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seeds: expected integers >= 0, got {seed!r}")
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"seeds: {sorted(s for s in set(seeds) if seeds.count(s) > 1)} repeated")

    shards = _shards(raw.get("shards"))
    base = _overrides("base", raw.get("base"))
    roots = [item for item in base if item.partition("=")[0].strip() == "data.root"]
    if shards is not None and roots:
        raise ConfigError(f"base: {roots[0]!r} and `shards` both say where the data is; keep one")

    teachers_raw = raw.get("teachers") or {}
    if not isinstance(teachers_raw, dict):
        raise ConfigError(f"teachers: expected a mapping name -> overrides, got {teachers_raw!r}")
    teachers = {_name("teachers", key): _overrides(f"teachers.{key}", value) for key, value in teachers_raw.items()}

    methods = _str_list("methods", raw["methods"])
    if not methods:
        raise ConfigError(f"methods: empty; choose from {', '.join(METHODS)}")
    for method in methods:
        if method not in METHODS:
            raise _unknown("methods", "method", method, list(METHODS))
    if len(set(methods)) < len(methods):
        raise ConfigError(f"methods: {sorted(m for m in set(methods) if methods.count(m) > 1)} repeated")

    references = _str_list("references", raw.get("references"))
    for reference in references:
        if reference not in REFERENCES:
            raise _unknown("references", "reference", reference, REFERENCES)
    if len(set(references)) < len(references):
        raise ConfigError("references: repeated")

    settings_raw = raw["settings"]
    if not isinstance(settings_raw, dict) or not settings_raw:
        raise ConfigError(f"settings: expected a non-empty mapping name -> {{teacher, student, description}}, "
                          f"got {settings_raw!r}")
    needs_teacher = [m for m in methods if m in TRANSFER_METHODS] + (["the teacher reference"]
                                                                       if "teacher" in references else [])
    settings = {}
    for key, value in settings_raw.items():
        key = _name("settings", key)
        where = f"settings.{key}"
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(SETTING_KEYS)}, got {value!r}")
        _check_keys(where, value, SETTING_KEYS)
        teacher = value.get("teacher")
        if teacher is None and needs_teacher:
            raise ConfigError(f"{where}.teacher: required by {', '.join(needs_teacher)}")
        if teacher is not None and teacher not in teachers:
            raise _unknown(f"{where}.teacher", "teacher", teacher, list(teachers) or ["(no teachers defined)"])
        description = value.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"{where}.description: expected text, got {description!r}")
        settings[key] = Setting(key, teacher, _overrides(f"{where}.student", value.get("student")),
                                " ".join(description.split()))
    unused = [t for t in teachers if all(s.teacher != t for s in settings.values())]
    if unused:
        raise ConfigError(f"teachers.{unused[0]}: no setting names it (remove it, or name it in a setting)")
    if shards is None and not any(item.partition("=")[0].strip() == "data.root" for item in base):
        raise ConfigError("base: without `shards`, base must set data.root (a shards folder)")

    overrides_raw = raw.get("methods_overrides") or {}
    if not isinstance(overrides_raw, dict):
        raise ConfigError(f"methods_overrides: expected a mapping method -> overrides, got {overrides_raw!r}")
    methods_overrides = {}
    for method, value in overrides_raw.items():
        if method not in METHODS:
            raise _unknown("methods_overrides", "method", method, list(METHODS))
        if method not in methods:
            raise ConfigError(f"methods_overrides.{method}: {method!r} is not in methods ({', '.join(methods)})")
        methods_overrides[method] = _overrides(f"methods_overrides.{method}", value, method_list=True)
    return Study(path=path, name=name.strip(), out_dir=out_dir, config=config, config_path=config_path,
                 config_sha256=config_sha, seeds=tuple(seeds), shards=shards, base=base, teachers=teachers,
                 settings=settings, methods=tuple(methods), methods_overrides=methods_overrides,
                 references=tuple(references))


# -------------------------------------------------------------------------------------------------------- plan

@dataclass
class Run:
    """One trainer run (a teacher or a cell-seed) or one raw-features evaluation."""
    name: str
    kind: str  # "teacher" | "method" | "raw"
    setting: str | None
    method: str | None  # the method; for a teacher run, the teacher's name
    seed: int
    overrides: list[str]
    spec: dict  # what a recorded result must have been made with to count
    status: str = "to run"  # "to run" | "done" | "changed"
    why: str = ""


def teacher_run_name(teacher: str) -> str:
    return f"teacher-{teacher}"


def cell_run_name(setting: str, method: str, seed: int) -> str:
    return f"{setting}-{method}-s{seed}"


def raw_run_name(setting: str) -> str:
    return f"raw-{setting}"


def plan(study: Study, out_dir: str | Path) -> dict[str, Run]:
    """Every run of the study's whole grid, in running order (teachers, raw references, then seed by seed),
    each config loaded once here so a bad value fails before anything trains."""
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    data = [f"data.root={out_dir / 'shards'}"] if study.shards is not None else []
    val_split = _val_split(study.shards)
    if val_split:
        data.append(f"data.val_split={val_split}")
    # What the runs' results depend on (make-shards' writer count does not change the shards).
    shards = None if study.shards is None else {k: v for k, v in study.shards.items() if k != "workers"}
    shared = {"config": study.config, "config_sha256": study.config_sha256, "shards": shards}

    def run_keys(name: str, seed: int) -> list[str]:
        return [f"run.seed={seed}", f"run.out_dir={runs_dir}", f"run.name={name}", "run.overwrite=true"]

    runs: dict[str, Run] = {}
    first = study.seeds[0]
    for teacher, overrides in study.teachers.items():
        name = teacher_run_name(teacher)
        keys = [*data, *study.base, *overrides, *TEACHER_OVERRIDES, *run_keys(name, first)]
        runs[name] = Run(name, "teacher", None, teacher, first, keys, {**shared, "overrides": keys})
    if "raw" in study.references:
        for setting in study.settings.values():
            name = raw_run_name(setting.name)
            keys = [*data, *study.base, *setting.student, *METHODS["labels"], *run_keys(name, first)]
            runs[name] = Run(name, "raw", setting.name, "raw", first, keys, {**shared, "overrides": keys})
    for seed in study.seeds:
        for setting in study.settings.values():
            for method in study.methods:
                name = cell_run_name(setting.name, method, seed)
                method_keys = list(METHODS[method])
                teacher_spec = None
                if method in TRANSFER_METHODS:
                    teacher = runs[teacher_run_name(setting.teacher)]
                    method_keys.append(f"teacher.export={runs_dir / teacher.name / 'export'}")
                    teacher_spec = teacher.spec
                keys = [*data, *study.base, *setting.student, *method_keys,
                        *study.methods_overrides.get(method, ()), *run_keys(name, seed)]
                runs[name] = Run(name, "method", setting.name, method, seed, keys,
                                 {**shared, "overrides": keys, "teacher": teacher_spec})
    for run in runs.values():
        try:
            cfg = load_config(study.config_path, run.overrides)
        except ConfigError as error:
            raise ConfigError(f"run {run.name}: {error}") from None
        if not cfg.data.root:
            raise ConfigError(f"run {run.name}: data.root is empty; set it in `base` or give `shards`")
    return runs


def _pick(kind: str, given: Sequence[str] | None, valid: Sequence[str]) -> list[str]:
    if given is None:
        return list(valid)
    unknown = [g for g in given if g not in valid]
    if unknown:
        raise ConfigError(f"--{kind}: unknown {unknown[0]!r}{_close(unknown[0], valid)}; valid: {', '.join(valid)}")
    return [v for v in valid if v in given]


def select(study: Study, runs: dict[str, Run], settings: Sequence[str] | None = None,
           methods: Sequence[str] | None = None, seeds: Sequence[int | str] | None = None) -> list[Run]:
    """The runs the filters keep, in running order: teachers and raw references of the kept settings,
    and their cells of the kept methods and seeds. Unknown names are errors listing the valid ones."""
    kept_settings = _pick("settings", settings, list(study.settings))
    kept_methods = _pick("methods", methods, list(study.methods))
    kept_seeds = [int(s) for s in _pick("seeds", None if seeds is None else [str(s) for s in seeds],
                                        [str(s) for s in study.seeds])]
    teachers = {study.settings[s].teacher for s in kept_settings}
    chosen = []
    for run in runs.values():
        if run.kind == "teacher":
            keep = run.method in teachers
        elif run.kind == "raw":
            keep = run.setting in kept_settings
        else:
            keep = run.setting in kept_settings and run.method in kept_methods and run.seed in kept_seeds
        if keep:
            chosen.append(run)
    return chosen


def cell_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "cells" / f"{name}.json"


def read_cell(out_dir: Path, name: str) -> dict | None:
    try:
        return json.loads(cell_path(out_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _changes(old: dict, new: dict) -> str:
    """What differs between a recorded spec and the current one, in a few words."""
    parts = []
    if old.get("config") != new.get("config") or old.get("config_sha256") != new.get("config_sha256"):
        parts.append("config changed")
    if old.get("shards") != new.get("shards"):
        parts.append("shards changed")
    before, now = old.get("overrides") or [], new.get("overrides") or []
    if before != now:
        removed = [o for o in before if o not in now]
        added = [o for o in now if o not in before]
        parts.append("overrides " + " ".join([*(f"-{o}" for o in removed), *(f"+{o}" for o in added)] or
                                             ["reordered"]))
    if old.get("teacher") != new.get("teacher"):
        parts.append("its teacher changed")
    return ", ".join(parts) or "record differs"


def mark_status(runs: dict[str, Run], chosen: Sequence[Run], out_dir: Path) -> None:
    """Each run's status from its cell file; a teacher whose export is gone is to run when a chosen student
    that still has to run needs it."""
    for run in runs.values():
        cell = read_cell(out_dir, run.name)
        if cell is None:
            run.status, run.why = "to run", ""
        elif cell.get("spec") == run.spec:
            run.status, run.why = "done", ""
        else:
            run.status, run.why = "changed", _changes(cell.get("spec") or {}, run.spec)
    pending_teachers = {json.dumps(run.spec["teacher"], sort_keys=True) for run in chosen
                        if run.kind == "method" and run.status != "done" and run.spec.get("teacher")}
    for run in chosen:
        if run.kind == "teacher" and run.status == "done" and json.dumps(run.spec, sort_keys=True) in pending_teachers:
            if not (out_dir / "runs" / run.name / "export").is_dir():
                run.status, run.why = "to run", "its export is gone and students need it"


# ----------------------------------------------------------------------------------------------------- results

def _plain(metrics: Any) -> dict | None:
    """Recall@K and MAP@R (and other plain numbers) of a metrics dict, as JSON-safe values."""
    if not isinstance(metrics, dict):
        return None
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "recall" and isinstance(value, dict):
            out["recall"] = {str(k): float(v) for k, v in value.items()}
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out


def _percent(metrics: dict | None) -> dict[str, float | None]:
    """R@1, R@2, R@4, MAP@R in percent (None where the run did not compute one)."""
    metrics = metrics or {}
    recall = metrics.get("recall") or {}
    values = {f"R@{k}": 100 * recall[str(k)] if str(k) in recall else None for k in KS}
    mapr = metrics.get("map_at_r")
    values["MAP@R"] = 100 * mapr if isinstance(mapr, (int, float)) else None
    return values


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Row:
    setting: str
    method: str  # a method, or "teacher" / "raw" for reference rows
    reference: bool
    status: str  # "done", "partial", "not run", "not available"
    per_seed: list[dict] = field(default_factory=list)

    def stats(self) -> tuple[dict, dict, float | None]:
        means, stds = {}, {}
        for column in COLUMNS:
            values = [v[column] for v in self.per_seed if v.get(column) is not None]
            means[column], stds[column] = mean_std(values)
        walls = [v["wall_s"] for v in self.per_seed if v.get("wall_s") is not None]
        return means, stds, mean_std(walls)[0]

    def record(self) -> dict:
        means, stds, wall = self.stats()
        return {"setting": self.setting, "method": self.method, "reference": self.reference, "status": self.status,
                "n": len(self.per_seed), "seeds": [v["seed"] for v in self.per_seed], "mean": means, "std": stds,
                "wall_s": wall, "per_seed": self.per_seed}


def _seed_values(cell: dict) -> dict:
    values: dict[str, Any] = {"seed": cell.get("seed"), **_percent(cell.get("metrics")), "wall_s": cell.get("wall_s")}
    for key in ("val", "final"):
        if cell.get(key) is not None:
            values[key] = _percent(cell[key])
    if cell.get("selected_epoch") is not None:
        values["selected_epoch"] = cell["selected_epoch"]
    return values


def raw_available() -> bool:
    from rct_dist import jobs

    return callable(getattr(jobs, "run_eval_raw", None))


def collect(study: Study, runs: dict[str, Run], out_dir: Path, raw_ok: bool = True) -> list[Row]:
    """The table rows of the whole grid from the cell files whose records match the current runs."""
    def done(name: str) -> dict | None:
        cell = read_cell(out_dir, name)
        return cell if cell is not None and cell.get("spec") == runs[name].spec else None

    rows = []
    for setting in study.settings.values():
        for method in study.methods:
            cells = [c for c in (done(cell_run_name(setting.name, method, s)) for s in study.seeds) if c]
            status = "done" if len(cells) == len(study.seeds) else "partial" if cells else "not run"
            rows.append(Row(setting.name, method, False, status, [_seed_values(c) for c in cells]))
        for reference in study.references:
            name = teacher_run_name(setting.teacher) if reference == "teacher" else raw_run_name(setting.name)
            cell = done(name)
            status = "done" if cell else "not run" if reference == "teacher" or raw_ok else "not available"
            rows.append(Row(setting.name, reference, True, status, [_seed_values(cell)] if cell else []))
    return rows


def _cell_text(mean: float | None, std: float | None, n: int = 2) -> str:
    """`mean ± std`; one run has no spread to show: its value alone."""
    return "–" if mean is None else f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def verdict(rows: Sequence[Row]) -> str:
    """Whether RC's mean R@1 is above every other method's (labels and the other transfer losses) in one
    setting, with the margins, from the means rounded as the table prints them."""
    methods = {row.method: row for row in rows if not row.reference}
    if "rc" not in methods:
        return "Verdict: none (rc is not among the methods)."
    if not methods["rc"].per_seed:
        return "Verdict: not yet (rc has no finished run)."
    means = {m: row.stats()[0]["R@1"] for m, row in methods.items()}
    stds = {m: row.stats()[1]["R@1"] for m, row in methods.items()}
    others = [m for m in methods if m != "rc" and means[m] is not None]
    missing = [m for m in methods if m != "rc" and means[m] is None]
    if not others:
        return "Verdict: not yet (no other method has a finished run)."
    rc = round(means["rc"], 1)
    margins = {m: round(rc - round(means[m], 1), 1) + 0.0 for m in others}  # + 0.0: no "-0.0"
    above = all(margin > 0 for margin in margins.values())
    text = (f"Verdict: RC's mean R@1 ({rc:.1f}) is {'above' if above else 'not above'} every other method: "
            + ", ".join(f"{m} {round(means[m], 1):.1f} ({margins[m]:+.1f})" for m in others))
    noise = [m for m in others if abs(margins[m]) <= max(stds["rc"] or 0.0, stds[m] or 0.0)]
    if noise:
        text += f"; margin within one std: {', '.join(noise)}"
    n = {m: len(methods[m].per_seed) for m in ["rc", *others]}
    if len(set(n.values())) > 1:
        text += "; seeds: " + ", ".join(f"{m} {k}" for m, k in n.items())
    if missing:
        text += f"; not run yet: {', '.join(missing)}"
    return text + "."


def format_markdown(study: Study, rows: Sequence[Row]) -> str:
    done = sum(len(row.per_seed) for row in rows if not row.reference)
    total = len(study.settings) * len(study.methods) * len(study.seeds)
    lines = [f"# Study {study.name}", "",
             f"Seeds {', '.join(map(str, study.seeds))}; {done} of {total} method runs done. Test-split R@1, R@2, "
             "R@4 and MAP@R in percent, mean ± sample std over the seeds done (n), of the model each run "
             "selected (eval.select); one run shows its value alone; wall: mean seconds per run. "
             "Plot: results.svg.", ""]
    for setting in study.settings.values():
        lines.append(f"## {setting.name}")
        lines.append("")
        if setting.description:
            lines += [setting.description, ""]
        if setting.teacher:
            lines += [f"Teacher: {setting.teacher} ({teacher_run_name(setting.teacher)}).", ""]
        lines.append("| method | n | " + " | ".join(COLUMNS) + " | wall s |")
        lines.append("|---|---:|" + "---:|" * len(COLUMNS) + "---:|")
        mine = [row for row in rows if row.setting == setting.name]
        for row in mine:
            label = f"*{REFERENCE_LABELS[row.method]}*" if row.reference else row.method
            if row.status == "not available":
                lines.append(f"| {label} | – | not available (no raw-feature evaluation in this version) |"
                             + " |" * len(COLUMNS))
                continue
            means, stds, wall = row.stats()
            cells = [_cell_text(means[c], stds[c], len(row.per_seed)) for c in COLUMNS]
            lines.append(f"| {label} | {len(row.per_seed)} | " + " | ".join(cells) +
                         f" | {'–' if wall is None else f'{wall:.0f}'} |")
        lines += ["", verdict(mine), ""]
    return "\n".join(lines)


def format_svg(study: Study, rows: Sequence[Row]) -> str:
    groups = []
    for setting in study.settings.values():
        bars, lines = [], []
        for row in rows:
            if row.setting != setting.name:
                continue
            means, stds, _ = row.stats()
            tip = (f"{setting.name} {row.method}: R@1 {_cell_text(means['R@1'], stds['R@1'], len(row.per_seed))} "
                   f"(n={len(row.per_seed)})"
                   if means["R@1"] is not None else "")
            if row.reference:
                if means["R@1"] is not None:
                    lines.append(Line(REFERENCE_LABELS[row.method], means["R@1"], tip))
            else:
                bars.append(Bar(row.method, means["R@1"], stds["R@1"] or 0.0, tip))
        groups.append((setting.name, bars, lines))
    return grouped_bars(groups, list(study.methods), [REFERENCE_LABELS[r] for r in study.references],
                        title=f"Study {study.name}: mean test R@1 ± std over seeds", x_label="setting",
                        y_label="R@1 (%)")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def write_results(study: Study, runs: dict[str, Run], out_dir: Path, raw_ok: bool = True) -> list[Row]:
    """results.jsonl, results.md and results.svg from the cell files, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(study, runs, out_dir, raw_ok)
    _write_text(out_dir / "results.jsonl", "".join(json.dumps(row.record()) + "\n" for row in rows))
    _write_text(out_dir / "results.md", format_markdown(study, rows))
    _write_text(out_dir / "results.svg", format_svg(study, rows))
    return rows


# ----------------------------------------------------------------------------------------------------- running

def _make_shards(study: Study, out_dir: Path, say: Callable[[str], None]) -> None:
    from rct_dist.data import shards

    summary = shards.make_shards(out=out_dir / "shards", overwrite=True, **shard_keywords(study.shards))
    for split, info in summary.get("splits", {}).items():
        state = info.get("status", "") if isinstance(info, dict) else ""
        say(f"shards {split}: {state or 'ready'}")


def _execute(study: Study, run: Run, out_dir: Path, rank: int) -> dict | None:
    """Train (or evaluate, for raw) one run; rank 0 writes its cell file. None: not available."""
    cfg = load_config(study.config_path, run.overrides)
    start = time.perf_counter()
    if run.kind == "raw":
        from rct_dist import jobs

        evaluate = getattr(jobs, "run_eval_raw", None)
        if evaluate is None:
            return None
        metrics = evaluate(cfg)
    else:
        from rct_dist.train.loop import train

        metrics = train(cfg)
    wall = time.perf_counter() - start
    if rank != 0:
        return {}
    metrics = metrics or {}
    cell = {"run": run.name, "kind": run.kind, "setting": run.setting, "method": run.method, "seed": run.seed,
            "metrics": _plain({k: metrics.get(k) for k in ("recall", "map_at_r")}),
            "val": _plain(metrics.get("val")), "final": _plain(metrics.get("final")),
            "selected_epoch": metrics.get("selected_epoch"), "wall_s": wall,
            "run_dir": None if run.kind == "raw" else str(Path(cfg.run.out_dir) / cfg.run.name), "spec": run.spec}
    path = cell_path(out_dir, run.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(cell, indent=1) + "\n")
    return cell


def _describe(study: Study, out_dir: Path, chosen: Sequence[Run]) -> str:
    cells = sum(run.kind == "method" for run in chosen)
    teachers = sum(run.kind == "teacher" for run in chosen)
    return (f"study {study.name}: {teachers} teacher(s), {cells} cell run(s) of {len(study.settings)} setting(s) x "
            f"{len(study.methods)} method(s) x {len(study.seeds)} seed(s)"
            + (f", references {', '.join(study.references)}" if study.references else "") + f" -> {out_dir}")


def run_study(path: str | Path, out: str | Path | None = None, settings: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, seeds: Sequence[int | str] | None = None,
              dry_run: bool = False, say: Callable[[str], None] = print) -> dict:
    """Run (or with dry_run, list) the study's runs that are not done; returns {"trained": [...],
    "skipped": [...], "unavailable": [...], "out": OUT}. Every rank of a launched job calls it."""
    study = load_study(path)
    out_dir = Path(out if out is not None else study.out_dir)
    runs = plan(study, out_dir)
    chosen = select(study, runs, settings, methods, seeds)
    mark_status(runs, chosen, out_dir)
    raw_ok = raw_available() if "raw" in study.references else True
    say(_describe(study, out_dir, chosen))
    todo = [run for run in chosen if run.status != "done"]
    skipped = [run.name for run in chosen if run.status == "done"]
    if dry_run:
        unavailable = [run.name for run in todo if run.kind == "raw" and not raw_ok]
        for run in chosen:
            state = "n/a" if run.name in unavailable else run.status
            say(f"  {state:<8} {run.name}" + (f" ({run.why})" if run.why else ""))
        say(f"dry run: {len(todo) - len(unavailable)} to run, {len(skipped)} done"
            + (f", {len(unavailable)} not available" if unavailable else "") + "; nothing trained")
        return {"trained": [], "skipped": skipped, "unavailable": [], "todo": [r.name for r in todo],
                "out": str(out_dir)}

    import torch.distributed as dist

    from rct_dist.distributed import world_rank
    from rct_dist.train.engine import init_distributed

    init_distributed()
    rank = world_rank()
    if dist.is_initialized():
        dist.barrier()  # every rank has read the cell files before any is written
    if rank == 0:
        for name in skipped:
            say(f"skip {name}: done")
        if todo and study.shards is not None:
            _make_shards(study, out_dir, say)
        write_results(study, runs, out_dir, raw_ok)
    if dist.is_initialized():
        dist.barrier()
    trained, unavailable = [], []
    for i, run in enumerate(todo, 1):
        if run.kind == "raw" and not raw_ok:
            say(f"[{i}/{len(todo)}] {run.name}: not available (no raw-feature evaluation in this version)")
            unavailable.append(run.name)
            continue
        say(f"[{i}/{len(todo)}] {'evaluating' if run.kind == 'raw' else 'training'} {run.name}"
            + (f" ({run.why})" if run.why else ""))
        cell = _execute(study, run, out_dir, rank)
        trained.append(run.name)
        if rank == 0:
            r1 = (cell or {}).get("metrics", {}).get("recall", {}).get("1")
            say(f"  {run.name}: R@1 {100 * r1:.1f}, {cell['wall_s']:.0f} s" if r1 is not None else f"  {run.name} done")
            write_results(study, runs, out_dir, raw_ok)
    if rank == 0:
        write_results(study, runs, out_dir, raw_ok)
        say(f"study {study.name}: trained {len(trained)}, skipped {len(skipped)} (done)"
            + (f", not available {len(unavailable)}" if unavailable else "") + f"; results in {out_dir}/results.md")
    return {"trained": trained, "skipped": skipped, "unavailable": unavailable, "out": str(out_dir)}


# --------------------------------------------------------------------------------------------------------- CLI

def _names(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rct-dist study`."""
    parser.add_argument("config", metavar="CONFIG",
                        help="study YAML: settings x methods x seeds (its keys: rct_dist/study.py)")
    parser.add_argument("--out", help="output folder (default: the study's out_dir)")
    parser.add_argument("--settings", help="comma-separated settings to run (default: all)")
    parser.add_argument("--methods", help="comma-separated methods to run (default: all)")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the planned runs and which are done; train nothing")


def main_study(args: argparse.Namespace) -> dict:
    """`rct-dist study`: errors in the study file raise ConfigError (one line)."""
    from rct_dist.distributed import world_rank
    from rct_dist.distributed.shutdown import finish

    result = run_study(args.config, out=args.out, settings=_names(args.settings), methods=_names(args.methods),
                       seeds=_names(args.seeds), dry_run=args.dry_run,
                       say=lambda text: print(text, flush=True) if world_rank() == 0 else None)
    if not args.dry_run:
        finish()
    return result
