"""The thread policy: a census of live lorafed processes shares the cores (lorafed.threads)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from lorafed import threads
from tests.conftest import ROOT


def _pid_file(folder: Path, pid: int, started: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / str(pid)
    path.write_text(f"{started}\n", encoding="ascii")
    return path


@pytest.fixture
def sleeper():
    """A live process that is not this one (killed after the test)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def keep_threads():
    """Restore torch's intra-op threads after a test that sets them."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_choose_threads_auto_explicit_and_omp() -> None:
    # auto: cores // processes, at least 1
    assert threads.choose_threads(0, processes=2, cores=8, environ={}).threads == 4
    assert threads.choose_threads(0, processes=3, cores=8, environ={}).threads == 2
    assert threads.choose_threads(0, processes=5, cores=2, environ={}).threads == 1
    # an explicit train.num_threads wins over the census and the environment
    explicit = threads.choose_threads(3, processes=2, cores=8, environ={"OMP_NUM_THREADS": "1"})
    assert (explicit.threads, explicit.source) == (3, "train.num_threads")
    # OMP_NUM_THREADS set by the user wins over auto, and the log says so
    omp = threads.choose_threads(0, processes=2, cores=8, environ={"OMP_NUM_THREADS": "6"})
    assert (omp.threads, omp.source) == (6, "OMP_NUM_THREADS")
    assert "OMP_NUM_THREADS=6 in the environment wins over train.num_threads: 0 (auto)" in omp.describe()
    # an unusable OMP_NUM_THREADS is ignored
    assert threads.choose_threads(0, processes=1, cores=4, environ={"OMP_NUM_THREADS": "x"}).threads == 4


def test_describe_names_share_cores_and_processes() -> None:
    line = threads.ThreadChoice(1, 2, 2, "auto").describe()
    assert line == "torch threads: 1 of 2 cores (2 lorafed processes on this machine)"
    assert threads.ThreadChoice(2, 2, 1, "auto").describe().endswith("(1 lorafed process on this machine)")


def test_two_live_processes_get_half_the_cores(tmp_path, sleeper, monkeypatch, keep_threads, caplog) -> None:
    folder = tmp_path / "procs"
    _pid_file(folder, sleeper.pid, psutil.Process(sleeper.pid).create_time())
    monkeypatch.setattr(threads, "cores_available", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with caplog.at_level(logging.INFO, logger="lorafed.threads"):
        choice = threads.use_threads(0, folder)
    assert (choice.threads, choice.processes, choice.source) == (2, 2, "auto")
    assert torch.get_num_threads() == 2
    assert (folder / str(os.getpid())).is_file()  # this process joined the census
    assert "torch threads: 2 of 4 cores (2 lorafed processes on this machine)" in caplog.text
    # a second call with nothing changed says nothing more
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorafed.threads"):
        assert threads.use_threads(0, folder).threads == 2
    assert "torch threads" not in caplog.text
    # the other process ends: the next round takes every core again
    sleeper.kill()
    sleeper.wait()
    assert threads.use_threads(0, folder).threads == 4
    assert not (folder / str(sleeper.pid)).exists()  # its stale pid file was removed
    (folder / str(os.getpid())).unlink()


def test_dead_and_reused_pids_are_ignored(tmp_path, sleeper) -> None:
    folder = tmp_path / "procs"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    _pid_file(folder, dead, 1.0)
    # a live pid whose start time is not the recorded one: the pid was reused by another process
    _pid_file(folder, sleeper.pid, psutil.Process(sleeper.pid).create_time() - 3600)
    (folder / "notes.txt").write_text("not a pid file")
    if psutil.pid_exists(dead):  # the pid was reused already: nothing left to test for it
        pytest.skip("the dead process's pid was reused")
    assert threads.live_processes(folder) == 1  # none live (at least 1: the caller itself)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_explicit_setting_wins_but_still_counts(tmp_path, sleeper, monkeypatch, keep_threads) -> None:
    folder = tmp_path / "procs"
    _pid_file(folder, sleeper.pid, psutil.Process(sleeper.pid).create_time())
    monkeypatch.setattr(threads, "cores_available", lambda: 4)
    choice = threads.use_threads(3, folder)
    assert (choice.threads, choice.source, choice.processes) == (3, "train.num_threads", 2)
    assert torch.get_num_threads() == 3
    (folder / str(os.getpid())).unlink()


def test_census_folder_order(tmp_path) -> None:
    assert threads.census_folder({threads.CENSUS_ENV: str(tmp_path / "x")}) == tmp_path / "x"
    assert threads.census_folder({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "lorafed" / "procs"
    fallback = threads.census_folder({"XDG_RUNTIME_DIR": str(tmp_path / "missing")})
    assert fallback.parts[-1] == "procs" and fallback.parts[-2].startswith("lorafed-")


def test_a_process_leaves_the_census_at_exit(tmp_path) -> None:
    folder = tmp_path / "procs"
    code = "from lorafed.threads import use_threads; import os; print(use_threads(0).processes, os.getpid())"
    env = {**os.environ, threads.CENSUS_ENV: str(folder), "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    processes, _pid = out.stdout.split()
    assert processes == "1"
    assert folder.is_dir() and list(folder.iterdir()) == []  # its pid file went with it
