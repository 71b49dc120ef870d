"""``python -m llmtrain.prepare CONFIG.yaml``: the prepare stage without the ``llmtrain`` CLI.

The same entry as ``llmtrain prepare`` (``llmtrain.prepare.entry.main``): exit 0 on success (also
when the output was already up to date), 2 for a configuration error; the statistics are printed
as JSON on stdout.
"""

from __future__ import annotations

import argparse
import sys

from llmtrain.cli import prepare_arguments
from llmtrain.prepare.entry import main as prepare_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.prepare", description=__doc__)
    prepare_arguments(parser)
    args = parser.parse_args(argv)
    return prepare_main(args.config, args.phase, args.index)


if __name__ == "__main__":
    sys.exit(main())
