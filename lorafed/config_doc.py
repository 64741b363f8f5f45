"""The config reference, generated from the dataclasses of :mod:`lorafed.config`.

Every key's default, type (or allowed values) and description come from the code itself: the
field's default, its annotation and the ``Attributes:`` entry of its section's docstring. The
README's "Config reference" section is this text (``scripts/config_reference.py --write``
regenerates it; a test checks that it has not drifted).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal

from lorafed.config import RunConfig

#: Markers around the generated section in README.md.
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a Google-style class docstring, each joined into one line."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.split("\n")
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return {}
    out: dict[str, str] = {}
    current: str | None = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None and line.strip():
            out[current] += " " + line.strip()
    return out


def type_text(tp: Any) -> str:
    """A reader's name for an annotation: ``int``, ``number or null``, ``one of: a, b``, ``list of str``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = type_text(inner[0])
        return f"{text}, or null" if type(None) in args else text
    if origin is Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    names = {int: "integer", float: "number", bool: "true/false", str: "string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(value: Any) -> str:
    """A default as it would be written in the YAML config."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _markdown(doc: str) -> str:
    """A docstring fragment as Markdown table text: Sphinx roles and double backticks become code spans."""
    doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc).replace("``", "`")
    return doc.replace("|", "\\|")


def _rows(cls: type, prefix: str, sections: list[tuple[str, str, list[str]]]) -> None:
    """Append ``(prefix, summary, rows)`` for ``cls`` and then for each nested section."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n")[0]
    rows: list[str] = []
    nested: list[tuple[type, str]] = []
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            nested.append((typing.cast(type, tp), key + "."))
            continue
        doc = _markdown(docs.get(f.name, ""))
        rows.append(f"| `{key}` | {default_text(getattr(default, f.name))} | {type_text(tp)} | {doc} |")
    sections.append((prefix.rstrip(".") or "top level", _markdown(summary), rows))
    for sub, sub_prefix in nested:
        _rows(sub, sub_prefix, sections)


def config_reference() -> str:
    """The Markdown reference of every config key: one table per section (key, default, type, description)."""
    sections: list[tuple[str, str, list[str]]] = []
    _rows(RunConfig, "", sections)
    parts = [
        "Generated from `lorafed/config.py` by `python scripts/config_reference.py --write`; do not edit by hand. "
        "Set a key in the YAML file (nested sections) or on any verb as `KEY=VALUE`; "
        "`lorafed config show --config FILE` prints the resolved config."
    ]
    for name, summary, rows in sections:
        parts.append(
            f"**`{name}`**: {summary}\n\n| key | default | type / allowed | description |\n|---|---|---|---|\n"
            + "\n".join(rows)
        )
    return "\n\n".join(parts) + "\n"


def replace_section(text: str, generated: str) -> str:
    """``text`` with the part between :data:`START` and :data:`END` replaced by ``generated``.

    Raises:
        ValueError: The markers are missing or out of order.
    """
    a, b = text.find(START), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"markers {START} ... {END} not found (in this order)")
    return text[: a + len(START)] + "\n" + generated + text[b:]


def current_section(text: str) -> str:
    """The text between the markers (what :func:`replace_section` put there).

    Raises:
        ValueError: The markers are missing or out of order.
    """
    a, b = text.find(START), text.find(END)
    if a < 0 or b < a:
        raise ValueError(f"markers {START} ... {END} not found (in this order)")
    return text[a + len(START) + 1 : b]
