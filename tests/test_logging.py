"""`rct_dist.logs.setup_logging`: rank 0 logs INFO to stderr and the run's train.log, other ranks WARNING
only (prefixed with their rank); repeated set-up doubles nothing; lines logged under a progress bar leave
it whole; the trainer writes `runs/<name>/train.log` (evaluations, the epoch's bar summary, the resume)."""

from __future__ import annotations

import logging
import re
import sys

import pytest

from rct_dist.logs import LOGGER, environment_rank, setup_logging


@pytest.fixture(autouse=True)
def restore_logger():
    """Each test starts from a bare `rct_dist` logger and leaves it as it found it: handlers an earlier
    set-up added in this process (a CLI test's) are set aside, untouched, and put back."""
    logger = logging.getLogger(LOGGER)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    for handler in handlers:
        logger.removeHandler(handler)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def _lines(text: str) -> list[str]:
    """Output lines as a terminal would show them (what follows the last carriage return)."""
    return [line.split("\r")[-1] for line in text.splitlines()]


def test_rank0_logs_info_to_stderr_and_the_file(tmp_path, capsys):
    log_file = tmp_path / "run" / "train.log"
    setup_logging(0, log_file)
    logging.getLogger("rct_dist.train").info("epoch 1: R@1 12.34")
    logging.getLogger("rct_dist.data.loader").warning("unreadable sample x")
    logging.getLogger("rct_dist.train").debug("not shown")
    assert _lines(capsys.readouterr().err) == ["epoch 1: R@1 12.34", "unreadable sample x"]  # bare: lines start so
    text = log_file.read_text(encoding="utf-8").splitlines()
    assert len(text) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO rct_dist\.train: epoch 1: R@1 12\.34", text[0])
    assert text[1].endswith(" WARNING rct_dist.data.loader: unreadable sample x")


def test_other_ranks_log_warnings_only_with_their_rank_and_no_file(tmp_path, capsys):
    log_file = tmp_path / "train.log"
    setup_logging(3, log_file)
    logger = logging.getLogger("rct_dist.train")
    logger.info("resumed from somewhere")
    logger.warning("rank-local trouble")
    logger.error("worse")
    assert _lines(capsys.readouterr().err) == ["[rank 3] rank-local trouble", "[rank 3] worse"]
    assert not log_file.exists()


def test_setting_up_twice_doubles_nothing_and_the_file_is_appended(tmp_path, capsys, restore_logger):
    first, second = tmp_path / "a" / "train.log", tmp_path / "b" / "train.log"
    first.parent.mkdir()
    first.write_text("an earlier attempt\n", encoding="utf-8")
    for _ in range(3):
        setup_logging(0, first)
    assert len(restore_logger.handlers) == 2  # one console, one file
    logging.getLogger("rct_dist").info("once")
    setup_logging(0, second)  # another run in the same process: its own file, the first one closed
    assert len(restore_logger.handlers) == 2
    logging.getLogger("rct_dist").info("twice")
    setup_logging(0)  # no file
    assert len(restore_logger.handlers) == 1
    logging.getLogger("rct_dist").info("thrice")
    assert _lines(capsys.readouterr().err) == ["once", "twice", "thrice"]
    assert [line.split(": ", 1)[-1] for line in first.read_text().splitlines()] == ["an earlier attempt", "once"]
    assert [line.split(": ", 1)[-1] for line in second.read_text().splitlines()] == ["twice"]
    setup_logging(1)  # the same process as another rank: reconfigured, not doubled
    logging.getLogger("rct_dist").warning("w")
    assert _lines(capsys.readouterr().err) == ["[rank 1] w"]


def test_records_still_reach_the_root_logger(caplog):
    setup_logging(0)
    with caplog.at_level(logging.INFO):
        logging.getLogger("rct_dist.data.members").info("seen by caplog")
    assert "seen by caplog" in caplog.text
    assert not any(getattr(h, "_rct_dist_role", None) for h in logging.getLogger().handlers)


def test_a_line_under_a_progress_bar_leaves_the_bar_whole(capsys):
    from tqdm import tqdm

    setup_logging(0)
    bar = tqdm(total=4, desc="epoch 1/1", file=sys.stderr, leave=False, mininterval=0)
    bar.update()
    logging.getLogger("rct_dist.train").info("said mid-epoch")
    bar.update()
    bar.close()
    err = capsys.readouterr().err
    lines = err.split("\n")
    said = [i for i, line in enumerate(lines) if line.split("\r")[-1] == "said mid-epoch"]
    assert len(said) == 1, repr(err)  # the line on its own, the bar cleared before it...
    assert "epoch 1/1" in lines[said[0] + 1]  # ...and redrawn after it
    assert "said mid-epoch" not in "".join(lines[said[0] + 1:])


