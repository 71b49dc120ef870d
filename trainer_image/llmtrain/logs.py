"""Structured log lines: logfmt by default, JSON lines with LLMTRAIN_LOG_FORMAT=json."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from llmop_contract.protocol import Env


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return json.dumps(s) if (" " in s or "=" in s or not s) else s


_WRITE_LOCK = threading.Lock()


class Logger:
    """Writes events from rank 0 only: the other ranks run the same loop and would repeat them."""

    def __init__(self, rank: int, json_lines: bool | None = None) -> None:
        self.rank = rank
        self.json = os.environ.get(Env.LOG_FORMAT, "text") == "json" if json_lines is None else json_lines

    def event(self, event: str, **fields: Any) -> None:
        self._write(None, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """An event that needs a person's attention: ``level=WARNING`` (logfmt: the line starts with it)."""
        self._write("WARNING", event, fields)

    def _write(self, level: str | None, event: str, fields: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"ts": round(time.time(), 3), "event": event, "rank": self.rank, **fields}
        if level:
            record = {"level": level, **record}
        if self.json:
            line = json.dumps(record)
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.pop("ts")))
            prefix = f"{record.pop('level')} " if level else ""
            line = f"{stamp} {prefix}{record.pop('event')} " + " ".join(
                f"{k}={_fmt(v)}" for k, v in record.items()
            )
        # One write of the whole line under a lock: the checkpoint upload thread logs too, and a
        # print's separate newline write could land between another thread's line and its newline.
        with _WRITE_LOCK:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
