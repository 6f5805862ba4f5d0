"""Your own models and datasets: Python files or modules named on the command line, never in a YAML file.

`--plugins my_models.py,my_pkg.data` (or `TRAINER_PLUGINS`) imports each before the command runs; a
plugin registers with the same decorators as the built-ins (`trainer.register_model`,
`trainer.register_dataset`). A config names what a plugin registered, like any built-in; it can
never import anything itself. A run records each plugin's path and SHA-256 in env.json, so a later
command on the run can say which file it needs, and whether that file has changed since.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from trainer.errors import UsageError

ENV_VAR = "TRAINER_PLUGINS"
_loaded: dict[str, dict[str, str]] = {}  # resolved path -> {"plugin": as given, "path", "sha256"}


def specs(option: str | None) -> list[str]:
    """The plugins to load: `TRAINER_PLUGINS`, then the --plugins option; each a comma-separated list."""
    items = []
    for text in (os.environ.get(ENV_VAR, ""), option or ""):
        items += [item.strip() for item in text.split(",") if item.strip()]
    return list(dict.fromkeys(items))


def load_plugins(option: str | None) -> list[dict[str, str]]:
    """Import every plugin `option` and TRAINER_PLUGINS name (once per process); what env.json records.
    A plugin that does not import is a UsageError of one line: the file, the line and the error."""
    for spec in specs(option):
        _load(spec)
    return loaded()


def loaded() -> list[dict[str, str]]:
    """The plugins this process imported, as env.json records them."""
    return list(_loaded.values())


def _load(spec: str) -> None:
    is_file = spec.endswith(".py") or os.sep in spec or Path(spec).is_file()
    if is_file:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"--plugins: '{spec}' is not a file; give a Python file (my_models.py) or an importable module (my_pkg.models)")
        if str(path) in _loaded:
            return
        name = f"trainer_plugin_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        _import(spec, path, lambda: module_spec.loader.exec_module(module))  # type: ignore[union-attr]
    else:
        found = importlib.util.find_spec(spec) if spec.replace(".", "").replace("_", "").isalnum() else None
        if found is None or found.origin is None:
            raise UsageError(f"--plugins: no file or module '{spec}'; give a Python file (my_models.py) or an importable module (my_pkg.models)")
        path = Path(found.origin).resolve()
        if str(path) in _loaded:
            return
        _import(spec, path, lambda: importlib.import_module(spec))
    _loaded[str(path)] = {"plugin": spec, "path": str(path), "sha256": sha256(path)}


def _import(spec: str, path: Path, run: Any) -> None:
    from trainer.registry import RegistrationError

    try:
        run()
    except SyntaxError as err:
        raise UsageError(f"plugin {spec}, line {err.lineno}: SyntaxError: {err.msg}") from None
    except RegistrationError as err:
        raise UsageError(f"plugin {spec}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the plugin's own error, told in one line where it happened
        line = next((f.lineno for f in reversed(traceback.extract_tb(err.__traceback__)) if Path(f.filename).resolve() == path), None)
        where = f", line {line}" if line else ""
        raise UsageError(f"plugin {spec}{where}: {type(err).__name__}: {err}") from None


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refuse_missing_plugins(recorded: list[dict[str, str]] | None, *, force: bool, folder: Path) -> None:
    """Before a command on a run: every plugin the run was trained with must be loaded now, and
    unchanged (`force` goes on with a changed one)."""
    now = {entry["path"]: entry for entry in loaded()}
    by_name = {Path(entry["path"]).name: entry for entry in loaded()}
    missing, changed = [], []
    for entry in recorded or []:
        current = now.get(entry.get("path", "")) or by_name.get(Path(entry.get("path", "")).name)
        if current is None:
            missing.append(entry)
        elif current["sha256"] != entry.get("sha256"):
            changed.append((entry, current))
    if missing:
        files = ",".join(e.get("path", "?") for e in missing)
        raise UsageError(f"the run '{folder}' was trained with the plugin {files}; give it again: --plugins {files}")
    if changed and not force:
        shown = "; ".join(f"{c['path']} (sha256 {c['sha256'][:12]}, the run's {e.get('sha256', '?')[:12]})" for e, c in changed)
        raise UsageError(f"plugin file changed since the run '{folder}' was trained: {shown}; run with --force to go on with it as it is now")
