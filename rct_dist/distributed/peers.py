"""Naming the rank a job lost, instead of a collective's traceback.

When a node dies or its link is cut, the other ranks learn it only as a failed collective: gloo says
"Connection closed by peer [10.0.0.2]:41234" or "Timed out waiting 600000ms for recv", NCCL names a
collective, none says which rank is gone. And a collective fails on each surviving rank at its own time:
a rank next to the lost one at once, a rank that waits on a live peer only when that peer stops
sending.

`PeerWatch` asks the job a roll call through the launcher's rendezvous store (the TCP key-value store at
MASTER_ADDR:MASTER_PORT that every launcher starts; it stays up while its host lives):

- At start each rank publishes its host and pid, and starts a thread with its own store connection that
  waits (blocking on the store, no polling) to be called. The thread answers even while the rank's main
  thread is blocked in a collective, so a live rank answers within milliseconds. A frozen or killed
  process, or a node cut off from the store, does not.
- The first rank whose collective fails calls every rank, answers for itself, waits up to
  `answer_within` seconds for the answers and writes the verdict to the store: one line naming the
  ranks that did not answer (host and pid), the failed collective's first line, and that the newest
  complete checkpoint is kept. A rank whose own error was not a communication failure (a bad sample, a
  full disk) left that error in the store before it left, and is named with it instead.
- Every other rank takes that verdict, whether its own collective has failed by then (it raises
  `PeerLost`) or its thread was called while the main thread still waits in a collective (the thread
  prints the line and ends the process with status 1: the collective could only time out later, and
  checkpoints are written beside the complete ones and swapped in, so none is left damaged). All ranks
  say the same line, within the roll call of the first failure. Rank 0, whose process serves the
  store under most launchers, leaves last.

A rank that cannot reach the store at all says so: the store lives on rank 0's host, so either that
host is lost or this node is cut off.

How long it takes: a collective waits at most `run.dist_timeout` seconds for a silent peer (every
process group, DeepSpeed's included: see `engine.init_distributed`), then the roll call takes at most
`answer_within` seconds (default 10).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
import threading
import time
from types import TracebackType

import torch.distributed as dist

log = logging.getLogger(__name__)

ANSWER_WITHIN_S = 10.0  # a live rank's thread answers in milliseconds; this allows for a loaded machine
_BLOCK_FOR = datetime.timedelta(days=30)  # the answering thread's wait: until called or the job ends
# gloo's errors are RuntimeErrors whose text starts with its source location (".../gloo/transport/tcp/...")
_COMMUNICATION = re.compile(r"gloo|nccl|ProcessGroup|c10d", re.I)


class PeerLost(RuntimeError):
    """A collective failed because a rank left the job; the message names it (one line)."""


def is_communication_failure(error: BaseException) -> bool:
    """A failed collective (gloo raises plain RuntimeErrors; torch's own are DistError)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and not isinstance(error, PeerLost) and bool(
        _COMMUNICATION.search(str(error)))


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text)  # gloo's source location
    text = text.split(". This is typically caused")[0]
    return f"{text[:200]}..." if len(text) > 200 else text


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def _named(ranks: list[int], hosts: dict[int, str]) -> str:
    """'rank 3 on node1 (pid 77)' or 'ranks 2-3 on node1 (pids 77, 78)'; hosts[r] is 'HOST PID'."""
    by_host: dict[str, list[tuple[int, str]]] = {}
    for r in ranks:
        host, _, pid = hosts.get(r, "an-unregistered-host ?").partition(" ")
        by_host.setdefault(host, []).append((r, pid))
    out = []
    for host, members in by_host.items():
        many = "s" if len(members) > 1 else ""
        out.append(f"rank{many} {_ranges([r for r, _ in members])} on {host} "
                   f"(pid{many} {', '.join(pid for _, pid in members)})")
    return "; ".join(out)


