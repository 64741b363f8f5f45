"""Run every reliability check for real and write results/reliability.{json,md}: each case, its class and verdict.

    flock /tmp/lorafed-heavy.lock python scripts/reliability.py            # everything
    python scripts/reliability.py --corpus-only                            # without the simulator checks

Three parts:

- the hostile corpus: every case of ``tests/test_hostile.py`` (payloads, run through pytest, one
  outcome per parametrized case) and of ``tests/test_hostile_inputs.py`` (configs and data files,
  run here from its case tables), each classified as *rejected with a named reason*, *handled as
  specified* (a bound applied, e.g. a capped weight), *traceback* (an unnamed exception),
  *silently accepted*, *data lost* (honest updates or rows dropped) or *rejected, unexpected
  reason*;
- named payload and data checks through the server's round (``aggregate_files``) and
  ``load_labeled``;
- dropout, timeout and crash-resume checks through the simulator on the tiny model.

The report's targets: 0 tracebacks, 0 silently accepted, 0 data lost, and every rejection case
rejected with a named reason.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
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


REJECTED = "rejected with a named reason"
HANDLED = "handled as specified"
TRACEBACK = "traceback"
ACCEPTED = "silently accepted"
LOST = "data lost"
WRONG = "rejected, unexpected reason"
CLASSES = (REJECTED, HANDLED, TRACEBACK, ACCEPTED, LOST, WRONG)

#: tests/test_hostile.py functions whose cases check a bound or a handling, not a rejection.
HANDLED_TESTS = {
    "test_block_size_65536_on_tiny_tensors_decodes_in_small_memory",
    "test_near_limit_values_with_big_weights_never_overflow",
    "test_max_share_clips_an_inflated_weight",
    "test_cap_shares",
    "test_random_byte_flips_never_raise",
    "test_file_drop_records_links_misnamed_and_duplicate_files",
    "test_two_names_for_one_file_never_overwrite",
    "test_atomic_writes_follow_the_umask",
    "test_csv_labels_that_look_missing_stay_strings",
}


def _short(text: object, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit] + " ..."


def _classify_failure(exc: BaseException, in_honest_round: bool) -> str:
    """The class of a failed corpus case, from the exception its test ended with."""
    text = str(exc)
    if "DID NOT RAISE" in text:
        return ACCEPTED
    if isinstance(exc, AssertionError) and "Regex pattern did not match" in text:
        return WRONG
    if isinstance(exc, AssertionError):
        if in_honest_round:
            return ACCEPTED if "rejected" in text else LOST
        return LOST
    return TRACEBACK


class _PytestCorpus:
    """pytest plugin: one row per test case of a file, with its class and verdict."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Any:
        outcome = yield
        rep = outcome.get_result()
        if rep.when != "call" and not rep.failed:
            return
        func = item.originalname or item.name
        expected = HANDLED if func in HANDLED_TESTS else REJECTED
        if rep.passed:
            klass, happened = expected, "as asserted"
        elif rep.skipped:
            klass, happened = "skipped", _short(rep.longrepr)
        else:
            exc = call.excinfo.value
            honest = any(entry.name == "honest_round" for entry in call.excinfo.traceback)
            klass, happened = _classify_failure(exc, honest), f"{type(exc).__name__}: {_short(exc)}"
        self.rows.append(
            {
                "case": item.name,
                "source": "tests/test_hostile.py",
                "class": klass,
                "expected": expected,
                "verdict": "pass" if klass == expected else "FAIL",
                "happened": happened,
                "seconds": round(rep.duration, 3),
            }
        )


