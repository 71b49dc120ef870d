"""A pod's last words: a short JSON summary in the container's termination message.

The kubelet copies the file at ``terminationMessagePath`` (default /dev/termination-log) into the
pod's status when the container exits, so the operator reads a stage's key figures from the pod
object without any API permission for the trainer and without reading the job's volume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes per container; a longer message would be cut mid-JSON.
LIMIT = 4096


def path() -> Path | None:
    """Where to write: $LLMOP_TERMINATION_LOG, else the kubelet's default file when it exists."""
    explicit = os.environ.get("LLMOP_TERMINATION_LOG")
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_PATH)
    return default if default.is_file() and os.access(default, os.W_OK) else None


def encode(summary: dict[str, Any]) -> str:
    """Compact JSON within LIMIT; drops the largest entries first if it does not fit."""
    data = dict(summary)
    text = json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
    while len(text.encode()) > LIMIT and data:
        largest = max(data, key=lambda k: len(json.dumps(data[k], default=str)))
        data.pop(largest)
        data["truncated"] = True
        text = json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
    return text


def write(summary: dict[str, Any]) -> bool:
    """Write the summary; False where there is no termination-message file (outside Kubernetes)."""
    target = path()
    if target is None:
        return False
    target.write_text(encode(summary))
    return True


def read(text: str | None) -> dict[str, Any]:
    """Parse a termination message; {} for empty or non-JSON text (e.g. a crash's last log lines)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
