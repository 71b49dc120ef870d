"""Data preparation: read, clean, deduplicate, augment, tokenise and shard (``llmtrain prepare``).

``run(config)`` is the entry point the CLI calls; it returns the statistics also stored in the
manifest. The output format is described in ``shards`` and docs/prepare.md.
"""

from __future__ import annotations

from llmtrain.prepare.errors import ConfigError
from llmtrain.prepare.pipeline import run

__all__ = ["ConfigError", "run"]
