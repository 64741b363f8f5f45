"""What the benchmark scripts share: peak memory, timings and their summaries, targets, result files.

The scripts in ``scripts/`` measure the library (memory, speed, quality, reliability); this
module holds the measuring and reporting they have in common, so each script keeps only what it
measures. Nothing here changes how lorafed trains or aggregates.

Peak memory is the kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``),
reset through ``/proc/self/clear_refs``; where ``/proc`` is absent (not Linux) the peak falls back
to ``ru_maxrss``, which cannot be reset.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafed.files import atomic_write_json, atomic_write_text

#: Bytes -> MiB.
MB = 1 / 2**20
#: The lock every heavy benchmark takes, so two of them never share the cores.
HEAVY_LOCK = "/tmp/lorafed-heavy.lock"


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    now = _status_bytes("VmRSS")
    if now is None:
        import psutil

        return int(psutil.Process().memory_info().rss)
    return now


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark since the last :func:`reset_peak_rss`, in bytes."""
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter from the current RSS (Linux: write 5 to ``/proc/self/clear_refs``).

    Returns:
        Whether it was reset (``False`` where the kernel offers no reset: the peak then covers
        the whole process).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def summarize(values: Sequence[float], runs: bool = False) -> dict[str, Any]:
    """Median, mean, sample standard deviation (0 for one value), min, max and count.

    Args:
        values: The measurements (at least one).
        runs: Also keep the raw values under ``runs``.
    """
    vals = [float(v) for v in values]
    out: dict[str, Any] = {
        "median": statistics.median(vals),
        "mean": statistics.mean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }
    if runs:
        out["runs"] = vals
    return out


def time_runs(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``, after ``warmup`` calls that are not counted."""
    times = []
    for i in range(warmup + reps):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def fmt_range(s: Mapping[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max)`` of a :func:`summarize` result, times ``scale``."""
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def target(name: str, value: float, met: bool, **details: Any) -> dict[str, Any]:
    """One judged target of a report: ``{"target", "value", "met", **details}``.

    Args:
        name: What was aimed at, in words (e.g. ``"peak memory <= 0.6x fp32"``).
        value: The measured number the target is judged on.
        met: Whether it was reached.
        **details: Anything the report shows beside it (the variant, the setting, a sentence).
    """
    return {"target": name, "value": value, "met": bool(met), **details}


def met_word(met: bool) -> str:
    """``met`` or ``NOT met``, as the reports print a target."""
    return "met" if met else "NOT met"


def write_results(stem: str | Path, result: Mapping[str, Any], markdown: str | Sequence[str]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (each atomically), creating the folder.

    Args:
        stem: The path without suffix, e.g. ``results/quality``.
        result: The JSON-able results.
        markdown: The report, as text or as lines (joined with newlines, ending in one).

    Returns:
        The JSON and Markdown paths.
    """
    stem = Path(stem)
    text = markdown if isinstance(markdown, str) else "\n".join(markdown)
    json_path = atomic_write_json(stem.with_name(stem.name + ".json"), dict(result))
    md_path = atomic_write_text(stem.with_name(stem.name + ".md"), text.rstrip("\n") + "\n")
    return json_path, md_path


def commands(report: Mapping[str, Any]) -> list[str]:
    """A results report's reproduce command(s): its ``command``, one string or (after a merge) a list."""
    c = report["command"]
    return [c] if isinstance(c, str) else list(c)


def command_settings(command: str, every: Iterable[str]) -> set[str]:
    """The settings a benchmark command ran: its ``--settings a,b`` value, or ``every`` setting without one."""
    words = command.split()
    at = words.index("--settings") + 1 if "--settings" in words else len(words)
    return set(words[at].split(",")) if at < len(words) else set(every)


def command_line(script: str, args: Sequence[str] = (), python: str = "env PYTHONPATH=. python") -> str:
    """How to reproduce a benchmark: ``flock <lock> <python> scripts/<script> <args>``.

    Args:
        script: The script's file name in ``scripts/``.
        args: Its arguments (quoted for a shell).
        python: The interpreter part of the line.
    """
    return " ".join(filter(None, ["flock", HEAVY_LOCK, python, shlex.join([f"scripts/{script}", *args])]))


def pythonpath_env(*paths: str | Path) -> dict[str, str]:
    """This environment with ``paths`` put first on ``PYTHONPATH`` (for a benchmark's child processes)."""
    parts = [str(p) for p in paths] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


def random_bert(folder: str | Path, seed: int = 0, **sizes: int) -> Path:
    """A randomly initialised BERT with the packaged tokenizer, built once and kept in ``folder``.

    Args:
        folder: Where the model is kept; an existing one (with ``config.json``) is reused.
        seed: Seeds the initial weights.
        **sizes: ``BertConfig`` sizes (``hidden_size``, ``num_hidden_layers``...).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorafed.config import PACKAGED_BACKBONE
    from lorafed.model.backbone import resolve_backbone

    tok = AutoTokenizer.from_pretrained(resolve_backbone(PACKAGED_BACKBONE))
    torch.manual_seed(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    BertModel(BertConfig(vocab_size=tok.vocab_size, **sizes)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder
