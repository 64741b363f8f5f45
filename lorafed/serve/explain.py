"""Per-token attributions for a merged classifier: which words drove a prediction.

Integrated gradients on the word embeddings, through Captum (``LayerIntegratedGradients``) when it
is installed, else by hand with the same Riemann sum (Captum adds nothing lorafed needs beyond
it). The baseline keeps ``[CLS]``/``[SEP]`` and replaces every other token by ``[PAD]``; the score
of a token is the sum over its embedding dimensions of the attribution to the predicted label's
probability, so the scores of one text add up (approximately) to ``p(text) - p(baseline)``.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafed.data.tokens import model_inputs
from lorafed.serve.infer import ServingModel

#: Interpolation steps of the integral (more: closer to completeness, slower).
DEFAULT_STEPS = 16


def captum_available() -> bool:
    """Whether Captum imports (it is optional)."""
    try:
        import captum.attr  # noqa: F401
    except Exception:  # any import failure (missing, or built against another torch) means "no"
        return False
    return True


def encode_one(sm: ServingModel, text: str, pair: str | None, max_length: int) -> tuple[dict[str, torch.Tensor], Any]:
    """Tokenize one example with the export's input rule; returns the batch and the encoding (for offsets)."""
    firsts, seconds = model_inputs([text], None if pair is None else [pair], sm.text.get("pair_mode", "pair"))
    first, second = firsts[0], None if seconds is None else seconds[0]
    fast = bool(getattr(sm.tokenizer, "is_fast", False))
    enc = sm.tokenizer(
        first, second, truncation=True, max_length=max_length, return_tensors="pt", return_offsets_mapping=fast
    )
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return batch, enc


def token_attributions(
    sm: ServingModel,
    text: str,
    pair: str | None = None,
    target: int | None = None,
    max_length: int | None = None,
    steps: int = DEFAULT_STEPS,
) -> dict[str, Any]:
    """Attributions of each token of one example to the probability of ``target`` (default: the top label).

    Args:
        sm: The model.
        text: The text.
        pair: Its second text, if any (joined by the export's pair/prefix rule).
        target: Label id to explain; the predicted one when ``None``.
        max_length: Truncation length (default: the export's).
        steps: Integration steps.

    Returns:
        ``method``, ``label``, ``tokens`` (``token``, ``score``, ``segment``, ``start``, ``end``: character
        offsets in the segment's text, ``-1`` where unknown) without special tokens, and ``words``
        (subword pieces joined: ``word``, ``score``, ``segment``, ``start``, ``end``).
    """
    length = max_length or int(sm.text.get("max_length") or 128)
    batch, enc = encode_one(sm, text, pair, length)
    model = sm.model
    embed = model.get_input_embeddings()
    ids = batch["input_ids"]
    special = set(sm.tokenizer.all_special_ids)
    pad = int(sm.tokenizer.pad_token_id or 0)
    baseline = ids.clone()
    keep = torch.tensor([[int(t) in special for t in ids[0]]])
    baseline[~keep] = pad
    extra = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits.float(), dim=-1)[0]
    label = int(probs.argmax()) if target is None else int(target)

    if captum_available():
        from captum.attr import LayerIntegratedGradients

        def forward(input_ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(extra, rest, strict=True))
            return torch.softmax(model(input_ids=input_ids, **kwargs).logits.float(), dim=-1)[:, label]

        lig = LayerIntegratedGradients(forward, embed)
        attr = lig.attribute(
            ids,
            baselines=baseline,
            additional_forward_args=tuple(extra.values()),
            n_steps=steps,
            method="riemann_trapezoid",
        )
        scores = attr.sum(dim=-1)[0].detach().float()
        method = "integrated_gradients (captum)"
    else:
        scores = _integrated_gradients(model, embed, ids, baseline, extra, label, steps)
        method = "integrated_gradients (by hand)"

    tokens = _token_records(sm, enc, ids[0], scores, special)
    return {
        "method": method,
        "label": sm.labels[label],
        "probability": float(probs[label]),
        "tokens": tokens,
        "words": _words(tokens),
    }


def _integrated_gradients(
    model: Any,
    embed: torch.nn.Module,
    ids: torch.Tensor,
    baseline: torch.Tensor,
    extra: dict[str, torch.Tensor],
    label: int,
    steps: int,
) -> torch.Tensor:
    """Integrated gradients on the word embeddings (trapezoid rule), summed over embedding dimensions."""
    with torch.no_grad():
        x, x0 = embed(ids), embed(baseline)
    # Captum's "riemann_trapezoid" rule, so both paths give the same numbers: ``steps`` points on
    # [0, 1], weight 1/steps each, the two ends halved.
    alphas = torch.linspace(0.0, 1.0, steps)
    weights = torch.full((steps,), 1.0 / steps)
    weights[0] = weights[-1] = 0.5 / steps
    total = torch.zeros_like(x)
    for a, w in zip(alphas, weights, strict=True):
        point = (x0 + a * (x - x0)).detach().requires_grad_(True)
        out = torch.softmax(model(inputs_embeds=point, **extra).logits.float(), dim=-1)[:, label].sum()
        (grad,) = torch.autograd.grad(out, point)
        total += w * grad
    return ((x - x0) * total).sum(dim=-1)[0].detach().float()


def _token_records(
    sm: ServingModel, enc: Any, ids: torch.Tensor, scores: torch.Tensor, special: set[int]
) -> list[dict[str, Any]]:
    """Non-special tokens with their scores, segment and character offsets."""
    pieces = sm.tokenizer.convert_ids_to_tokens(ids.tolist())
    offsets = enc["offset_mapping"][0].tolist() if "offset_mapping" in enc else None
    try:
        seq_ids = enc.sequence_ids(0)
    except (AttributeError, ValueError):
        seq_ids = [0] * len(pieces)
    out = []
    for i, (tid, piece) in enumerate(zip(ids.tolist(), pieces, strict=True)):
        if tid in special:
            continue
        start, end = offsets[i] if offsets is not None else (-1, -1)
        out.append(
            {
                "token": piece,
                "score": float(scores[i]),
                "segment": int(seq_ids[i]) if seq_ids[i] is not None else 0,
                "start": int(start),
                "end": int(end),
            }
        )
    return out


def _words(tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join WordPiece continuations (``##x``) into words, adding their scores."""
    words: list[dict[str, Any]] = []
    for t in tokens:
        piece = t["token"]
        if words and piece.startswith("##") and words[-1]["segment"] == t["segment"]:
            last = words[-1]
            last["word"] += piece[2:]
            last["score"] += t["score"]
            last["end"] = t["end"]
        else:
            words.append({"word": piece, **{k: t[k] for k in ("score", "segment", "start", "end")}})
    return words
