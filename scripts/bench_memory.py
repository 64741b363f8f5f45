"""Client memory benchmark: peak training memory and step time of fp32 vs int8 backbones (CPU).

Every (model, variant) runs in its own fresh process, through ``load_client_model`` (LoRA r=8 on
query/value, fresh head), on one fixed random batch (32 x 64 tokens), AdamW as in ``train_local``:

    fp32                 the fp32 backbone
    bnb int8             model.int8_backend=bitsandbytes (stock LLM.int8 Linear8bitLt)
    int8 linear          model.int8_backend=lorafed, quantize_embeddings=false
    int8 linear+emb      model.int8_backend=lorafed (the default int8)
    fp32 +ckpt           fp32 with train.gradient_checkpointing
    int8 linear+emb +ckpt
    fp32 +bf16 autocast  train.autocast=bf16: bfloat16 matmuls (fp32 weights)
    int8 linear+emb +bf16 autocast
    (full run, MiniLM) fp32 / int8 linear+emb under a tuned glibc allocator, to show its share

Memory = peak RSS during the training steps minus the RSS of the same process before the model
was loaded (the kernel's high-water mark is reset through /proc/self/clear_refs after loading).
The first step also records what autograd saves for backward. Loss after the steps is checked on
the batch in eval mode ("equal accuracy"). Writes results/memory.{json,md,png}.

    flock /tmp/lorafed-heavy.lock env PYTHONPATH=. python scripts/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorafed.measure as lm  # noqa: E402
from lorafed.measure import MB  # noqa: E402

TARGET_MEMORY, TARGET_TIME = 0.6, 1.2


class Variant(NamedTuple):
    """How one variant loads and trains the client model."""

    precision: str
    int8_backend: str = "lorafed"
    quantize_embeddings: bool = False
    gradient_checkpointing: bool = False
    tuned_malloc: bool = False
    bf16_autocast: bool = False


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("fp32"),
    "bnb int8": Variant("int8", "bitsandbytes"),
    "int8 linear": Variant("int8"),
    "int8 linear+emb": Variant("int8", quantize_embeddings=True),
    "fp32 +ckpt": Variant("fp32", gradient_checkpointing=True),
    "int8 linear+emb +ckpt": Variant("int8", quantize_embeddings=True, gradient_checkpointing=True),
    "fp32 +bf16 autocast": Variant("fp32", bf16_autocast=True),
    "int8 linear+emb +bf16 autocast": Variant("int8", quantize_embeddings=True, bf16_autocast=True),
    "fp32 [malloc]": Variant("fp32", tuned_malloc=True),
    "int8 linear+emb [malloc]": Variant("int8", quantize_embeddings=True, tuned_malloc=True),
}
CORE = [v for v, spec in VARIANTS.items() if not spec.tuned_malloc]
#: glibc settings of the [malloc] variants: large blocks always mmap'd (freed at once), 2 arenas.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def _seeded_trainables(model: Any, seed: int) -> None:
    """The same adapter and head start in every variant (B = 0, the rest N(0, 0.02))."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.zeros_like(p) if ".lora_B." in name else torch.randn(p.shape, generator=g) * 0.02)


def _storage_ptrs(model: Any) -> set[int]:
    ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():  # bitsandbytes keeps CB/SCB on the weight object
        for attr in ("CB", "SCB"):
            t = getattr(getattr(m, "weight", None), attr, None)
            if t is not None and hasattr(t, "untyped_storage"):
                ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def _weight_shapes(model: Any) -> set[tuple[int, ...]]:
    shapes = set()
    for m in model.modules():
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
    return shapes


def _identity(t: Any) -> Any:
    return t


