"""The one entry point of the prepare stage, behind both ``llmtrain prepare CONFIG`` and
``python -m llmtrain.prepare CONFIG``: the same exit codes, messages and output from either.

Exit 0 on success (also when the output was already up to date; the statistics are printed as JSON
on stdout), 2 (``ExitCode.BAD_CONFIG``) when the configuration is invalid or cannot be carried out,
with one message on stderr naming the field; nothing is written in that case.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from llmop_contract.protocol import ExitCode
from llmtrain.config import ConfigError, load_config
from llmtrain.prepare.pipeline import run

PROG = "llmtrain prepare"


def main(config_path: str | Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        stats = run(load_config(config_path))
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return ExitCode.BAD_CONFIG
    print(json.dumps(stats, indent=2))
    return ExitCode.OK
