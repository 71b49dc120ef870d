"""Runs the Argo CD health checks of docs/gitops/argocd-cm-health.yaml the way Argo CD does:
the script gets the object as the global `obj` and returns a table with `status` and `message`.

Argo CD runs gopher-lua (Lua 5.1) with the base, table, string and math libraries only; lupa's
Lua 5.1 with the other globals removed is the same language in the same sandbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lua
import yaml

REPO = Path(__file__).resolve().parents[2]
HEALTH_CHECKS = REPO / "docs" / "gitops" / "argocd-cm-health.yaml"
KEY = "resource.customizations.health.llmop.io_{kind}"
UNSAFE = ("io", "os", "require", "dofile", "loadfile", "load", "loadstring", "module", "package", "debug")


def script(kind: str) -> str:
    return str(yaml.safe_load(HEALTH_CHECKS.read_text())["data"][KEY.format(kind=kind)])


def _to_lua(runtime: Any, value: Any) -> Any:
    # JSON objects and arrays become tables (arrays 1-based, as Argo CD converts them); nulls are absent.
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Argo CD's verdict on one object: {"status": ..., "message": ...}."""
    runtime = lua.LuaRuntime(register_eval=False, register_builtins=False)
    g = runtime.globals()
    for name in UNSAFE:
        g[name] = None
    g.obj = _to_lua(runtime, obj)
    result = runtime.execute(script(obj["kind"]))
    return {k: str(v) for k, v in result.items()}
