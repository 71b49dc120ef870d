"""``llmtrain``: the entry point of every trainer pod.

    llmtrain prepare CONFIG   clean, deduplicate, tokenise and shard the data
    llmtrain train CONFIG     train with DeepSpeed, checkpoint, resume, export

Exit codes: 0 done, 2 invalid configuration (nothing was started), 75 preempted by SIGTERM after a
checkpoint was written (restart to resume), anything else a failure.
"""

from __future__ import annotations

import argparse
import sys

from llmtrain import exitcodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "prepare the training data"), ("train", "train the model")):
        sub.add_parser(name, help=text).add_argument("config", help="TrainerConfig YAML/JSON file")
    args = parser.parse_args(argv)

    # Validate before importing torch/DeepSpeed, so a bad config fails in well under a second.
    from llmtrain.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"llmtrain: {exc}", file=sys.stderr)
        return exitcodes.BAD_CONFIG

    if args.command == "prepare":
        from llmtrain import prepare

        prepare.run(cfg)
        return exitcodes.OK

    from llmtrain.launch import launch, wants_launcher

    if wants_launcher():
        return launch(args.config)
    from llmtrain.train.loop import run

    return run(cfg).exit_code


if __name__ == "__main__":
    sys.exit(main())
