"""A pod's last words: a short JSON summary in the container's termination message.

The kubelet copies the file at ``terminationMessagePath`` (default /dev/termination-log) into the
pod's status when the container exits, so the operator reads a stage's key figures from the pod
object without any API permission for the trainer and without reading the job's volume. The
message's shape and size limit are the contract's ``TerminationMessage``.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmop_contract.protocol import TERMINATION_LOG_PATH, Env, TerminationMessage


def path() -> Path | None:
    """Where to write: $LLMOP_TERMINATION_LOG, else the kubelet's default file when it exists."""
    explicit = os.environ.get(Env.TERMINATION_LOG)
    if explicit:
        return Path(explicit)
    default = Path(TERMINATION_LOG_PATH)
    return default if default.is_file() and os.access(default, os.W_OK) else None


def write(message: TerminationMessage) -> bool:
    """Write the message; False where there is no termination-message file (outside Kubernetes)."""
    target = path()
    if target is None:
        return False
    target.write_text(message.encode())
    return True
