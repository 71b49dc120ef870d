"""Where the runtime keeps its files: ~/.cache/llmop/runtime (or $LLMOP_CACHE_DIR/runtime)."""

from __future__ import annotations

from pathlib import Path

from llmop_dev.cluster import cache_dir


def root() -> Path:
    return cache_dir() / "runtime"


def pod_dir(namespace: str, name: str, uid: str) -> Path:
    """Per-pod scratch: hosts file, configMap/secret copies and emptyDirs (removed with the pod)."""
    return root() / "pods" / namespace / f"{name}-{uid[:8]}"


def claim_dir(namespace: str, claim: str) -> Path:
    """A claim not bound to a hostPath volume: one directory, shared by every pod that mounts it."""
    return root() / "volumes" / namespace / claim


def log_path(namespace: str, pod: str, container: str) -> Path:
    return root() / "logs" / namespace / pod / f"{container}.log"