def hostile_payload_corpus() -> list[dict[str, Any]]:
    """Every case of ``tests/test_hostile.py``, run by pytest in this process."""
    plugin = _PytestCorpus()
    pytest.main(["-qq", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_hostile.py")], plugins=[plugin])
    return plugin.rows


def hostile_input_corpus() -> list[dict[str, Any]]:
    """Every config and data case of ``tests/test_hostile_inputs.py``, run here and classified."""
    import re

    import test_hostile_inputs as hi

    from lorafed.errors import ConfigError, DataError

    rows = []
    groups = [
        ("config", hi.CONFIG_CASES, ConfigError, hi.run_config_case),
        ("data", hi.DATA_CASES, DataError, hi.run_data_case),
    ]
    for kind, cases_, error, run in groups:
        for case in cases_:
            folder = Path(tempfile.mkdtemp(dir=W))
            t = time.perf_counter()
            try:
                run(case, folder)
                klass, happened = ACCEPTED, "loaded without an error"
            except LorafedError as exc:
                message = str(exc)
                named = isinstance(exc, error) and re.search(case.match, message) and message.startswith(str(folder))
                klass = REJECTED if named else WRONG
                happened = f"{type(exc).__name__}: {_short(message.replace(str(folder) + '/', ''))}"
            except Exception as exc:  # an unnamed exception: the finding this corpus looks for
                klass, happened = TRACEBACK, f"{type(exc).__name__}: {_short(exc)}"
            seconds = time.perf_counter() - t
            if seconds > hi.TIME_BOUND_S and klass == REJECTED:
                klass, happened = WRONG, f"{happened} (took {seconds:.1f} s, over {hi.TIME_BOUND_S} s)"
            rows.append(
                {
                    "case": f"{kind}: {case.name}",
                    "source": "tests/test_hostile_inputs.py",
                    "class": klass,
                    "expected": REJECTED,
                    "verdict": "pass" if klass == REJECTED else "FAIL",
                    "happened": happened,
                    "seconds": round(seconds, 3),
                }
            )
    for name, check in hi.HANDLED_CASES.items():
        t = time.perf_counter()
        try:
            ok, happened = check(Path(tempfile.mkdtemp(dir=W)))
            klass = HANDLED if ok else LOST
        except LorafedError as exc:
            klass, happened = WRONG, f"{type(exc).__name__}: {_short(exc)}"
        except Exception as exc:
            klass, happened = TRACEBACK, f"{type(exc).__name__}: {_short(exc)}"
        rows.append(
            {
                "case": f"data: {name}",
                "source": "tests/test_hostile_inputs.py",
                "class": klass,
                "expected": HANDLED,
                "verdict": "pass" if klass == HANDLED else "FAIL",
                "happened": _short(happened),
                "seconds": round(time.perf_counter() - t, 3),
            }
        )
    return rows


def _legacy_class(case: str, expected: str, happened: str, ok: bool) -> tuple[str, str]:
    """Class of one of the named checks below: (expected class, class found)."""
    rejection = case.startswith(("payload:", "data:")) and "skip" not in expected
    want = REJECTED if rejection else HANDLED
    if ok:
        return want, want
    if happened.startswith("crashed:"):
        return want, TRACEBACK
    if rejection and happened.startswith(("accepted", "loaded")):
        return want, ACCEPTED
    return want, WRONG if rejection else LOST


def named_checks(base: list[str] | None) -> list[dict[str, Any]]:
    """The named payload, data, dropout and crash checks (the simulator ones only with ``base``)."""
    rows = []
    for case, expected, fn in cases(base or []):
        if base is None and not case.startswith(("payload:", "data:", "round with")):
            continue
        t = time.perf_counter()
        try:
            happened, ok = fn()
        except Exception as exc:  # a crash is a finding: record it as a failure
            happened, ok = f"crashed: {type(exc).__name__}: {exc}", False
        want, klass = _legacy_class(case, expected, happened, ok)
        rows.append(
            {
                "case": case,
                "source": "scripts/reliability.py",
                "class": klass,
                "expected": f"{want}: {expected}",
                "verdict": "pass" if ok else "FAIL",
                "happened": happened,
                "seconds": round(time.perf_counter() - t, 3),
            }
        )
        print(("PASS " if ok else "FAIL ") + case, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--corpus-only", action="store_true", help="skip the simulator checks (dropout, timeout, SIGKILL + resume)"
    )
    ap.add_argument("--out", default=str(ROOT / "results" / "reliability"), help="output stem (.json and .md)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = hostile_payload_corpus() + hostile_input_corpus()
    print(f"hostile corpus: {len(rows)} cases, {sum(r['verdict'] == 'pass' for r in rows)} as expected", flush=True)
    base = None
    if not args.corpus_only:
        model_dir, csv = make_tiny(W, rows=240)
        base = tiny_overrides(model_dir, csv)
    rows += named_checks(base)
    count = {k: sum(r["class"] == k for r in rows) for k in CLASSES}
    to_reject = sum(r["expected"].startswith(REJECTED) for r in rows)
    targets = [
        lm.target("tracebacks (unnamed exceptions) = 0", count[TRACEBACK], count[TRACEBACK] == 0),
        lm.target("silently accepted = 0", count[ACCEPTED], count[ACCEPTED] == 0),
        lm.target("data lost = 0", count[LOST], count[LOST] == 0),
        lm.target("rejected with an unexpected reason = 0", count[WRONG], count[WRONG] == 0),
        lm.target(
            f"rejected with a named reason = every rejection case ({to_reject})",
            count[REJECTED],
            count[REJECTED] == to_reject,
        ),
    ]
    command = lm.command_line("reliability.py", ["--corpus-only"] if args.corpus_only else [], python="python")
    result = {
        "command": command,
        "seconds": round(time.perf_counter() - t0, 1),
        "cases_tried": len(rows),
        "by_class": count,
        "passed": sum(r["verdict"] == "pass" for r in rows),
        "targets": targets,
        "cases": rows,
    }
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "# Reliability checks",
        "",
        f"{len(rows)} hostile or faulty cases tried, {result['passed']} as expected, in {result['seconds']} s. "
        f"Generated by running each case; reproduce: `{command}`",
        "",
        "Sources: every parametrized case of `tests/test_hostile.py` (payloads, files, storage) and of "
        "`tests/test_hostile_inputs.py` (configs, data files), plus the named checks of `scripts/reliability.py` "
        "(payloads through `aggregate_files`, data through `load_labeled`, dropout, timeouts, SIGKILL + resume "
        "on the tiny model).",
        "",
        "| target | value | |",
        "|---|---:|---|",
        *[f"| {t['target']} | {t['value']} | {lm.met_word(t['met'])} |" for t in targets],
        "",
        "| class | cases |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in count.items()],
        "",
        "| case | source | class | verdict | what happened |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {esc(r['case'])} | {r['source']} | {r['class']} | {r['verdict']} | {esc(r['happened'])} |" for r in rows
    ]
    lm.write_results(Path(args.out), result, lines)
    print(f"wrote {args.out}.json and .md: " + ", ".join(f"{k} {v}" for k, v in count.items()))


if __name__ == "__main__":
    main()
