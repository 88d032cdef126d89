"""`rct-dist study`: a tiny grid (digits shards, small CNNs, one epoch) through the real trainer, its outputs
recomputed from the per-run results, resuming (nothing retrained, then only what changed or did not finish), the
dry run and CLI filters, and the study file's one-line errors."""

from __future__ import annotations

import argparse
import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from rct_dist.config import ConfigError
from rct_dist.study import (
    Row,
    add_study_arguments,
    load_study,
    main_study,
    plan,
    raw_available,
    run_study,
    select,
    verdict,
)

SVG = "{http://www.w3.org/2000/svg}"
COLUMNS = ("R@1", "R@2", "R@4", "MAP@R")
BASE = ["data.image_size=28", "data.pk=[5,6]", "data.batch_size=30", "data.views=2", "optim.epochs=1",
        "data.workers=0", "deepspeed.config=zero2_fp32", "log.tensorboard=false", "log.retrieval_images=0",
        "eval.every_epochs=1", "eval.batch_size=512"]


def study_dict(**changes) -> dict:
    study = {
        "name": "tiny",
        "seeds": [0, 1],
        "shards": {"source": "digits", "shard_size": 100, "workers": 1},
        "base": BASE,
        "teachers": {"cnn4": ["model.backbone=rct_cnn4", "model.embedding_size=64"]},
        "settings": {
            "small": {"teacher": "cnn4", "student": ["model.backbone=rct_cnn3_small", "model.embedding_size=32"],
                      "description": "4-block teacher to a 3-block student"},
            "narrow": {"teacher": "cnn4", "student": ["model.backbone=rct_cnn3_small", "model.embedding_size=8"]},
        },
        "methods": ["labels", "rc"],
        "references": ["teacher", "raw"],
    }
    study.update(changes)
    return study


def write_study(folder: Path, study: dict) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**study, "out_dir": str(folder / "out")}, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """The study run once for setting `small` only (teacher, raw reference, 2 methods x 2 seeds)."""
    folder = tmp_path_factory.mktemp("study")
    path = write_study(folder, study_dict())
    said: list[str] = []
    result = run_study(path, settings=["small"], say=said.append)
    return path, folder / "out", result, said


def run_mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/config.yaml")}


def test_first_run_writes_every_cell_and_the_results(first):
    path, out, result, said = first
    cells = ["small-labels-s0", "small-rc-s0", "small-labels-s1", "small-rc-s1"]
    raw = raw_available()
    assert result["trained"] == ["teacher-cnn4", *(["raw-small"] if raw else []), *cells]
    assert result["unavailable"] == ([] if raw else ["raw-small"])
    for name in ["teacher-cnn4", *cells, *(["raw-small"] if raw else [])]:
        cell = json.loads((out / "cells" / f"{name}.json").read_text())
        assert cell["run"] == name and cell["wall_s"] > 0
        assert 0 < cell["metrics"]["recall"]["1"] <= 1 and 0 < cell["metrics"]["map_at_r"] <= 1
        assert f"run.name={name}" in cell["spec"]["overrides"]
    assert not (out / "cells" / "narrow-rc-s0.json").exists()  # filtered out by --settings small
    student = json.loads((out / "cells" / "small-rc-s1.json").read_text())["spec"]["overrides"]
    # Order: shards' data, base, the setting's student, the method's, then the study's run keys.
    assert student[0] == f"data.root={out / 'shards'}"
    assert student.index("model.backbone=rct_cnn3_small") > student.index(BASE[-1])
    assert student.index("loss.name=rc") > student.index("model.embedding_size=32")
    assert student[-4:] == ["run.seed=1", f"run.out_dir={out / 'runs'}", "run.name=small-rc-s1", "run.overwrite=true"]
    assert f"teacher.export={out / 'runs' / 'teacher-cnn4' / 'export'}" in student
    assert any("trained 5" in line or "trained 6" in line for line in said), said


