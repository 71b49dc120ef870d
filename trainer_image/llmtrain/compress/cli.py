"""``llmtrain compress CONFIG --stage STAGE``: one compression of the trained model, evaluated.

STAGE is ``quantize-<i>`` (spec.compression.quantization[i]), ``prune-<i>`` (spec.compression.pruning[i])
or ``distill`` (spec.compression.distillation). Reads ``<outputDir>/model`` (never writes it) and the
shards in ``dataDir``; writes ``<outputDir>/compressed/<STAGE>/`` atomically, with report.json.

``--device auto|cpu|cuda`` (default auto: CUDA when torch sees a GPU) is where pruning's recovery
training and the evaluation of pruned and distilled models run. Quantisation stages run on the CPU
whatever the GPU (their layout's int8/int4 kernels are PyTorch's CPU ones): ``auto`` picks the CPU and
``cuda`` is refused. Distillation trains its student where the training engine runs (the GPU when the
pod has one) and moves the teacher there; ``--device`` places its evaluation.

Exit codes: 0 done (or already done), 2 invalid config, stage or method/model combination, no
trained model in ``<outputDir>/model``, or data missing or too small for the evaluation (one line on
stderr naming the field or the cause, also in the termination message; nothing was loaded),
anything else a failure. ``--device cuda`` that cannot run (no GPU, or a quantisation stage) is exit 2.
"""

from __future__ import annotations

import argparse

from llmop_contract.protocol import ExitCode, TerminationMessage
from llmtrain import termination
from llmtrain.compress.device import DEVICE_CHOICES, DEVICE_HELP
from llmtrain.logs import Logger

PROG = "llmtrain compress"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="TrainerConfig YAML/JSON file")
    parser.add_argument("--stage", required=True, help="quantize-<i>, prune-<i> or distill")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    args = parser.parse_args(argv)

    # Everything below until run_stage is torch-free, so a bad stage fails in well under a second.
    from llmtrain.compress.layout import model_dir
    from llmtrain.compress.stages import ModelShape, check, check_data, resolve
    from llmtrain.config import ConfigError, load_config
    from llmtrain.exits import refuse

    try:
        cfg = load_config(args.config)
        stage = resolve(cfg, args.stage)
        shape = ModelShape.read(model_dir(cfg.paths.output_dir))  # MissingModel, a DataError
        check(stage, shape)
        check_data(cfg, stage, shape)
    except ConfigError as exc:  # StageError and DataError included
        return refuse(PROG, exc, args.stage)

    from llmtrain.compress.run import run_stage, stage_device

    try:
        device = stage_device(stage, args.device)  # imports torch: after every torch-free check
        summary = run_stage(cfg, stage, shape, Logger(rank=0), device)
    except ConfigError as exc:  # the model directory or the data turned out unusable once read
        return refuse(PROG, exc, args.stage)
    termination.write(
        TerminationMessage(
            model_path=summary["modelPath"],
            model_uri=summary.get("modelUri"),
            results=summary["results"],
            extra={"stage": summary["stage"], "method": summary["method"]},
        )
    )
    return ExitCode.OK
