"""Run every reliability check for real and write results/reliability.{json,md}: case, what happened, expected, pass.

    flock /tmp/lorafed-heavy.lock python scripts/reliability.py

Payload cases go through the server's round (``aggregate_files``), data cases through
``load_labeled``, dropout and crash cases through the simulator on the tiny model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _tiny import make_tiny, tiny_overrides  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

import lorafed.measure as lm  # noqa: E402
from lorafed.config import DataConfig, load_config, save_config  # noqa: E402
from lorafed.data.clean import load_labeled  # noqa: E402
from lorafed.engine.faults import delay_clients, fail_clients  # noqa: E402
from lorafed.engine.inprocess import simulate  # noqa: E402
from lorafed.engine.record import read_metrics  # noqa: E402
from lorafed.errors import LorafedError  # noqa: E402
from lorafed.server.fold import aggregate_files  # noqa: E402
from lorafed.server.validate import UpdateSpec  # noqa: E402
from lorafed.wire.adapter import adapter_spec  # noqa: E402
from lorafed.wire.payload import ModelIdentity, PayloadMeta, save_payload  # noqa: E402
from lorafed.wire.reader import load_payload  # noqa: E402

W = Path(tempfile.mkdtemp(prefix="lorafed-reliability-"))
LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["query"]}
_GEN = torch.Generator().manual_seed(0)  # the same tensors every run
T0 = {
    "m.lora_A.weight": torch.randn(2, 8, generator=_GEN),
    "m.lora_B.weight": torch.randn(8, 2, generator=_GEN),
    "classifier.weight": torch.randn(3, 8, generator=_GEN),
}
SPEC = UpdateSpec("fp", LORA, ("a", "b", "c"), adapter_spec(T0), round=1, max_num_examples=10_000)


class Marker:
    """Unpickling it creates a file: the proof of execution."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def meta(cid: str, **kw: Any) -> PayloadMeta:
    """A round-1 header of client ``cid`` with 10 examples, then the fields in ``kw`` changed."""
    return dataclasses.replace(ModelIdentity("fp", LORA, ("a", "b", "c")).meta(cid, 1, 10), **kw)


def upd(cid: str, tensors=None, **kw) -> Path:
    return save_payload(W / f"{cid}.safetensors", T0 if tensors is None else tensors, meta(cid, **kw))


def raw(cid: str, data: bytes) -> Path:
    (p := W / f"{cid}.safetensors").write_bytes(data)
    return p


def rejected(path: Path, *needles: str) -> tuple[str, bool]:
    out = aggregate_files([path], SPEC)
    reason = out.rejected[0][1] if out.rejected else "accepted"
    return reason.replace(str(W) + "/", ""), out.state is None and all(n in reason for n in needles)


def with_tensor(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**T0, name: value}


def nan_tensors(v: float) -> dict[str, torch.Tensor]:
    t = T0["classifier.weight"].clone()
    t[0, 0] = v
    return with_tensor("classifier.weight", t)


def wrong_dtype() -> Path:
    header = {**meta("c_dtype").__dict__, "labels": ["a", "b", "c"]}
    t = with_tensor("m.lora_B.weight", T0["m.lora_B.weight"].half())
    return raw("c_dtype", st_save(t, metadata={"lorafed": json.dumps(header)}))


def exec_case(make: Callable[[Path], bytes], cid: str) -> tuple[str, bool]:
    marker = W / f"{cid}.pwned"
    reason, ok = rejected(raw(cid, make(marker)), "refused without loading it")
    return f"{reason}; marker file created: {marker.exists()}", ok and not marker.exists()


def torch_saved(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1), "x": Marker(str(marker))}, buf)
    return buf.getvalue()


