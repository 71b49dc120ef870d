"""``llmtrain``: the entry point of every trainer pod.

    llmtrain prepare CONFIG                 clean, deduplicate, tokenise and shard the data
    llmtrain prepare CONFIG --phase PHASE   one pod of distributed preparation (--index I)
    llmtrain train CONFIG                   train with DeepSpeed, checkpoint, resume, export
    llmtrain compress CONFIG --stage STAGE  quantise, prune or distil the trained model, evaluated
    llmtrain serve ...                      OpenAI-compatible completions API for a model directory
    llmtrain export-onnx ...                ONNX export of a model directory, checked with onnxruntime

Exit codes: 0 done, 2 invalid configuration or unusable data (one line on stderr naming the cause,
and in the termination message; see llmtrain/exits.py), 75 preempted by SIGTERM after a
checkpoint was written (restart to resume), anything else a failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig

# Subcommands with their own argument parsers, imported only when used (serve needs no DeepSpeed).
_DELEGATED = {
    "compress": "llmtrain.compress.cli",
    "serve": "llmtrain.serve.cli",
    "export-onnx": "llmtrain.serve.onnx_cli",
}


PREPARE_PHASES = ("scan", "dedup", "cluster", "write", "commit")


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, --phase and --index: the same for ``llmtrain prepare`` and ``python -m llmtrain.prepare``
    (here, not in llmtrain.prepare, so that parsing any command imports no numpy)."""
    parser.add_argument("config", help="TrainerConfig YAML/JSON file")
    parser.add_argument(
        "--phase", choices=PREPARE_PHASES, help="one pod of distributed preparation (default: the single pod)"
    )
    parser.add_argument(
        "--index", type=int, help="the pod's index in its phase (default: $JOB_COMPLETION_INDEX, else 0)"
    )


def check_qlora(cfg: TrainerConfig) -> None:
    """QLoRA refused before the launcher, where an exit 2 is still an exit 2 (torchrun makes it 1).

    Torch-free, like the rest of this command before launching: bitsandbytes must be installed (the
    CUDA image's ``qlora`` extra); the ranks check for a CUDA device when they load the 4-bit base.
    """
    import importlib.util

    from llmop_contract.api.v1alpha1.training import Method
    from llmtrain.config import ConfigError

    if cfg.spec.training.method == Method.QLORA and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "spec.training.method",
            "QLoRA needs bitsandbytes (the trainer image's qlora extra) and a CUDA GPU; use LoRA on CPU",
        )


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] in _DELEGATED:
        module = importlib.import_module(_DELEGATED[args_list[0]])
        code: int = module.main(args_list[1:])
        return code
    parser = argparse.ArgumentParser(prog="llmtrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prepare_arguments(sub.add_parser("prepare", help="prepare the training data"))
    sub.add_parser("train", help="train the model").add_argument(
        "config", help="TrainerConfig YAML/JSON file"
    )
    for name in _DELEGATED:
        sub.add_parser(name, help=f"see `llmtrain {name} --help`")
    args = parser.parse_args(args_list)

    if args.command == "prepare":  # the same entry as `python -m llmtrain.prepare`
        from llmtrain.prepare.entry import main as prepare_main

        return prepare_main(args.config, args.phase, args.index)

    # Validate the config and the data before importing torch/DeepSpeed (and before the launcher
    # starts torchrun, which would turn any exit code into 1), so bad input fails in under a second.
    from llmtrain.config import ConfigError, load_config
    from llmtrain.datacheck import check_training_data
    from llmtrain.exits import refuse
    from llmtrain.world import at_world, check_world

    try:
        cfg = load_config(args.config)
        # The processes this attempt runs (an elastic gang's pods say their size in NNODES; the
        # config keeps numNodes as written): the world is allowed, and the data holds a micro-batch.
        world = _pod_world(cfg)
        if world is not None:
            check_world(cfg, world)
        check_training_data(at_world(cfg, world) if world is not None else cfg)
        check_qlora(cfg)
    except ConfigError as exc:
        return refuse("llmtrain train", exc, "train")

    from llmtrain.launch import launch, wants_launcher

    if wants_launcher():
        return launch(args.config)
    from llmtrain.train.loop import run

    try:
        return run(cfg).exit_code
    except ConfigError as exc:  # found by a rank after start-up (the checks above, or a shard's content)
        return refuse("llmtrain train", exc, "train")


def _pod_world(cfg: TrainerConfig) -> int | None:
    """WORLD_SIZE when started as a rank, else NNODES x NPROC_PER_NODE of the pod's launcher."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "NNODES" in os.environ:
        per_node = int(os.environ.get("NPROC_PER_NODE", cfg.spec.workers.procs_per_node))
        return int(os.environ["NNODES"]) * per_node
    return None


if __name__ == "__main__":
    sys.exit(main())