class SavedTensorProfile:
    """What autograd keeps for backward, by unique storage: weights, dequantized weight copies, activations."""

    def __init__(self, model: Any) -> None:
        self.params = _storage_ptrs(model)
        self.weight_shapes = _weight_shapes(model)
        self.seen: dict[int, tuple[int, str]] = {}

    def pack(self, t: Any) -> Any:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.seen:
            if ptr in self.params:
                kind = "weights"
            elif t.is_floating_point() and tuple(t.shape) in self.weight_shapes:
                kind = "dequantized_weights"
            else:
                kind = "activations"
            self.seen[ptr] = (st.nbytes(), kind)
        return t

    def add_held_inputs(self, loss: Any) -> None:
        """Add the layer inputs bitsandbytes keeps on its autograd nodes (``ctx.A``), out of the hooks' sight.

        bitsandbytes' CPU training matmul (``MatMul8bitFp``) stores each int8 layer's float input
        as ``ctx.A`` although no weight gradient is needed.
        """
        stack, visited = [loss.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited.add(id(node))
            held = getattr(node, "A", None)
            if hasattr(held, "untyped_storage"):
                st = held.untyped_storage()
                self.seen.setdefault(st.data_ptr(), (st.nbytes(), "inputs_held_by_bnb"))
            stack.extend(fn for fn, _ in node.next_functions)

    def totals_mb(self) -> dict[str, float]:
        out = {"weights": 0.0, "dequantized_weights": 0.0, "activations": 0.0, "inputs_held_by_bnb": 0.0}
        for nbytes, kind in self.seen.values():
            out[kind] += nbytes * MB
        return out


def _model_bytes(model: Any) -> dict[str, float]:
    seen: dict[int, tuple[int, str]] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = (st.nbytes(), "int8" if str(t.dtype) == "torch.int8" else "float" * t.is_floating_point())
    return {f"{kind}_mb": sum(n for n, k in seen.values() if k == kind) * MB for kind in ("int8", "float")}


def measure(
    model_dir: str, variant: str, steps: int, warmup: int, batch: int = 32, length: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Load, train and measure one variant in this process.

    Args:
        model_dir: Backbone (a directory or ``packaged:all-MiniLM-L6-v2``).
        variant: A key of :data:`VARIANTS`.
        steps: Timed steps (after ``warmup`` untimed ones).
        warmup: Untimed first steps (the first also records the saved-tensor profile).
        batch: Rows per step.
        length: Tokens per row.
        seed: Seeds the batch, the adapter/head init and dropout.

    Returns:
        Memory (MB above the pre-load RSS), step times, losses and the saved-tensor profile.
    """
    # Everything imported (and the tokenizer's modules loaded) in every variant before the baseline,
    # so the baseline holds the code and the difference is what the model and training allocate.
    import bitsandbytes  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import torch
    import transformers.models.bert.modeling_bert  # noqa: F401
    from transformers import AutoTokenizer

    import lorafed.model.int8  # noqa: F401
    from lorafed.client.train import autocast, client_loss
    from lorafed.config import LoraSettings, ModelConfig, TrainConfig
    from lorafed.model.backbone import enable_gradient_checkpointing, load_client_model, resolve_backbone

    AutoTokenizer.from_pretrained(resolve_backbone(model_dir))

    precision, backend, emb, ckpt, _, bf16 = VARIANTS[variant]
    mode = "bf16" if bf16 else "none"
    vocab = json.loads((resolve_backbone(model_dir) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1000, vocab, (batch, length), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    labels = torch.randint(0, 2, (batch,), generator=g)
    train_cfg = TrainConfig(batch_size=batch)
    gc.collect()
    baseline = lm.rss_bytes()
    lm.reset_peak_rss()

    t0 = time.perf_counter()
    cfg = ModelConfig(model_dir, precision, LoraSettings(), int8_backend=backend, quantize_embeddings=emb)
    model = load_client_model(cfg, ("0", "1"), seed).model
    _seeded_trainables(model, seed)
    model.eval()
    with torch.no_grad():
        logits0 = model(**inputs).logits.float()
    load_s = time.perf_counter() - t0
    if ckpt:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
    model.train()
    gc.collect()
    peak_load = lm.peak_rss_bytes()
    before_train = lm.rss_bytes()
    lm.reset_peak_rss()

    # The steps of train_local (AdamW over the trainable tensors, client_loss in fp32 after the
    # autocast block, clipping), written out here rather than calling train_local: the benchmark
    # times each step, hooks autograd's saved tensors on the first one, reads the peak between
    # loading and training, and trains on one fixed batch (train_local draws batches from rows).
    torch.manual_seed(seed)
    profile = SavedTensorProfile(model)
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(profile.pack, _identity) if i == 0 else nullcontext()
        with hooks, autocast(model, mode):
            logits = model(**inputs).logits
        loss = client_loss(logits, labels, None)
        if i == 0:
            profile.add_held_inputs(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak_train = lm.peak_rss_bytes()

    model.eval()
    with torch.no_grad(), autocast(model, mode):
        eval_logits = model(**inputs).logits
    eval_loss = float(client_loss(eval_logits, labels, None))
    trainable_mb = sum(p.numel() * p.element_size() for p in params) * MB
    saved = profile.totals_mb()
    resident = (before_train - baseline) * MB
    peak = (peak_train - baseline) * MB
    optimizer = 3 * trainable_mb  # grads + AdamW's two moments
    return {
        "variant": variant,
        "precision": precision,
        "int8_backend": backend if precision == "int8" else None,
        "quantize_embeddings": emb,
        "gradient_checkpointing": ckpt,
        "peak_train_mb": peak,
        "peak_load_mb": (peak_load - baseline) * MB,
        "resident_before_train_mb": resident,
        "baseline_rss_mb": baseline * MB,
        "model_tensors": _model_bytes(model),
        "breakdown_mb": {
            "model_resident": resident,
            "saved_activations": saved["activations"],
            "saved_dequantized_weights": saved["dequantized_weights"],
            "inputs_held_by_bnb": saved["inputs_held_by_bnb"],
            "grads_and_optimizer": optimizer,
            "other_transient_and_allocator": peak - resident - sum(saved.values()) + saved["weights"] - optimizer,
        },
        "step_s": lm.summarize(times, runs=True),
        "train_losses": losses,
        "eval_loss_after": eval_loss,
        "initial_logits": logits0.tolist(),
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }


def measure_cuda(model_dir: str, variant: str, steps: int, batch: int = 32, length: int = 64) -> dict[str, Any]:
    """``torch.cuda.max_memory_allocated`` over training steps, for ``fp16`` or lorafed ``int8``."""
    import torch

    from lorafed.client.train import client_loss
    from lorafed.config import LoraSettings, ModelConfig
    from lorafed.model.backbone import load_client_model, resolve_backbone

    vocab = json.loads((resolve_backbone(model_dir) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, length), generator=g).cuda()
    labels = torch.randint(0, 2, (batch,), generator=g).cuda()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    cfg = ModelConfig(model_dir, "int8" if variant == "int8" else "fp32", LoraSettings())
    model = load_client_model(cfg, ("0", "1"), 0, precision="int8" if variant == "int8" else "fp16").model.cuda()
    weights = torch.cuda.memory_allocated() - start
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, eps=1e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        client_loss(model(input_ids=ids).logits, labels, None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name(),
        "weights_mb": weights * MB,
        "max_allocated_mb": (torch.cuda.max_memory_allocated() - start) * MB,
        "step_s_median": statistics.median(times[1:]),
    }


def _worker(args: argparse.Namespace) -> None:
    if args.cuda:
        result = measure_cuda(args.model_dir, args.variant, args.steps)
    else:
        result = measure(args.model_dir, args.variant, args.steps, args.warmup, args.batch, args.length)
    print("RESULT " + json.dumps(result), flush=True)


def run_variant(model_dir: str, variant: str, args: argparse.Namespace, cuda: bool = False) -> dict[str, Any]:
    """Measure one variant in a fresh interpreter (a clean heap and a clean peak-RSS counter)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model-dir", model_dir, "--variant", variant]
    cmd += ["--steps", str(args.steps_for[model_dir]), "--warmup", str(args.warmup)]
    cmd += ["--batch", str(args.batch), "--length", str(args.length)] + (["--cuda"] if cuda else [])
    env = lm.pythonpath_env(ROOT)
    if not cuda and VARIANTS[variant].tuned_malloc:
        env.update(MALLOC_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-5:] or [f"exit {proc.returncode}"]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def make_bert_base(folder: Path) -> Path:
    """A randomly initialised bert-base-size BERT (110M parameters) with the packaged tokenizer, cached."""
    return lm.random_bert(folder, 0, **BERT_BASE)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Memory and time ratios to the same model's fp32 row; loss and logit gaps to fp32."""
    ref = next((r for r in rows if r["variant"] == "fp32" and "error" not in r), None)
    for r in rows:
        if ref is None or "error" in r:
            continue
        r["memory_ratio"] = r["peak_train_mb"] / ref["peak_train_mb"]
        r["time_ratio"] = r["step_s"]["median"] / ref["step_s"]["median"]
        r["eval_loss_gap"] = r["eval_loss_after"] - ref["eval_loss_after"]
        pairs = zip(r["initial_logits"], ref["initial_logits"], strict=True)
        r["initial_logits_max_abs_diff"] = max(abs(a - b) for ra, rb in pairs for a, b in zip(ra, rb, strict=True))


def judge_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each int8 variant: memory <= 0.6x fp32 and step time <= 1.2x fp32, met or not."""
    out = []
    for r in rows:
        if "memory_ratio" not in r or r["precision"] != "int8" or r["variant"].endswith("[malloc]"):
            continue
        for metric, limit, what in (
            ("memory_ratio", TARGET_MEMORY, "peak memory"),
            ("time_ratio", TARGET_TIME, "step time"),
        ):
            out.append(
                lm.target(
                    f"{what} <= {limit}x fp32", r[metric], r[metric] <= limit, variant=r["variant"], metric=metric
                )
            )
    return out


def what_each_change_bought(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak-memory and step-time change of each step from stock bitsandbytes to lorafed int8 + ckpt."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    chain = [
        ("fp32", "bnb int8", "stock bitsandbytes int8 instead of fp32"),
        ("bnb int8", "int8 linear", "lorafed Int8Linear instead of Linear8bitLt"),
        ("int8 linear", "int8 linear+emb", "+ int8 embeddings"),
        ("int8 linear+emb", "int8 linear+emb +ckpt", "+ gradient checkpointing"),
        ("int8 linear+emb", "int8 linear+emb +bf16 autocast", "+ bf16 autocast"),
        ("fp32", "fp32 +bf16 autocast", "bf16 autocast on fp32"),
        ("fp32", "fp32 +ckpt", "gradient checkpointing on fp32"),
        ("fp32", "fp32 [malloc]", "tuned glibc allocator on fp32"),
        ("int8 linear+emb", "int8 linear+emb [malloc]", "tuned glibc allocator on int8"),
    ]
    out = []
    for a, b, what in chain:
        if a in by and b in by:
            out.append(
                {
                    "change": what,
                    "from": a,
                    "to": b,
                    "peak_mb_delta": by[b]["peak_train_mb"] - by[a]["peak_train_mb"],
                    "step_s_ratio": by[b]["step_s"]["median"] / by[a]["step_s"]["median"],
                }
            )
    return out


def _fmt_model_table(name: str, rows: list[dict[str, Any]], steps: int) -> list[str]:
    lines = [
        f"### {name}",
        "",
        f"| variant | peak MB | x fp32 | step s median (min-max) | x fp32 | eval loss after {steps} steps "
        "| loss gap | initial logits max abs diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {' '.join(r['error'])[-200:]} |||||||")
            continue
        s = r["step_s"]
        lines.append(
            f"| {r['variant']} | {r['peak_train_mb']:.0f} | {r.get('memory_ratio', float('nan')):.2f} "
            f"| {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {r.get('time_ratio', float('nan')):.2f} "
            f"| {r['eval_loss_after']:.4f} | {r.get('eval_loss_gap', float('nan')):+.4f} "
            f"| {r.get('initial_logits_max_abs_diff', float('nan')):.1e} |"
        )
    lines += ["", "Where the memory goes (MB at the peak, from the first step's saved-tensor profile):", ""]
    lines += [
        "| variant | model resident | saved activations | saved dequantized weights | inputs held by bnb "
        "| grads + AdamW | other (transient + allocator) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" not in r:
            b = r["breakdown_mb"]
            lines.append(
                f"| {r['variant']} | {b['model_resident']:.0f} | {b['saved_activations']:.0f} "
                f"| {b['saved_dequantized_weights']:.0f} | {b['inputs_held_by_bnb']:.0f} "
                f"| {b['grads_and_optimizer']:.0f} "
                f"| {b['other_transient_and_allocator']:.0f} |"
            )
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: targets first, then the tables, the breakdown and the CUDA section."""
    lines = [
        "# Client memory: int8 vs fp32 backbone (CPU training)",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        f"Batch {report['batch']} x length {report['length']} (random token ids), LoRA r=8 on query/value, "
        f"AdamW; {report['warmup']} warm-up step(s) then {report['steps']} timed steps per model "
        f"({report['machine']}). Memory = peak RSS during the training steps minus the RSS of the same "
        "process before the model was loaded; each variant runs in a fresh process.",
        "",
        f"## Targets: int8 peak memory <= {TARGET_MEMORY}x fp32, step time <= {TARGET_TIME}x fp32",
        "",
    ]
    for name, m in report["models"].items():
        by: dict[str, dict[str, dict[str, Any]]] = {}
        for t in judge_targets(m["variants"]):  # judged again, so --render reads older reports too
            by.setdefault(t["variant"], {})[t["metric"]] = t
        for variant, ts in by.items():
            mem, tim = ts["memory_ratio"], ts["time_ratio"]
            lines.append(
                f"- {name}, {variant}: memory {mem['value']:.2f}x ({lm.met_word(mem['met'])}), "
                f"time {tim['value']:.2f}x ({lm.met_word(tim['met'])})"
                + (" - both targets met" if mem["met"] and tim["met"] else "")
            )
    lines += ["", "## Results", ""]
    for name, m in report["models"].items():
        lines += _fmt_model_table(name, m["variants"], m["steps"])
    lines += ["## What each change bought", "", "| model | change | peak MB change | step time x |"]
    lines.append("|---|---|---:|---:|")
    for name, m in report["models"].items():
        for c in m["changes"]:
            lines.append(f"| {name} | {c['change']} | {c['peak_mb_delta']:+.0f} | {c['step_s_ratio']:.2f} |")
    lines += ["", "## Where the memory goes", "", *report["notes"], "", "## CUDA", ""]
    cuda = report["cuda"]
    if not cuda:
        lines.append("No GPU here (`torch.cuda.is_available()` is false): nothing measured.")
    else:
        lines += ["| model | variant | device | weights MB | max allocated MB | step s |"]
        lines.append("|---|---|---|---:|---:|---:|")
        for r in cuda:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['variant']} | failed: {' '.join(r['error'])[-200:]} ||||")
            else:
                lines.append(
                    f"| {r['model']} | {r['variant']} | {r['device']} | {r['weights_mb']:.0f} "
                    f"| {r['max_allocated_mb']:.0f} | {r['step_s_median']:.3f} |"
                )
    return "\n".join(lines) + "\n"


NOTES = [
    "- *model resident*: what the process holds after loading (weights, plus what loading left behind).",
    "  int8 holds 1 byte per linear/embedding weight plus one fp32 scale per row; LayerNorms, biases,",
    "  the pooler and the head stay fp32.",
    "- *saved dequantized weights*: float tensors shaped like a linear weight that autograd keeps",
    "  (a float copy of a weight: under bf16 autocast, the bf16 casts of fp32 weights). lorafed's",
    "  Int8Linear saves only the int8 tensor and its scales and dequantizes again in backward,",
    "  one layer at a time.",
    "- *inputs held by bnb*: bitsandbytes 0.50's CPU training matmul (`MatMul8bitFp`) dequantizes the",
    "  weight in forward and again in backward, and keeps every int8 layer's float input on its",
    "  autograd node (`ctx.A`) although the frozen weight needs no gradient (for `output.dense` that",
    "  is the 4x-wide GELU output). Autograd's saved-tensor hooks do not see these; the graph walk does.",
    "- *saved activations*: what autograd keeps for backward (LayerNorm, GELU, softmax and dropout",
    "  inputs/masks, LoRA inputs). They do not depend on the weight precision and dominate at this batch.",
    "  With +ckpt only the tensors outside the recomputed layers show here; the layer inputs kept by",
    "  the checkpoints and the one layer being recomputed land in *other*.",
    "- *+bf16 autocast* (`train.autocast: bf16`): matmuls, and so most saved activations, in bfloat16",
    "  (int8 weights are dequantized straight to bf16); LayerNorm, softmax and the loss stay fp32.",
    "  It is fast only where the CPU has bf16 instructions (AVX512-BF16 or AMX; see the machine",
    "  line above); it changes the numerics a little (see the loss gap).",
    "- *other*: transient buffers of the backward pass and memory glibc keeps after frees. The",
    "  [malloc] rows (MiniLM) run the same code with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_ARENA_MAX=2:",
    "  glibc then returns every large block at once and *other* nearly vanishes, but each",
    "  allocation becomes an mmap with fresh page faults, and steps get ~1.7x slower.",
    "- Run to run, peaks move with glibc's heap layout: two full runs on this machine differed by",
    "  at most 5% per variant, except the +ckpt int8 rows (9% MiniLM, 23% bert-base); ratios by",
    "  up to 0.1. A difference of a few per cent between two rows is noise.",
]


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars of memory and step-time ratio to fp32, per variant and model, with the target lines."""
    import numpy as np

    from lorafed.plots import figure, save_figure

    fig, axes = figure(1, 2, figsize=(11, 4.2))
    names = list(report["models"])
    present = {r["variant"] for m in report["models"].values() for r in m["variants"] if "error" not in r}
    variants = [v for v in VARIANTS if v in present]
    width = 0.8 / max(1, len(names))
    x = np.arange(len(variants))
    for ax, key, target, title in (
        (axes[0], "memory_ratio", TARGET_MEMORY, "peak training memory / fp32"),
        (axes[1], "time_ratio", TARGET_TIME, "step time / fp32"),
    ):
        for i, name in enumerate(names):
            by = {r["variant"]: r for r in report["models"][name]["variants"] if "error" not in r}
            vals = [by.get(v, {}).get(key, np.nan) for v in variants]
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target {target}x")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(x, variants, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def summarize(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Ratios, targets and the change chain of one model's variants."""
    add_ratios(rows)
    return {
        "steps": steps,
        "variants": rows,
        "targets": judge_targets(rows),
        "changes": what_each_change_bought(rows),
    }


def write_reports(report: dict[str, Any], out: Path, with_plot: bool = True) -> None:
    """results/memory.json, memory.md and (optionally) memory.png."""
    slim = json.loads(json.dumps(report))
    for m in slim["models"].values():
        for r in m["variants"]:
            r.pop("initial_logits", None)
    lm.write_results(out / "memory", slim, render_markdown(report))
    if with_plot:
        plot(report, out / "memory.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM only, 1 warm-up + 2 timed steps")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorafed" / "bench_memory")
    ap.add_argument("--variants", nargs="+", default=None, help="subset of the variants")
    ap.add_argument("--render", type=Path, help="only rewrite memory.md and memory.png from this memory.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.render:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        report["notes"] = NOTES
        write_reports(report, args.out)
        return 0

    from lorafed.config import PACKAGED_BACKBONE

    models = {"MiniLM-L6 (packaged)": (PACKAGED_BACKBONE, 2 if args.quick else 5)}
    if not args.quick:
        models["bert-base (random init)"] = (str(make_bert_base(args.cache / "bert-base-random")), 3)
    args.steps_for = {d: s for d, s in models.values()}
    command = lm.command_line("bench_memory.py", ["--quick"] if args.quick else [])
    report: dict[str, Any] = {
        "command": command,
        "batch": args.batch,
        "length": args.length,
        "warmup": args.warmup,
        "steps": ", ".join(f"{s} ({n})" for n, (_, s) in models.items()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, bf16 instructions: {_bf16_flags()}, "
        f"torch {_torch_version()}",
        "targets": {"memory_ratio": TARGET_MEMORY, "time_ratio": TARGET_TIME},
        "notes": NOTES,
        "models": {},
        "cuda": [],
    }
    t0 = time.perf_counter()
    for name, (model_dir, _) in models.items():
        variants = args.variants or (CORE if args.quick or name != next(iter(models)) else list(VARIANTS))
        rows = []
        for v in variants:
            print(f"[{time.perf_counter() - t0:6.0f}s] {name}: {v}", flush=True)
            rows.append(run_variant(model_dir, v, args))
            print("   ", _one_line(rows[-1]), flush=True)
        report["models"][name] = summarize(rows, models[name][1])
        write_reports(report, args.out)  # after each model, so a partial run keeps its results
    if _cuda_available():
        for name, (model_dir, _) in models.items():
            for v in ("fp16", "int8"):
                report["cuda"].append({"model": name, **run_variant(model_dir, v, args, cuda=True)})
    report["seconds"] = time.perf_counter() - t0
    write_reports(report, args.out)
    print((args.out / "memory.md").read_text(encoding="utf-8"))
    return 0


def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "FAILED " + " | ".join(r["error"])
    return f"peak {r['peak_train_mb']:.0f} MB, step {r['step_s']['median']:.2f} s, eval loss {r['eval_loss_after']:.4f}"


def _bf16_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return "unknown"
    return " ".join(sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16")})) or "none"


def _torch_version() -> str:
    import torch

    return torch.__version__


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
