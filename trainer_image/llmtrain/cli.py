"""``llmtrain``: the entry point of every trainer pod.

    llmtrain prepare CONFIG                 clean, deduplicate, tokenise and shard the data
    llmtrain train CONFIG                   train with DeepSpeed, checkpoint, resume, export
    llmtrain compress CONFIG --stage STAGE  quantise, prune or distil the trained model, evaluated
    llmtrain serve ...                      OpenAI-compatible completions API for a model directory
    llmtrain export-onnx ...                ONNX export of a model directory, checked with onnxruntime

Exit codes: 0 done, 2 invalid configuration (nothing was started), 75 preempted by SIGTERM after a
checkpoint was written (restart to resume), anything else a failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llmop_contract.protocol import ExitCode

# Subcommands with their own argument parsers, imported only when used (serve needs no DeepSpeed).
_DELEGATED = {
    "compress": "llmtrain.compress.cli",
    "serve": "llmtrain.serve.cli",
    "export-onnx": "llmtrain.serve.onnx_cli",
}


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] in _DELEGATED:
        module = importlib.import_module(_DELEGATED[args_list[0]])
        code: int = module.main(args_list[1:])
        return code
    parser = argparse.ArgumentParser(prog="llmtrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "prepare the training data"), ("train", "train the model")):
        sub.add_parser(name, help=text).add_argument("config", help="TrainerConfig YAML/JSON file")
    for name in _DELEGATED:
        sub.add_parser(name, help=f"see `llmtrain {name} --help`")
    args = parser.parse_args(args_list)

    if args.command == "prepare":  # the same entry as `python -m llmtrain.prepare`
        from llmtrain.prepare.entry import main as prepare_main

        return prepare_main(args.config)

    # Validate before importing torch/DeepSpeed, so a bad config fails in well under a second.
    from llmtrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"llmtrain: {exc}", file=sys.stderr)
        return ExitCode.BAD_CONFIG

    from llmtrain.launch import launch, wants_launcher

    if wants_launcher():
        return launch(args.config)
    from llmtrain.train.loop import run

    return run(cfg).exit_code


if __name__ == "__main__":
    sys.exit(main())
