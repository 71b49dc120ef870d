"""``llmtrain export-onnx``: ONNX export of a model directory, verified with onnxruntime.

    llmtrain export-onnx --model-dir DIR --out DIR [--tolerance 1e-3] [--opset N]

Writes OUT/model.onnx (+ model.onnx.data for graphs over 2 GB), the tokenizer and config files and
report.json. Exit 0 when the largest |PyTorch - onnxruntime| logit difference is within the
tolerance (and the termination message carries the figures), 1 when it is not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmop_contract.protocol import ExitCode, TerminationMessage
from llmtrain import termination
from llmtrain.logs import Logger


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmtrain export-onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="model directory (trained export or compressed stage)")
    p.add_argument("--out", required=True, help="output directory (replaced)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |logit difference|")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad flags, which is our BAD_CONFIG too
        return int(exc.code or 0)
    from llmtrain.config import DataError
    from llmtrain.exits import refuse

    if not (Path(args.model_dir) / "config.json").is_file():
        missing = DataError(f"{args.model_dir} is not a model directory (no config.json)")
        return refuse("llmtrain export-onnx", missing, "onnx")
    if not args.tolerance > 0:
        print("llmtrain export-onnx: --tolerance must be > 0", file=sys.stderr)
        return ExitCode.BAD_CONFIG

    from llmtrain.serve.onnx_export import export_onnx

    log = Logger(rank=0)
    report = export_onnx(args.model_dir, args.out, args.tolerance, args.opset)
    log.event(
        "onnx_exported" if report.passed else "onnx_mismatch",
        path=report.onnx_path,
        exporter=report.exporter,
        max_abs_diff=report.max_abs_diff,
        tolerance=report.tolerance,
        size_bytes=report.size_bytes,
        seconds=report.seconds,
        fallback_reason=report.fallback_reason or "",
    )
    if not report.passed:
        print(
            f"llmtrain export-onnx: onnxruntime logits differ from PyTorch by {report.max_abs_diff:.3g} "
            f"> tolerance {report.tolerance:g} (see {Path(args.out) / 'report.json'})",
            file=sys.stderr,
        )
        return 1
    termination.write(
        TerminationMessage(
            model_path=str(args.out),
            results={
                "maxAbsDiff": float(report.max_abs_diff),
                "tolerance": float(report.tolerance),
                "sizeBytes": float(report.size_bytes),
                "seconds": float(report.seconds),
            },
            extra={"stage": "onnx"},
        )
    )
    return ExitCode.OK