def test_results_jsonl_are_the_per_seed_statistics(first):
    _, out, _, _ = first
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rows = {(row["setting"], row["method"]): row for row in lines}
    assert set(rows) == {(s, m) for s in ("small", "narrow") for m in ("labels", "rc", "teacher", "raw")}
    for (setting, method), row in rows.items():
        if setting == "narrow" and method != "teacher":
            assert row["n"] == 0 and row["status"] in ("not run", "not available"), row
            continue
        if method == "raw" and not raw_available():
            assert row["status"] == "not available"
            continue
        expected_n = 1 if method in ("teacher", "raw") else 2
        assert row["n"] == expected_n and row["reference"] == (method in ("teacher", "raw"))
        for column in COLUMNS:
            values = [seed[column] for seed in row["per_seed"]]
            assert row["mean"][column] == pytest.approx(statistics.fmean(values))
            assert row["std"][column] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
        assert row["wall_s"] == pytest.approx(statistics.fmean(seed["wall_s"] for seed in row["per_seed"]))
        if method in ("labels", "rc"):
            assert row["seeds"] == [0, 1]
            for seed in row["per_seed"]:
                cell = json.loads((out / "cells" / f"{setting}-{method}-s{seed['seed']}.json").read_text())
                assert seed["R@1"] == pytest.approx(100 * cell["metrics"]["recall"]["1"])
                assert seed["MAP@R"] == pytest.approx(100 * cell["metrics"]["map_at_r"])


