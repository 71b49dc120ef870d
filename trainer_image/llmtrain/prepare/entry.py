"""The one entry point of the prepare stage, behind both ``llmtrain prepare CONFIG`` and
``python -m llmtrain.prepare CONFIG``: the same exit codes, messages and output from either.

Exit 0 on success (also when the output was already up to date; the statistics are printed as JSON
on stdout), 2 (``ExitCode.BAD_CONFIG``) when the configuration is invalid or cannot be carried out, or the
corpus cannot make a training set (empty, nothing left after cleaning and deduplication, fewer
tokens than the training windows need), with one line on stderr naming the field or the cause;
nothing is committed in that case (no manifest).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from llmop_contract.protocol import ExitCode
from llmtrain.config import ConfigError, load_config
from llmtrain.exits import refuse
from llmtrain.prepare.pipeline import run

PROG = "llmtrain prepare"


def main(config_path: str | Path, phase: str | None = None, index: int | None = None) -> int:
    """Without ``phase`` the single-pod stage; with it, one pod of a distributed phase (its index from
    ``index``, else $JOB_COMPLETION_INDEX)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
        if phase is None:
            stats = run(config)
        else:
            from llmop_contract.api.v1alpha1.data import PreparePhase
            from llmtrain.prepare.distributed.phases import pod_index, run_phase

            stats = run_phase(config, PreparePhase(phase), pod_index(index))
    except ConfigError as exc:  # DataError too: an empty, duplicate-only or too small corpus
        return refuse(PROG, exc, "prepare")
    print(json.dumps(stats, indent=2))
    return ExitCode.OK
