"""The one way every ``llmtrain`` entry point refuses bad input: one line, exit 2, termination message.

A ``ConfigError`` (``DataError`` included) is the user's to fix, so it must not look like a crash: no
traceback, one line on stderr that names the cause, exit code 2 (``ExitCode.BAD_CONFIG``, which the
operator never retries), and the same line in the termination message so the operator's Failed
condition carries it without anyone reading the pod's log.
"""

from __future__ import annotations

import sys

from llmop_contract.protocol import ExitCode, TerminationMessage
from llmtrain import termination
from llmtrain.config import ConfigError


def one_line(text: str) -> str:
    """A multi-line message (every bad field of a file) joined into one line: `first: a; b`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    head = lines[0] if lines[0].endswith(":") else lines[0] + ":"
    return head + " " + "; ".join(lines[1:])


def refuse(prog: str, exc: ConfigError, stage: str) -> int:
    """Report ``exc`` for ``prog`` (e.g. "llmtrain prepare") and return the exit code to exit with."""
    message = one_line(str(exc))
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    termination.write(
        TerminationMessage(
            extra={
                "stage": stage,
                "exitCode": int(ExitCode.BAD_CONFIG),
                "reason": type(exc).__name__,
                "message": message,
            }
        )
    )
    return ExitCode.BAD_CONFIG
