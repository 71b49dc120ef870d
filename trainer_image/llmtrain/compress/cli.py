"""``llmtrain compress CONFIG --stage STAGE``: one compression of the trained model, evaluated.

STAGE is ``quantize-<i>`` (spec.compression.quantization[i]), ``prune-<i>`` (spec.compression.pruning[i])
or ``distill`` (spec.compression.distillation). Reads ``<outputDir>/model`` (never writes it) and the
shards in ``dataDir``; writes ``<outputDir>/compressed/<STAGE>/`` atomically, with report.json.

Exit codes: 0 done (or already done), 2 invalid config, stage or method/model combination (one line
on stderr naming the field; nothing was loaded), anything else a failure.
"""

from __future__ import annotations

import argparse
import sys

from llmop_contract.protocol import ExitCode, TerminationMessage
from llmtrain import termination
from llmtrain.logs import Logger

FAILED = ExitCode.FAILED


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="TrainerConfig YAML/JSON file")
    parser.add_argument("--stage", required=True, help="quantize-<i>, prune-<i> or distill")
    args = parser.parse_args(argv)

    # Everything below until run_stage is torch-free, so a bad stage fails in well under a second.
    from llmtrain.compress.layout import model_dir
    from llmtrain.compress.stages import MissingModel, ModelShape, StageError, check, resolve
    from llmtrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
        stage = resolve(cfg, args.stage)
        shape = ModelShape.read(model_dir(cfg.paths.output_dir))
        check(stage, shape)
    except (ConfigError, StageError) as exc:
        print(f"llmtrain compress: {exc}", file=sys.stderr)
        return ExitCode.BAD_CONFIG
    except MissingModel as exc:
        print(f"llmtrain compress: {exc}", file=sys.stderr)
        return FAILED

    from llmtrain.compress.run import run_stage

    summary = run_stage(cfg, stage, shape, Logger(rank=0))
    termination.write(
        TerminationMessage(
            model_path=summary["modelPath"],
            results=summary["results"],
            extra={"stage": summary["stage"], "method": summary["method"]},
        )
    )
    return ExitCode.OK
