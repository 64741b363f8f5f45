"""The Flower app directory that ``flwr run`` packs into a FAB: a pyproject and a two-line glue module.

The FAB holds no lorafed code: the glue imports the installed ``lorafed`` package, which must
be installed (same version) on the SuperLink machine and on every SuperNode. Its
``dependencies`` list is empty on purpose: with runtime dependency installation disabled
(the default of ``lorafed flower run`` and of every SuperNode) nothing is fetched from a
registry, and torch is never pulled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from lorafed.files import atomic_write_text

#: Module name of the glue; Flower's loader checks for plain assignments of the app objects.
GLUE_MODULE = "lorafed_flower_app"

DEFAULT_RUN_CONFIG: dict[str, str | int | float | bool] = {
    "config-yaml": "",
    "out-dir": "lorafed-flower-run",
    "num-nodes": 2,
    "node-timeout": 120.0,
    "round-timeout": 600.0,
    "pull-interval": 0.2,
    "server-eval": True,
    # The common settings, as Flower users pass them: `flwr run . --run-config "num-server-rounds=5"`.
    # Empty / 0 / -1 means "as the lorafed config says".
    "num-server-rounds": 0,
    "fraction-train": -1.0,
    "local-steps": 0,
    "learning-rate": 0.0,
}

#: Flower run-config keys -> the lorafed config key each one overrides (when set).
RUN_CONFIG_OVERRIDES: dict[str, str] = {
    "num-server-rounds": "federation.rounds",
    "fraction-train": "federation.fraction",
    "local-steps": "train.max_steps",
    "learning-rate": "train.learning_rate",
}

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lorafed-flower"
version = "{version}"
description = "lorafed federated LoRA fine-tuning on Flower (glue only; needs the lorafed package installed)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lorafed"

[tool.flwr.app.components]
serverapp = "{glue}:serverapp"
clientapp = "{glue}:clientapp"

[tool.flwr.app.config]
{config}
"""

_GLUE = '''"""Glue: the apps live in the installed lorafed package."""

from lorafed.engine.flower import client_app as _client_app
from lorafed.engine.flower import server_app as _server_app

serverapp = _server_app.app
clientapp = _client_app.app
'''


def toml_value(value: str | int | float | bool) -> str:
    """A TOML literal (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_app_dir(folder: str | Path) -> Path:
    """Write the app directory (``pyproject.toml`` + glue module) to ``folder``; safe to repeat."""
    from lorafed import __version__

    dest = Path(folder)
    config = "\n".join(f"{k} = {toml_value(v)}" for k, v in DEFAULT_RUN_CONFIG.items())
    atomic_write_text(dest / "pyproject.toml", _PYPROJECT.format(version=__version__, glue=GLUE_MODULE, config=config))
    atomic_write_text(dest / f"{GLUE_MODULE}.py", _GLUE)
    return dest


def write_run_config(path: str | Path, values: Mapping[str, str | int | float | bool]) -> Path:
    """Write a run-config TOML for ``flwr run APP CONN --run-config FILE.toml`` (keys of the app only).

    Raises:
        KeyError: A key the app does not declare.
    """
    unknown = sorted(set(values) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        raise KeyError(f"unknown run-config keys {unknown}; known: {sorted(DEFAULT_RUN_CONFIG)}")
    return atomic_write_text(path, "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
