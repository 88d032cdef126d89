"""Checkpoint integrity: a complete checkpoint is never removed or rewritten while it is the only complete one
(a same-step save is written beside it and swapped in, and a kill at any moment of that leaves one),
interrupted saves are cleaned up, the COMPLETE marker vouches for every file, size and SHA-256, and a
damaged checkpoint (a flipped byte included) is passed over for the previous one (a fake engine stands in
for DeepSpeed's `save_checkpoint`, which writes one file per rank)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from rct_dist.config import load_config
from rct_dist.train import checkpoint
from rct_dist.train.checkpoint import (MARKER, REPLACED, RESAVE, complete_checkpoints, damage, save, tag_for,
                                      usable_checkpoints)
from rct_dist.train.loop import resume_point


class FakeEngine:
    """Writes `model.pt` and `optim.pt` into the tag folder; records whether a marker was there meanwhile."""

    def __init__(self) -> None:
        self.marked_while_writing: list[bool] = []

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        path = Path(folder) / tag
        self.marked_while_writing.append((path / MARKER).exists())
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.pt").write_bytes(b"m" * (10 + len(json.dumps(client_state))))
        (path / "optim.pt").write_bytes(b"o" * 20)


def test_marker_vouches_for_files_and_sizes(tmp_path):
    path = save(FakeEngine(), tmp_path, step=5, epoch=0, client_state={"epoch": 0}, keep=3)
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 5 and marker["epoch"] == 0
    assert marker["files"] == {"model.pt": (path / "model.pt").stat().st_size, "optim.pt": 20}
    assert marker["sha256"]["optim.pt"] == hashlib.sha256(b"o" * 20).hexdigest()
    assert damage(path) is None
    data = bytearray((path / "model.pt").read_bytes())
    data[3] ^= 0x01  # one flipped bit, same size
    (path / "model.pt").write_bytes(bytes(data))
    assert damage(path) == "model.pt does not have the content its marker vouches for (SHA-256 differs)"
    (path / "optim.pt").write_bytes(b"o" * 7)  # truncated
    assert damage(path) == "optim.pt has 7 bytes, its marker says 20"
    (path / "optim.pt").unlink()
    assert damage(path) == "optim.pt is missing"


def test_a_save_of_the_same_step_is_written_beside_the_complete_one_then_swapped(tmp_path):
    engine = FakeEngine()
    save(engine, tmp_path, step=8, epoch=0, client_state={"batch": 8}, keep=1)
    first = (tmp_path / tag_for(8) / "model.pt").read_bytes()
    save(engine, tmp_path, step=8, epoch=0, client_state={"batch": 0, "epoch": 1}, keep=1)
    assert engine.marked_while_writing == [False, False]  # written into a fresh folder each time
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [8]
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(8)]
    assert (tmp_path / tag_for(8) / "model.pt").read_bytes() != first  # the second write, swapped in
    assert damage(tmp_path / tag_for(8)) is None


class KilledEngine(FakeEngine):
    """Dies (raises) in the middle of writing, after one of its two files."""

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        path = Path(folder) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.pt").write_bytes(b"half")
        raise KeyboardInterrupt("killed")


def test_a_kill_during_a_same_step_save_with_keep_1_leaves_the_complete_one(tmp_path):
    save(FakeEngine(), tmp_path, step=8, epoch=0, client_state={"batch": 8}, keep=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / tag_for(8)).iterdir()}
    with pytest.raises(KeyboardInterrupt):
        save(KilledEngine(), tmp_path, step=8, epoch=0, client_state={"epoch": 1}, keep=1)
    assert [(s, p.name) for s, p in usable_checkpoints(tmp_path)] == [(8, tag_for(8))]
    assert {p.name: p.read_bytes() for p in (tmp_path / tag_for(8)).iterdir()} == before
    # The next save cleans the half-written folder up.
    save(FakeEngine(), tmp_path, step=9, epoch=0, client_state={}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(9)]


def test_an_interrupted_swap_still_finds_one_complete_checkpoint(tmp_path, monkeypatch):
    """A kill between the two renames of the swap: `<tag>.replaced` (old) and `<tag>.resave` (new) are
    both complete; the newer is chosen, and the next save tidies up."""
    save(FakeEngine(), tmp_path, step=8, epoch=0, client_state={"batch": 8}, keep=1)
    real_replace = os.replace
    calls = []

    def dies_on_the_second_rename(src, dst):
        if Path(src).name.startswith("step"):  # the swap's renames (markers are renamed into place too)
            calls.append((Path(src).name, Path(dst).name))
            if len(calls) == 2:
                raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr("rct_dist.train.checkpoint.os.replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(), tmp_path, step=8, epoch=1, client_state={"epoch": 1, "padding": "x" * 10}, keep=1)
    monkeypatch.setattr("rct_dist.train.checkpoint.os.replace", real_replace)
    assert calls == [(tag_for(8), tag_for(8) + REPLACED), (tag_for(8) + RESAVE, tag_for(8))]
    found = usable_checkpoints(tmp_path)
    assert [p.name for _, p in found] == [tag_for(8) + REPLACED, tag_for(8) + RESAVE]  # newest write last
    assert json.loads((found[-1][1] / MARKER).read_text())["epoch"] == 1
    save(FakeEngine(), tmp_path, step=10, epoch=1, client_state={}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(10)]


def test_a_save_after_an_interrupted_swap_keeps_the_new_write(tmp_path, monkeypatch):
    """After a kill between the swap's renames only `<tag>.replaced` and `<tag>.resave` exist; a save of
    that step again writes `<tag>` itself, which is then the newest write and the one kept."""
    save(FakeEngine(), tmp_path, step=8, epoch=0, client_state={"batch": 8}, keep=1)
    real_replace = os.replace

    def dies_on_the_second_rename(src, dst):
        if Path(src).name == tag_for(8) + RESAVE:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr("rct_dist.train.checkpoint.os.replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(), tmp_path, step=8, epoch=1, client_state={"epoch": 1}, keep=1)
    monkeypatch.setattr("rct_dist.train.checkpoint.os.replace", real_replace)
    save(FakeEngine(), tmp_path, step=8, epoch=2, client_state={"epoch": 2, "third": True}, keep=1)
    assert [p.name for _, p in usable_checkpoints(tmp_path)] == [tag_for(8)]
    assert json.loads((tmp_path / tag_for(8) / MARKER).read_text())["epoch"] == 2


def test_interrupted_saves_are_removed_by_the_next_complete_one(tmp_path):
    engine = FakeEngine()
    save(engine, tmp_path, step=1, epoch=0, client_state={}, keep=5)
    half = tmp_path / tag_for(2)  # a save killed before its marker
    half.mkdir()
    (half / "model.pt").write_bytes(b"partial")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    save(engine, tmp_path, step=3, epoch=0, client_state={}, keep=5)
    assert not half.exists()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 3]


def test_keep_removes_the_oldest(tmp_path):
    engine = FakeEngine()
    for step in (1, 2, 3, 4):
        save(engine, tmp_path, step=step, epoch=0, client_state={}, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]


def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=r", "run.resume=auto"])
    folder = tmp_path / "r" / "checkpoints"
    engine = FakeEngine()
    for step in (10, 20):
        save(engine, folder, step=step, epoch=0, client_state={}, keep=3)
    assert resume_point(cfg, tmp_path / "r") == folder / tag_for(20)
    (folder / tag_for(20) / "model.pt").write_bytes(b"x")  # damaged after it was marked complete
    assert resume_point(cfg, tmp_path / "r") == folder / tag_for(10)
    assert "is damaged (model.pt has 1 bytes" in capsys.readouterr().out
    assert [s for s, _ in usable_checkpoints(folder)] == [10]
    with pytest.raises(RuntimeError, match="is damaged: model.pt has 1 bytes"):
        checkpoint.load(object(), folder / tag_for(20))


def test_markers_without_a_file_list_still_count(tmp_path):
    """Checkpoints of earlier versions (marker: step and epoch only) are trusted as before."""
    old = tmp_path / tag_for(4)
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"step": 4, "epoch": 0}))
    assert damage(old) is None and [s for s, _ in usable_checkpoints(tmp_path)] == [4]


class _RunsCode:
    """A pickle that, when unpickled by the full unpickler, creates a file: code run from a checkpoint."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _poisoned_tag(tmp_path: Path) -> tuple[Path, Path]:
    import torch

    tag = tmp_path / "checkpoints" / tag_for(3)
    tag.mkdir(parents=True)
    ran = tmp_path / "code-ran"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": _RunsCode(ran), "optimizer_state_dict": _RunsCode(ran)}, tag / name)
    (tag / MARKER).write_text(json.dumps({"step": 3, "epoch": 0, "world": 2}))
    return tag, ran


def test_universal_conversion_refuses_a_pickle_that_would_run_code(tmp_path):
    """Resuming on another number of ranks converts the checkpoint in a subprocess; it reads every file
    with the weights-only unpickler, so a pickle that would run code is refused and nothing runs."""
    import subprocess
    import sys

    tag, ran = _poisoned_tag(tmp_path)
    with pytest.raises(RuntimeError, match="universal checkpoint") as refused:
        checkpoint.universal_copy(tag)
    assert not ran.exists()
    assert "Weights only load failed" in str(refused.value) or "weights_only" in str(refused.value)
    assert not (tag.parent / checkpoint.UNIVERSAL / tag.name / MARKER).exists()
    # The control: DeepSpeed's converter run directly unpickles with the full unpickler and runs the code.
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                    "--output_folder", str(tmp_path / "direct"), "--num_extract_workers", "1",
                    "--num_merge_workers", "1"], capture_output=True, text=True, check=False, timeout=300)
    assert ran.exists()