def test_environment_rank():
    assert environment_rank({}) == 0
    assert environment_rank({"RANK": "2", "SLURM_PROCID": "0"}) == 2
    assert environment_rank({"OMPI_COMM_WORLD_RANK": "5"}) == 5
    assert environment_rank({"SLURM_PROCID": "1"}) == 1
    assert environment_rank({"PMI_RANK": "3"}) == 3
    assert environment_rank({"RANK": "x"}) == 0  # world discovery reports a bad value, not the log set-up


def test_monitor_says_through_the_logger_and_logs_the_bar_at_the_epochs_end(tmp_path, caplog):
    from rct_dist.train.monitor import Monitor

    monitor = Monitor(tmp_path, enabled=True, tensorboard=False)
    silent = Monitor(tmp_path, enabled=False, tensorboard=False)
    with caplog.at_level(logging.INFO, logger="rct_dist"):
        monitor.say("before the bar")
        silent.say("never")
        monitor.start_epoch(1, 3, batches=10, initial=4)
        for _ in range(6):
            monitor.advance({"loss": "0.5000"})
        monitor.say("under the bar")
        monitor.end_epoch()
        monitor.start_epoch(2, 3, batches=10)
        monitor.advance({"loss": "-"})
        monitor.close(finished=False)
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert records[:2] == [("rct_dist.train", "INFO", "before the bar"), ("rct_dist.train", "INFO", "under the bar")]
    assert re.fullmatch(r"epoch 2/3: 10/10 batches in \d\d:\d\d \((\d+\.\d\d batches/s|-), resumed at 4\), loss 0\.5000",
                        records[2][2]), records[2]
    assert re.fullmatch(r"epoch 3/3: stopped at 1/10 batches in \d\d:\d\d \((\d+\.\d\d batches/s|-)\), loss -",
                        records[3][2]), records[3]
    assert len(records) == 4


RUN = """
job: transfer
run: {{name: logged, out_dir: {out}}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
loss: {{name: rc}}
optim: {{lr: 1.0e-3, epochs: 1}}
deepspeed: {{config: zero0_fp32}}
eval: {{batch_size: 128}}
log: {{every_steps: 5, tensorboard: false}}
"""


def test_a_run_writes_train_log_and_a_resume_continues_it(digits_shards, tmp_path, capsys):
    """One epoch in-process through `train()`, then a resume for a second: train.log holds the first epoch's
    evaluation and bar summary, then the resume line and the second epoch's evaluation; stderr shows the
    same lines, bare, at the start of a line. (In-process: `rct-dist`'s own end, `finish()`, leaves the
    process with os._exit once a process group exists.)"""
    from rct_dist.config import load_config
    from rct_dist.train.loop import train

    config = tmp_path / "run.yaml"
    config.write_text(RUN.format(out=tmp_path / "runs", data=digits_shards), encoding="utf-8")
    train(load_config(str(config)))
    log_file = tmp_path / "runs" / "logged" / "train.log"
    first = log_file.read_text(encoding="utf-8")
    assert re.search(r" INFO rct_dist\.train: epoch 1: R@1 \d+\.\d\d .*MAP@R \d", first), first
    assert re.search(r" INFO rct_dist\.train: epoch 1/1: \d+/\d+ batches in ", first), first
    assert "resumed from" not in first
    capsys.readouterr()

    train(load_config(str(config), ["run.resume=auto", "optim.epochs=2"]))
    err = _lines(capsys.readouterr().err)
    text = log_file.read_text(encoding="utf-8")
    assert text.startswith(first)  # appended, not rewritten
    later = text[len(first):]
    resumed = re.search(r" INFO rct_dist\.train: resumed from \S+ at epoch 2, sample 0\n", later)
    assert resumed and re.search(r" INFO rct_dist\.train: epoch 2: R@1 \d", later[resumed.end():]), later
    assert any(re.match(r"resumed from \S+ at epoch 2, sample 0$", line) for line in err), err
    assert any(re.match(r"epoch 2: R@1 \d", line) for line in err), err
