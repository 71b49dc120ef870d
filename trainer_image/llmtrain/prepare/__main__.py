"""``python -m llmtrain.prepare CONFIG.yaml``: the prepare stage without the ``llmtrain`` CLI.

Exit status 0 on success (also when the output was already up to date), 2 for a configuration
error; the statistics are printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml
from pydantic import ValidationError

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.prepare import ConfigError, run


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.prepare", description=__doc__)
    parser.add_argument("config", help="TrainerConfig YAML file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with open(args.config) as fh:
            config = TrainerConfig.model_validate(yaml.safe_load(fh))
        stats = run(config)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"invalid config: {_field(err['loc'])}: {err['msg']}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