def rendezvous_address() -> tuple[str, int] | None:
    """Host and port of the TCP store the default process group was made with (every launcher's env://
    rendezvous and torchrun's agent store); None without a process group or with another store (file://)."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None
    base = getattr(store, "_underlying_non_prefix_store", store)
    return (base.host, base.port) if isinstance(base, dist.TCPStore) else None


class PeerWatch:
    """`with PeerWatch(rank, size):` around a multi-rank job; a no-op on one rank or without a TCP store."""

    def __init__(self, rank: int, size: int, answer_within: float = ANSWER_WITHIN_S, hint: str = "",
                 label: str = "rct-dist", expected: tuple[type[BaseException], ...] = (),
                 address: tuple[str, int] | None = None):
        self.rank, self.size = rank, size
        self.address = address  # the rendezvous store; None: the process group's own, when it is a TCP store
        self.answer_within = answer_within
        self.hint = hint  # what the user does next, appended to the message
        self.label = label  # the answering thread's line starts with it, as the CLI's do
        self.expected = expected  # exceptions that end the job as planned (a stop on a signal)
        self.prefix = f"rct-dist/peers/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._store: dist.Store | None = None
        self._thread: threading.Thread | None = None
        self._answered = self._reported = False
        self._lock = threading.Lock()

    # ---- the store
    def _connect(self, timeout: float) -> dist.Store:
        store = dist.TCPStore(self.address[0], self.address[1], is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
        return dist.PrefixStore(self.prefix, store)

    def __enter__(self) -> PeerWatch:
        if self.size > 1 and self.address is None:
            self.address = rendezvous_address()
            if self.address is None:
                log.info("no roll call for lost ranks: the process group's store is not a TCP store")
        if self.size > 1 and self.address is not None:
            self._store = self._connect(max(30.0, self.answer_within))
            self._store.set(f"host/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
            self._thread = threading.Thread(target=self._answer_when_called, name="rct-peer-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        if self._store is None or error is None or isinstance(error, self.expected):
            self._release()
            return False
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not a peer's doing
            return False
        if is_communication_failure(error):
            verdict = self._verdict(error)
            if verdict is None:  # the answering thread is reporting it and ending the process
                time.sleep(3600)
            raise PeerLost(verdict) from error
        self._reported = True  # this rank's own failure: left for the others' roll call, then raised as it is
        try:
            store = self._connect(5.0)
            store.set(f"failed/{self.rank}", f"{type(error).__name__}: {_first_line(error)}")
            self._answer(store)
        except Exception:  # noqa: BLE001
            pass
        self._release()  # no thread left blocked in the store while the interpreter shuts down
        return False

    def _release(self) -> None:
        """The job ended normally: wake the answering thread without calling anyone."""
        if self._store is not None and self._thread is not None:
            try:
                self._store.set(f"call/{self.rank}", "done")
            except Exception:  # noqa: BLE001
                pass
            self._thread.join(timeout=5)

    # ---- the roll call
    def _answer(self, store: dist.Store) -> None:
        with self._lock:
            if not self._answered:
                store.set(f"here/{self.rank}", "1")
                store.add("answered", 1)
                self._answered = True

    def _answer_when_called(self) -> None:
        """The thread: answer a roll call even while the main thread is blocked in a collective, then take
        the caller's verdict and end this process with it (its own collective would only time out later)."""
        try:
            store = self._connect(max(30.0, self.answer_within))
            store.wait([f"call/{self.rank}"], _BLOCK_FOR)
            if store.get(f"call/{self.rank}") != b"roll":
                return
            self._answer(store)
            store.wait(["verdict"], datetime.timedelta(seconds=2 * self.answer_within + 30))
            verdict = store.get("verdict").decode()
        except Exception:  # noqa: BLE001 (the store went away with its host: the main thread reports that)
            return
        if self._take_report(store):
            sys.stderr.write(f"{self.label}: {verdict}\n")
            sys.stderr.flush()
            os._exit(1)

    def _take_report(self, store: dist.Store | None) -> bool:
        """True for the first of the two threads to report; the store's host stays until the others read."""
        with self._lock:
            if self._reported:
                return False
            self._reported = True
        if store is not None:
            try:
                store.add("read", 1)
                if self.rank == 0:  # under most launchers rank 0's process serves the store: leave last
                    deadline = time.monotonic() + self.answer_within
                    expected = store.add("answered", 0)
                    while store.add("read", 0) < expected and time.monotonic() < deadline:
                        time.sleep(0.1)
            except Exception:  # noqa: BLE001
                pass
        return True

    def _verdict(self, error: BaseException) -> str | None:
        """The one line for a failed collective (None: this process's thread already reports it)."""
        reason = _first_line(error)
        tail = f" {self.hint}" if self.hint else ""
        store = None
        try:
            store = self._connect(self.answer_within)
            self._answer(store)
            if store.add("calls", 1) == 1:  # the first caller calls everyone and gives the verdict
                verdict = self._roll_call(store, reason) + tail
                store.set("verdict", verdict)
            else:
                store.wait(["verdict"], datetime.timedelta(seconds=2 * self.answer_within + 30))
                verdict = store.get("verdict").decode()
        except Exception as store_error:  # noqa: BLE001
            verdict = (f"lost contact with the job: a collective failed ({reason}) and the rendezvous store at "
                       f"{self.address[0]}:{self.address[1]}, on rank 0's host, does not answer "
                       f"({_first_line(store_error)}): rank 0's node is lost or rank {self.rank}'s node is cut "
                       f"off.{tail}")
            store = None
        return verdict if self._take_report(store) else None

    def _roll_call(self, store: dist.Store, reason: str) -> str:
        for r in range(self.size):
            if not store.check([f"call/{r}"]):
                store.set(f"call/{r}", "roll")
        deadline = time.monotonic() + self.answer_within
        while store.add("answered", 0) < self.size and time.monotonic() < deadline:
            time.sleep(0.1)
        silent = [r for r in range(self.size) if not store.check([f"here/{r}"])]
        failed = {r: store.get(f"failed/{r}").decode() for r in range(self.size) if store.check([f"failed/{r}"])}
        hosts = {r: store.get(f"host/{r}").decode() for r in range(self.size) if store.check([f"host/{r}"])}
        said = []
        if silent:
            one = len(silent) == 1
            said.append(f"lost {_named(silent, hosts)}: a collective failed on rank {self.rank} ({reason}) and "
                        f"{'it does' if one else 'they do'} not answer within {self.answer_within:g} s")
        for r, text in failed.items():
            said.append(f"{_named([r], hosts)} failed with {text}")
        if not said:
            said.append(f"a collective failed on rank {self.rank} ({reason}), yet every rank answered: a rank is "
                        f"alive but did not reach the collective within run.dist_timeout")
        return "; ".join(said) + "."
