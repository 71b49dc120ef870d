"""Data preparation: read, clean, deduplicate, augment, tokenise and shard (``llmtrain prepare``).

``run(config)`` does the work and returns the statistics also stored in the manifest; ``main(path)``
(``llmtrain.prepare.entry``) is the command both ``llmtrain prepare`` and ``python -m
llmtrain.prepare`` run. The output format is described in ``shards`` and docs/prepare.md.
"""

from __future__ import annotations

from llmtrain.config import ConfigError
from llmtrain.prepare.entry import main
from llmtrain.prepare.pipeline import run

__all__ = ["ConfigError", "main", "run"]