def test_results_md_has_the_rows_and_a_verdict_from_the_numbers(first):
    _, out, _, _ = first
    text = (out / "results.md").read_text()
    small = text.split("## small")[1].split("## narrow")[0]
    rows = {line.split("|")[1].strip(): line for line in small.splitlines() if line.startswith("| ")}
    assert {"labels", "rc", "*teacher (reference)*", "*raw backbone features (reference)*"} <= set(rows)
    jsonl = {(r["setting"], r["method"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    for method in ("labels", "rc"):
        mean, std = jsonl[("small", method)]["mean"]["R@1"], jsonl[("small", method)]["std"]["R@1"]
        assert f"| {method} | 2 | {mean:.1f} ± {std:.1f} |" in rows[method]
    rc, labels = (round(jsonl[("small", m)]["mean"]["R@1"], 1) for m in ("rc", "labels"))
    line = next(line for line in small.splitlines() if line.startswith("Verdict:"))
    assert f"RC's mean R@1 ({rc:.1f}) is {'above' if rc > labels else 'not above'} every other method" in line
    assert f"labels {labels:.1f} ({round(rc - labels, 1) + 0.0:+.1f})" in line
    narrow = text.split("## narrow")[1]
    assert "| labels | 0 | – |" in narrow and "Verdict: not yet" in narrow


def test_svg_parses_with_one_bar_per_finished_cell_and_reference_lines(first):
    _, out, _, _ = first
    root = ET.parse(out / "results.svg").getroot()
    bars = [(r.get("data-group"), r.get("data-series")) for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert sorted(bars) == [("small", "labels"), ("small", "rc")]
    lines = {(e.get("data-group"), e.get("data-series")) for e in root.iter(f"{SVG}line")
             if e.get("class") == "reference"}
    assert ("small", "teacher (reference)") in lines and ("narrow", "teacher (reference)") in lines
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"labels", "rc", "teacher (reference)", "R@1 (%)", "setting", "small", "narrow"} <= set(texts)
    assert sum(1 for e in root.iter(f"{SVG}path") if e.get("class") == "error") == 2


def test_rerun_trains_nothing(first):
    path, out, _, _ = first
    before, results = run_mtimes(out), (out / "results.md").read_text()
    said: list[str] = []
    result = run_study(path, settings=["small"], say=said.append)
    assert result["trained"] == [] and len(result["skipped"]) == 5 + raw_available()
    assert any("trained 0" in line for line in said), said
    assert run_mtimes(out) == before
    assert (out / "results.md").read_text() == results


def test_dry_run_lists_done_and_planned_runs_and_trains_nothing(first):
    path, out, _, _ = first
    before = run_mtimes(out)
    said: list[str] = []
    result = run_study(path, dry_run=True, say=said.append)
    assert "narrow-rc-s1" in result["todo"] and "small-rc-s1" in result["skipped"]
    assert any(line.split() == ["done", "small-labels-s0"] for line in said), said
    assert any(line.split() == ["to", "run", "narrow-labels-s0"] for line in said), said
    assert said[-1].endswith("nothing trained")
    assert run_mtimes(out) == before and not (out / "cells" / "narrow-labels-s0.json").exists()


def test_cli_arguments_and_filters(first):
    path, out, _, _ = first
    parser = argparse.ArgumentParser()
    add_study_arguments(parser)
    args = parser.parse_args([str(path), "--out", str(out), "--settings", "small", "--methods", "rc",
                              "--seeds", "1", "--dry-run"])
    result = main_study(args)
    assert result["skipped"] == ["teacher-cnn4", *(["raw-small"] if raw_available() else []), "small-rc-s1"]
    study = load_study(path)
    runs = plan(study, out)
    with pytest.raises(ConfigError, match=r"--methods: unknown 'rcc' \(did you mean 'rc'\?\); valid: labels, rc"):
        select(study, runs, methods=["rcc"])
    with pytest.raises(ConfigError, match=r"--seeds: unknown '7'; valid: 0, 1"):
        select(study, runs, seeds=["7"])
    with pytest.raises(ConfigError, match=r"--settings: unknown 'wide'; valid: small, narrow"):
        select(study, runs, settings=["wide"])


def test_changed_override_and_unfinished_run_rerun_only_those(first):
    """Last: it changes the study. RC's overrides change (both RC cells rerun, saying why) and one labels run is
    left unfinished (its folder there, no result): exactly those three train."""
    path, out, _, _ = first
    study = study_dict(methods_overrides={"rc": ["loss.rc.sigma=0.5"]})
    write_study(path.parent, study)
    (out / "cells" / "small-labels-s1.json").unlink()
    before = run_mtimes(out)
    said: list[str] = []
    result = run_study(path, settings=["small"], say=said.append)
    assert sorted(result["trained"]) == ["small-labels-s1", "small-rc-s0", "small-rc-s1"]
    assert any("training small-rc-s0 (overrides +loss.rc.sigma=0.5)" in line for line in said), said
    after = run_mtimes(out)
    for name in ("teacher-cnn4", "small-labels-s0"):
        assert after[name] == before[name]
    for name in result["trained"]:
        assert after[name] != before[name]
        assert "loss.rc.sigma=0.5" in json.loads((out / "cells" / f"{name}.json").read_text())["spec"]["overrides"] \
            or "labels" in name


# ---------------------------------------------------------------------------------------------- study file errors

@pytest.mark.parametrize("change, message", [
    ({"methods": ["labels", "rcc"]}, r"methods: unknown method 'rcc' \(did you mean 'rc'\?\); valid: labels, rc, rkd"),
    ({"settings": {"small": {"teacher": "cnn5"}}},
     r"settings\.small\.teacher: unknown teacher 'cnn5' \(did you mean 'cnn4'\?\)"),
    ({"setings": {}}, r"study: unknown key 'setings' \(did you mean 'settings'\?\)"),
    ({"settings": {"small": {"teacher": "cnn4", "studnet": []}}},
     r"settings\.small: unknown key 'studnet' \(did you mean 'student'\?\)"),
    ({"base": ["model.backbon=resnet18"]},
     r"base\[0\]: unknown config key 'model\.backbon' \(did you mean 'model\.backbone'\?\)"),
    ({"base": ["optim.epochs"]}, r"base\[0\]: 'optim\.epochs' must look like section\.key=value"),
    ({"base": ["run.name=x"]}, r"base\[0\]: run\.name is set by the study"),
    ({"teachers": {"cnn4": ["teacher.export=x"]}}, r"teachers\.cnn4\[0\]: teacher\.export is set by the study"),
    ({"seeds": []}, r"seeds: empty"),
    ({"seeds": [0, 0]}, r"seeds: \[0\] repeated"),
    ({"methods": ["rc", "rc"]}, r"methods: \['rc'\] repeated"),
    ({"methods": ["labels"], "references": ["teacher", "raww"]},
     r"references: unknown reference 'raww' \(did you mean 'raw'\?\)"),
    ({"methods_overrides": {"rkd": ["loss.rkd.angle_weight=1"]}}, r"methods_overrides\.rkd: 'rkd' is not in methods"),
    ({"methods_overrides": {"rc": ["loss.sigma=2"]}}, r"methods_overrides\.rc\[0\]: loss\.sigma moved to loss\.rc\.sigma"),
    ({"teachers": {"cnn4": [], "spare": []}}, r"teachers\.spare: no setting names it"),
    ({"settings": {"bad-name": {"teacher": "cnn4"}}}, r"settings: names are letters, digits and '_'"),
    ({"shards": {"source": "digits", "shard_sise": 10}},
     r"shards: unknown make-shards argument 'shard_sise' \(did you mean 'shard_size'\?\)"),
    ({"shards": {"source": "digitz"}}, r"shards: argument --source: invalid choice: 'digitz'"),
    ({"shards": None}, r"base: without `shards`, base must set data\.root"),
    ({"base": [*BASE, "data.root=/data"]}, r"base: 'data\.root=/data' and `shards` both say where the data is"),
    ({"config": "cub/teachr"}, r"config: config 'cub/teachr' is neither a file nor a built-in config; did you mean"),
])
def test_study_file_errors_name_the_key(tmp_path, change, message):
    path = write_study(tmp_path, study_dict(**change))
    with pytest.raises(ConfigError, match=message) as caught:
        load_study(path)
    assert "\n" not in str(caught.value)


def test_repeated_names_and_bad_values_are_refused(tmp_path):
    path = write_study(tmp_path, study_dict())
    text = path.read_text()
    path.write_text(text.replace("  narrow:", "  small:"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line \d+: duplicate key 'small'"):
        load_study(path)
    path = write_study(tmp_path, study_dict(methods_overrides={"rc": ["loss.rc.sigma=-1"]}))
    with pytest.raises(ConfigError, match=r"run small-rc-s0: loss\.rc\.sigma must be > 0, got -1"):
        plan(load_study(path), tmp_path / "out")
    # `base` reaches the teachers too, whose loss (Proxy-Anchor) has no loss.rc: RC's options go in methods_overrides
    path = write_study(tmp_path, study_dict(base=[*BASE, "loss.rc.sigma=2"]))
    with pytest.raises(ConfigError, match=r"run teacher-cnn4: loss\.rc\.sigma has no effect with loss\.name "
                                          r"proxy_anchor"):
        plan(load_study(path), tmp_path / "out")


def rows_with_r1(r1: dict[str, list[float]]) -> list[Row]:
    return [Row("s", method, False, "done", [{"seed": i, "R@1": v, "R@2": v, "R@4": v, "MAP@R": v, "wall_s": 1.0}
                                             for i, v in enumerate(values)]) for method, values in r1.items()]


@pytest.mark.parametrize("r1, expected", [
    ({"labels": [60.0, 62.0], "rc": [64.0, 66.0], "rkd": [63.0, 65.0]},
     "Verdict: RC's mean R@1 (65.0) is above every other method: labels 61.0 (+4.0), rkd 64.0 (+1.0); "
     "margin within one std: rkd."),
    ({"labels": [70.0, 70.0], "rc": [64.0, 66.0], "rkd": []},
     "Verdict: RC's mean R@1 (65.0) is not above every other method: labels 70.0 (-5.0); not run yet: rkd."),
    ({"labels": [60.0], "rc": [60.02, 60.0]},
     "Verdict: RC's mean R@1 (60.0) is not above every other method: labels 60.0 (+0.0); margin within one std: "
     "labels; seeds: rc 2, labels 1."),
    ({"labels": [60.0], "rc": []}, "Verdict: not yet (rc has no finished run)."),
    ({"labels": [60.0]}, "Verdict: none (rc is not among the methods)."),
])
def test_verdict_follows_the_numbers(r1, expected):
    assert verdict(rows_with_r1(r1)) == expected
