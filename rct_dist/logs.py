"""One logging set-up per process, for the `rct_dist` logger only (the root logger, DeepSpeed's and other
libraries' loggers are left as they are).

- Rank 0: INFO and above on stderr, the bare message (lines such as `resumed from ... at epoch 2` start
  the line, as scripts and tests expect), and, given a `log_file` (the trainer gives
  `runs/<name>/train.log`), the same records with time, level and logger name, appended (a resumed run
  continues its file).
- Other ranks: WARNING and above on stderr, each line prefixed with `[rank N]`; no file.
- Console lines go through `tqdm.write` once tqdm is loaded, so a line logged while a progress bar is
  drawn on stderr does not break the bar (tqdm clears it, writes the line, redraws it).
- The stream is `sys.stderr` as it is when a record is written, not when the handler was made (pytest's
  capture, redirections).

`setup_logging` may be called any number of times (the CLI calls it at start, the trainer once its run
folder exists): each call states the whole configuration and replaces the handlers an earlier call added,
so nothing is doubled; a call with the same arguments keeps the open log file as it is. Records still
propagate to the root logger (pytest's `caplog`, an application's own handlers see them); nothing is
added there.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Mapping

LOGGER = "rct_dist"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ROLE = "_rct_dist_role"  # attribute marking the handlers set-up added: "console" or "file"

# The variables launchers set for a process's global rank, in the order rct_dist.distributed.world reads
# them (PMI/PMIX last: no world is built from them, but they still tell rank 0 from the others).
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMI_RANK", "PMIX_RANK")


def environment_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher's variables give it, 0 without any (or with a value
    that is not an integer: world discovery reports that one properly, later)."""
    environ = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        text = (environ.get(name) or "").strip()
        if text:
            try:
                return int(text)
            except ValueError:
                return 0
    return 0


class _ConsoleHandler(logging.Handler):
    """Writes to the current `sys.stderr`, through `tqdm.write` when tqdm is loaded (bars stay whole)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr
            if stream is None:  # pythonw and the like
                return
            tqdm_module = sys.modules.get("tqdm")
            if tqdm_module is not None:
                tqdm_module.tqdm.write(text, file=stream)
            else:
                stream.write(text + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _ours(logger: logging.Logger, role: str) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, _ROLE, None) == role]


def setup_logging(rank: int, log_file: Path | str | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the `rct_dist` logger for a process of global rank `rank` (see the module docstring) and
    return it. `log_file` counts on rank 0 only; `level` is rank 0's (others log WARNING and above, or
    `level` if higher)."""
    logger = logging.getLogger(LOGGER)
    threshold = level if rank == 0 else max(level, logging.WARNING)
    logger.setLevel(threshold)

    console = _ours(logger, "console")
    for extra in console[1:]:
        logger.removeHandler(extra)
    handler = console[0] if console else _ConsoleHandler()
    setattr(handler, _ROLE, "console")
    handler.setLevel(threshold)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    if not console:
        logger.addHandler(handler)

    wanted = Path(os.path.abspath(log_file)) if log_file is not None and rank == 0 else None
    for old in _ours(logger, "file"):
        if wanted is not None and Path(old.baseFilename) == wanted:
            old.setLevel(threshold)
            wanted = None  # already open
            continue
        logger.removeHandler(old)
        old.close()
    if wanted is not None:
        wanted.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(wanted, mode="a", encoding="utf-8")
        setattr(file_handler, _ROLE, "file")
        file_handler.setLevel(threshold)
        file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
        logger.addHandler(file_handler)
    return logger