def mixed_round() -> tuple[str, bool]:
    good = [upd(f"g{i}", {k: v + i for k, v in T0.items()}, num_examples=10 * (i + 1)) for i in range(3)]
    bad = [upd("b_round", round=2), upd("b_nan", nan_tensors(float("nan"))), raw("b_pickle", pickle.dumps([1]))]
    out = aggregate_files([*good, *bad], SPEC, min_clients=3)
    oracle = np.average(np.stack([T0["classifier.weight"].numpy() + i for i in range(3)]), axis=0, weights=[10, 20, 30])
    close = out.state is not None and np.allclose(out.state["classifier.weight"].numpy(), oracle, rtol=1e-6, atol=1e-6)
    names = sorted(m.client_id for _, m in out.accepted)
    return f"accepted {names}, rejected {len(out.rejected)}, state == np.average(valid): {close}", close and len(
        out.rejected
    ) == 3


def data_case(body: bytes, needles: tuple[str, ...], **kw) -> tuple[str, bool]:
    p = W / "data.csv"
    p.write_bytes(body)
    try:
        d = load_labeled(DataConfig(path=str(p), **kw), 0)
        return f"loaded {len(d)} rows, dropped {d.dropped}", all(n in str(d.dropped) for n in needles)
    except LorafedError as exc:
        return str(exc).replace(str(W) + "/", ""), all(n in str(exc) for n in needles)


HEAD = b"text,label\n"
GOOD = b"".join(b"row %d fine,%s\n" % (i, b"ab"[i % 2 : i % 2 + 1]) for i in range(6))


def sim_case(base: list[str], overrides: list[str], fn, name: str) -> tuple[list[dict] | str, Path]:
    out = W / name
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml", [*base, "partition.num_clients=3", "federation.rounds=1", *overrides]
    )
    try:
        simulate(cfg, out, progress=False, client_fn=fn)
    except LorafedError as exc:
        return str(exc), out
    return read_metrics(out / "metrics.jsonl"), out


