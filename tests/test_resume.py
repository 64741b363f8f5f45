"""Crash safety: SIGKILL the simulator at random moments, resume, and get the uninterrupted result."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from lorafed.cli import main
from lorafed.config import save_config
from lorafed.engine.inprocess import simulate
from lorafed.engine.record import read_metrics
from lorafed.errors import LorafedError
from lorafed.wire.reader import load_payload

ROUNDS = 8
RUN = (f"federation.rounds={ROUNDS}", "train.max_steps=12", "partition.num_clients=3", "federation.min_clients=2")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_payload(run / "rounds" / f"global_r{ROUNDS}.safetensors").tensors


def test_sigkill_and_resume_match_an_uninterrupted_run(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(*RUN)
    simulate(cfg, tmp_path / "ref", progress=False)
    save_config(cfg, tmp_path / "run.yaml")
    run = tmp_path / "run"
    start = [sys.executable, "-m", "lorafed", "simulate", "--config", str(tmp_path / "run.yaml"), "--out", str(run)]
    resume = [sys.executable, "-m", "lorafed", "simulate", "--resume", str(run)]
    rng = random.Random(7)
    kills = []
    for attempt in range(3):
        before = _lines(run / "metrics.jsonl")
        proc = subprocess.Popen(
            [*(start if attempt == 0 else resume), "--no-progress"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        # Wait for progress (a new completed round), then kill at a random moment of what follows.
        while _lines(run / "metrics.jsonl") <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        delay = rng.uniform(0.0, 0.4)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills.append((_lines(run / "metrics.jsonl"), round(delay, 3)))
        err = proc.communicate(timeout=60)[1].decode()
        assert proc.returncode in (0, -signal.SIGKILL), err
    assert len(kills) >= 2, f"the run finished before it could be killed: {kills}"
    done = subprocess.run([*resume, "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    ref_rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in ref_rows]
    got, want = _final(run), _final(tmp_path / "ref")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: max diff {(got[name] - want[name]).abs().max()}"
    assert json.loads((run / "summary.json").read_text())["final_round"] == ROUNDS
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"


def test_resume_redoes_a_partial_round(tiny_config, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config("federation.rounds=3")
    simulate(cfg, tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    simulate(cfg, run, progress=False)
    # Simulate a crash inside round 3: its metrics line is gone, its files half there.
    rows = read_metrics(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (run / "rounds" / "r3" / "client0.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="lorafed"):
        simulate(cfg, run, progress=False, resume=True)
    assert f"resuming {run} after round 2" in caplog.text
    assert [r["round"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3]
    got = load_payload(run / "rounds" / "global_r3.safetensors").tensors
    want = load_payload(tmp_path / "ref" / "rounds" / "global_r3.safetensors").tensors
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_errors(tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml, so not a run folder" in capsys.readouterr().err
    cfg = tiny_config("federation.rounds=1")
    run = tmp_path / "run"
    simulate(cfg, run, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(LorafedError, match=r"metrics.jsonl: line 1 is round 1, expected round 0"):
        simulate(cfg, run, progress=False, resume=True)
    (run / "metrics.jsonl").write_text('{"round": 0\n')
    with pytest.raises(LorafedError, match=r"metrics.jsonl: line 1 is not valid JSON"):
        simulate(cfg, run, progress=False, resume=True)
    # A global adapter from another LoRA config is refused, naming the field.
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LorafedError, match=r"global_r1.safetensors\) rejected: lora config r: expected \{'r': 8\}"):
        simulate(tiny_config("federation.rounds=1", "model.lora.r=8"), run, progress=False, resume=True)


def test_continued_iteration_with_new_clients_keeps_the_lineage(tiny_config, tmp_path: Path) -> None:
    import hashlib

    run = tmp_path / "run"
    simulate(tiny_config("federation.rounds=2", "partition.num_clients=2", "federation.min_clients=2"), run, False)
    later = tiny_config("federation.rounds=4", "partition.num_clients=3", "federation.min_clients=2")
    simulate(later, run, progress=False, resume=True)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [len(r["clients"]) for r in rows] == [0, 2, 2, 3, 3]  # a third party joined for rounds 3-4
    metas = [load_payload(run / "rounds" / f"global_r{r}.safetensors").meta for r in range(5)]
    assert len({m.metrics["run"] for m in metas}) == 1  # one run id across the resume
    for r in range(1, 5):
        parent = (run / "rounds" / f"global_r{r - 1}.safetensors").read_bytes()
        assert metas[r].metrics["parent_round"] == r - 1
        assert metas[r].metrics["parent"] == hashlib.sha256(parent).hexdigest()


def test_inspect_lineage_walks_back_to_round_0(tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    simulate(tiny_config("federation.rounds=2"), run, progress=False)
    assert main(["inspect", str(run / "rounds" / "global_r2.safetensors"), "--lineage"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.split("lineage (newest first):")[1].splitlines() if line.strip()]
    assert [line.split()[1] for line in lines] == ["2", "1", "0"] and lines[-1].split()[4] == "root"


def test_cli_resume_with_new_data_and_clients_then_inspect(
    tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lorafed simulate --resume` later, on a new data file with a third party: `inspect --lineage` shows one chain."""
    from conftest import write_synthetic_csv

    run = tmp_path / "run"
    simulate(tiny_config("federation.rounds=1", "partition.num_clients=2"), run, progress=False)
    newer = write_synthetic_csv(tmp_path / "newer.csv", n=360, seed=9)
    args = ["simulate", "--resume", str(run), "--no-progress", f"data.path={newer}", "federation.rounds=3"]
    assert main([*args, "partition.num_clients=3"]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [len(r["clients"]) for r in rows] == [0, 2, 3, 3]
    assert str(newer) in (run / "config.yaml").read_text()  # the resumed run's config is the one on record
    capsys.readouterr()
    assert main(["inspect", str(run / "rounds" / "global_r3.safetensors"), "--lineage"]) == 0
    lines = [x for x in capsys.readouterr().out.split("lineage (newest first):")[1].splitlines() if x.strip()]
    assert [x.split()[1] for x in lines] == ["3", "2", "1", "0"] and lines[-1].split()[4] == "root"
    assert len({x.split()[3] for x in lines}) == 1  # one run id across the resume
    assert "(round 1)" in lines[1] and "(round 0)" in lines[2]
