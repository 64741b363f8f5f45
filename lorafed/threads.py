"""How many torch threads a lorafed process uses, when several share one machine.

Two torch processes that each run one OpenMP thread per core oversubscribe the cores: each
thread spins at the barriers waiting for threads that are descheduled, and a client round on
2 cores went from 26 s to 505 s when a second training process started. So every lorafed
process that trains or serves joins a **census**: a pid file in a per-user runtime folder
(``$LORAFED_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/lorafed/procs``, else
``<tempdir>/lorafed-<uid>/procs``), removed when the process exits. A pid file whose process is
gone (or whose pid now belongs to a process started later) is ignored and deleted, so a killed
process never holds a share.

``train.num_threads: 0`` (auto) gives each process ``cores // live lorafed processes`` threads
(at least 1), recomputed at the start of every client round, so Flower supernodes, file-drop
pollers, tests and ``lorafed serve`` on one machine split the cores without being told about
each other. An explicit ``train.num_threads`` wins, and so does ``OMP_NUM_THREADS`` set in the
environment (the user's own thread budget). Only the intra-op threads change: torch cannot
change its inter-op pool once it has started.

Nothing happens at import: a process joins the census at its first :func:`use_threads`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

#: Environment variable that names the census folder (tests and benchmarks use a private one).
CENSUS_ENV = "LORAFED_RUNTIME_DIR"
#: Create times closer than this (seconds) are the same process (psutil rounds them).
_SAME_START_S = 1.0


def census_folder(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of this user's pid files (see the module docstring for the order it is chosen in)."""
    env = os.environ if environ is None else environ
    if env.get(CENSUS_ENV):
        return Path(env[CENSUS_ENV])
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "lorafed" / "procs"
    uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"lorafed-{uid}" / "procs"


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it, else every core)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or ``None`` when it is gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # alive, but another user's: its start time is unknown
        return float("nan")


def _usable(folder: Path) -> bool:
    """Create ``folder`` (mode 0700) if needed; refuse one that another user owns."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
        logger.warning("thread census off: %s belongs to another user", folder)
        return False
    return True


def _unregister(path: Path, pid: int) -> None:
    """Remove this process's pid file at exit (not in a forked child, which has another pid)."""
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def register(folder: Path) -> bool:
    """Put this process in the census in ``folder`` (removed at exit).

    Returns:
        Whether it joined now (``False``: it was already in, or the pid file cannot be written).
    """
    pid = os.getpid()
    path = folder / str(pid)
    started = _start_time(pid)
    try:
        if path.is_file() and _same_process(path.read_text(encoding="ascii"), started):
            return False
        tmp = folder / f".{pid}.tmp"  # written whole, then renamed: a reader never sees half a file
        tmp.write_text(f"{started}\n", encoding="ascii")
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("thread census off: cannot write %s: %s", path, exc)
        return False
    atexit.register(_unregister, path, pid)
    return True


def _same_process(recorded: str, started: float | None) -> bool:
    """Whether a pid file's recorded start time is that of the live process ``started``."""
    if started is None:
        return False
    try:
        then = float(recorded.strip())
    except ValueError:
        return False
    if then != then or started != started:  # NaN: unknown start time, trust the pid
        return True
    return abs(then - started) < _SAME_START_S


def live_processes(folder: Path) -> int:
    """Live lorafed processes in the census in ``folder`` (stale pid files are deleted); at least 1."""
    count = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 1
    for path in entries:
        if not path.name.isdigit():
            continue
        try:
            recorded = path.read_text(encoding="ascii")
        except OSError:
            continue
        if _same_process(recorded, _start_time(int(path.name))):
            count += 1
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return max(1, count)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op threads chosen for this process, and why.

    Attributes:
        threads: Threads to use.
        cores: Cores this process may run on.
        processes: Live lorafed processes on this machine (this one included).
        source: ``auto`` (the census share), ``train.num_threads`` (explicit) or
            ``OMP_NUM_THREADS`` (the environment's).
    """

    threads: int
    cores: int
    processes: int
    source: str

    def describe(self) -> str:
        """The log line, e.g. ``torch threads: 1 of 2 cores (2 lorafed processes on this machine)``."""
        census = f"{self.processes} lorafed process{'es' if self.processes > 1 else ''} on this machine"
        if self.source == "auto":
            return f"torch threads: {self.threads} of {self.cores} cores ({census})"
        if self.source == "OMP_NUM_THREADS":
            why = f"OMP_NUM_THREADS={self.threads} in the environment wins over train.num_threads: 0 (auto)"
        else:
            why = f"train.num_threads={self.threads}"
        return f"torch threads: {self.threads} of {self.cores} cores ({why}; {census})"


def choose_threads(
    num_threads: int, processes: int, cores: int, environ: Mapping[str, str] | None = None
) -> ThreadChoice:
    """The thread count for ``train.num_threads`` given the census (pure: no I/O, no torch).

    Args:
        num_threads: ``train.num_threads``; 0 is auto.
        processes: Live lorafed processes on the machine (this one included).
        cores: Cores this process may run on.
        environ: The environment (``OMP_NUM_THREADS``); ``os.environ`` by default.
    """
    if num_threads > 0:
        return ThreadChoice(num_threads, cores, processes, "train.num_threads")
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), cores, processes, "OMP_NUM_THREADS")
    return ThreadChoice(max(1, cores // max(1, processes)), cores, processes, "auto")


def use_threads(num_threads: int, folder: Path | None = None) -> ThreadChoice:
    """Join the census, choose this process's share of the cores and set torch's intra-op threads.

    Call it where a process starts to train or serve and again at the start of every client
    round (a cheap listing of a few files): when a second process starts, both drop to their
    share by their next round. The choice is logged at the first call and whenever it changes.

    Args:
        num_threads: ``train.num_threads``; 0 is auto (see the module docstring).
        folder: The census folder (default: :func:`census_folder`).
    """
    folder = census_folder() if folder is None else folder
    try:
        usable = _usable(folder)
    except OSError as exc:
        logger.debug("thread census off: cannot create %s: %s", folder, exc)
        usable = False
    joined = usable and register(folder)
    processes = live_processes(folder) if usable else 1
    choice = choose_threads(num_threads, processes, cores_available())
    changed = torch.get_num_threads() != choice.threads
    if changed:
        torch.set_num_threads(choice.threads)
    if joined or changed:
        logger.info("%s", choice.describe())
    return choice