def kill_resume(base: list[str]) -> tuple[str, bool]:
    rounds = 6
    over = [*base, f"federation.rounds={rounds}", "train.max_steps=12", "partition.num_clients=3"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    simulate(cfg, W / "ref", progress=False)
    save_config(cfg, W / "run.yaml")
    run = W / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lorafed", "simulate", "--no-progress"]
    rng, kills = random.Random(1), []
    for i in range(3):
        lines = lambda: len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0  # noqa: E731
        before = lines()
        args = ["--config", str(W / "run.yaml"), "--out", str(run)] if i == 0 else ["--resume", str(run)]
        proc = subprocess.Popen([*cmd, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while lines() <= before and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(lines() - 1)
        proc.wait()
    done = subprocess.run([*cmd, "--resume", str(run)], env=env, capture_output=True)
    got = load_payload(run / "rounds" / f"global_r{rounds}.safetensors").tensors
    want = load_payload(W / "ref" / "rounds" / f"global_r{rounds}.safetensors").tensors
    equal = all(torch.equal(got[k], want[k]) for k in want)
    seq = [r["round"] for r in read_metrics(run / "metrics.jsonl")]
    ok = done.returncode == 0 and equal and seq == list(range(rounds + 1)) and len(kills) >= 2
    return (
        f"{len(kills)} SIGKILLs (after rounds {kills}), resumed: rounds {seq}, final adapter bitwise equal: {equal}",
        ok,
    )


def cases(base: list[str]) -> list[tuple[str, str, Callable[[], tuple[str, bool]]]]:
    fail1 = fail_clients(["client1"])
    return [
        (
            "payload: wrong base fingerprint",
            "rejected naming client + base_fingerprint",
            lambda: rejected(upd("c_fp", base_fingerprint="other"), "'c_fp'", "base_fingerprint: expected fp"),
        ),
        (
            "payload: wrong LoRA config",
            "rejected naming client + lora r",
            lambda: rejected(upd("c_lora", lora={**LORA, "r": 4}), "'c_lora'", "lora config r: expected {'r': 2}"),
        ),
        (
            "payload: missing tensor",
            "rejected naming the tensor",
            lambda: rejected(
                upd("c_miss", {k: v for k, v in T0.items() if k != "classifier.weight"}),
                "tensor classifier.weight: expected present",
            ),
        ),
        (
            "payload: extra tensor",
            "rejected naming the tensor",
            lambda: rejected(upd("c_extra", with_tensor("evil", torch.ones(1))), "tensor evil: expected absent"),
        ),
        (
            "payload: wrong shape",
            "rejected naming tensor + shapes",
            lambda: rejected(upd("c_shape", with_tensor("classifier.weight", torch.ones(4, 8))), "expected (3, 8)"),
        ),
        (
            "payload: wrong dtype",
            "rejected naming tensor + dtypes",
            lambda: rejected(
                wrong_dtype(), "m.lora_B.weight dtype: expected float32 (transport float32), received float16"
            ),
        ),
        (
            "payload: NaN values",
            "rejected (finite expected)",
            lambda: rejected(upd("c_nan", nan_tensors(float("nan"))), "expected finite, received 1 NaN/Inf"),
        ),
        (
            "payload: Inf values",
            "rejected (finite expected)",
            lambda: rejected(upd("c_inf", nan_tensors(float("inf"))), "expected finite, received 1 NaN/Inf"),
        ),
        (
            "payload: num_examples = 0",
            "rejected with the allowed range",
            lambda: rejected(upd("c_n0", num_examples=0), "num_examples: expected an integer in [1, 10000]"),
        ),
        (
            "payload: num_examples absurd (1e9 > bound)",
            "rejected with the allowed range",
            lambda: rejected(upd("c_nbig", num_examples=10**9), "received 1000000000"),
        ),
        (
            "payload: wrong round",
            "rejected: expected 1",
            lambda: rejected(upd("c_round", round=5), "round: expected 1, received 5"),
        ),
        (
            "payload: truncated file",
            "refused as truncated/corrupted",
            lambda: rejected(raw("c_trunc", upd("c_t2").read_bytes()[:-50]), "corrupted safetensors data"),
        ),
        (
            "payload: corrupted header",
            "refused: header not JSON",
            lambda: rejected(raw("c_head", b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{" * 32), "corrupted header"),
        ),
        (
            "payload: header larger than the bound",
            "refused before parsing",
            lambda: rejected(raw("c_big", struct.pack("<Q", 1 << 33) + b"{}"), "exceeds the bound of 1048576"),
        ),
        (
            "payload: pickle renamed .safetensors",
            "refused, nothing executed",
            lambda: exec_case(lambda m: pickle.dumps(Marker(str(m))), "c_pickle"),
        ),
        (
            "payload: torch.save renamed .safetensors",
            "refused, nothing executed",
            lambda: exec_case(torch_saved, "c_torch"),
        ),
        (
            "payload: same client id twice in a round",
            "both rejected",
            lambda: (
                lambda out: (out.rejected[0][1].replace(str(W) + "/", ""), out.state is None and len(out.rejected) == 2)
            )(aggregate_files([upd("twin"), save_payload(W / "twin2.safetensors", T0, meta("twin"))], SPEC)),
        ),
        ("round with 3 valid + 3 bad updates", "round completes with the 3 valid ones", mixed_round),
        (
            "data: malformed CSV row",
            "DataError naming the line",
            lambda: data_case(HEAD + GOOD + b"a,b,c\n", ("data.csv", "malformed CSV at line 8")),
        ),
        (
            "data: malformed rows with bad_lines=skip",
            "counted skip",
            lambda: data_case(HEAD + GOOD + b"a,b,c\n", ("malformed CSV lines (8)",), bad_lines="skip"),
        ),
        (
            "data: wrong encoding (latin-1 in utf-8)",
            "DataError naming the line",
            lambda: data_case(HEAD + GOOD + "caf\u00e9,a\n".encode("latin-1"), ("not valid utf-8 text at line 8",)),
        ),
        (
            "data: empty text (missing=error)",
            "DataError naming row + column",
            lambda: data_case(HEAD + GOOD + b'"  ",a\n', ("row 7", "'text'", "empty or missing text"), missing="error"),
        ),
        (
            "data: empty text (missing=drop)",
            "counted skip",
            lambda: data_case(HEAD + GOOD + b'"  ",a\n', ("empty or missing text in 'text'",)),
        ),
        (
            "data: label not in data.labels",
            "DataError naming row + column",
            lambda: data_case(
                HEAD + GOOD + b"x,zzz\n",
                ("row 7", "label 'zzz' is not in data.labels"),
                labels=("a", "b"),
                missing="error",
            ),
        ),
        (
            "data: missing column",
            "DataError naming the column",
            lambda: data_case(HEAD + GOOD, ("column 'review': column not found",), text_column="review"),
        ),
        ("data: empty file", "DataError", lambda: data_case(b"", ("file is empty",))),
        (
            "data: huge field (5000 chars, bound 1000)",
            "DataError naming row + column",
            lambda: data_case(
                HEAD + GOOD + b"x" * 5000 + b",a\n",
                ("row 7", "text over 1000 characters"),
                max_chars_per_field=1000,
                missing="error",
            ),
        ),
        (
            "dropout: a client raises (min_clients=2 of 3)",
            "recorded, round completes without it",
            lambda: (
                lambda r: (
                    f"clients {r[0][1]['clients']}, failed {r[0][1]['failed']}",
                    r[0][1]["clients"] == ["client0", "client2"]
                    and not (r[1] / "rounds/r1/client1.safetensors").exists(),
                )
            )(sim_case(base, ["federation.min_clients=2"], fail1, "drop")),
        ),
        (
            "dropout: a client exceeds client_timeout_s",
            "recorded, round completes without it",
            lambda: (
                lambda r: (
                    f"clients {r[0][1]['clients']}, failed {r[0][1]['failed']}",
                    r[0][1]["clients"] == ["client0", "client1"],
                )
            )(
                sim_case(
                    base,
                    ["federation.min_clients=2", "federation.client_timeout_s=0.75"],
                    delay_clients(["client2"], 1.5),
                    "slow",
                )
            ),
        ),
        (
            "dropout: too few clients after retries",
            "round abandoned with a clear error",
            lambda: (
                lambda r: (
                    r[0] if isinstance(r[0], str) else "completed",
                    isinstance(r[0], str) and "abandoned after 2 attempt(s)" in r[0],
                )
            )(sim_case(base, ["federation.min_clients=3", "federation.round_retries=1"], fail1, "abandon")),
        ),
        (
            "crash: SIGKILL at random moments x3, then --resume",
            "same final adapter, rounds 0..R once",
            lambda: kill_resume(base),
        ),
    ]


def main() -> None:
    model_dir, csv = make_tiny(W, rows=240)
    base = tiny_overrides(model_dir, csv)
    results = []
    for case, expected, fn in cases(base):
        try:
            happened, ok = fn()
        except Exception as exc:  # a crash is a finding: record it as a failure
            happened, ok = f"crashed: {type(exc).__name__}: {exc}", False
        results.append({"case": case, "happened": happened, "expected": expected, "pass": bool(ok)})
        print(("PASS " if ok else "FAIL ") + case, flush=True)
    command = lm.command_line("reliability.py", python="python")
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "# Reliability checks",
        "",
        f"{sum(r['pass'] for r in results)}/{len(results)} passed. "
        f"Generated by running each case; reproduce: `{command}`",
        "",
        "| case | what happened | what was expected | result |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {esc(r['case'])} | {esc(r['happened'])} | {esc(r['expected'])} | {'pass' if r['pass'] else 'FAIL'} |"
        for r in results
    ]
    lm.write_results(ROOT / "results" / "reliability", {"command": command, "cases": results}, lines)


if __name__ == "__main__":
    main()
