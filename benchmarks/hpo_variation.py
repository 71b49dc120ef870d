"""How much one search trial's validation loss moves between machines: the tolerance behind
tests/e2e/test_search_local.py's comparison with benchmarks/hpo_grid.json.

    .venv/bin/python benchmarks/hpo_variation.py [--points 2]

A trial's loss is deterministic on one machine (fixed seed, one thread), but the grid was recorded on
another: a different CPU picks other SIMD kernels (AVX-512, AVX2, none) and sums in another order.
This trains the trials the early-stopping test reruns (the ``--points`` best grid points) with the
exact trainer configuration the operator renders for them, straight through ``llmtrain prepare`` and
``llmtrain train``, under environments that change what a different machine would change: the
thread count (the issue's cheap proxy) and PyTorch's, oneDNN's and MKL's kernel ISA
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``), which is what an older
or another vendor's CPU selects by itself. Prints every final validation loss at full precision and
the largest spread per point; writes benchmarks/hpo_variation.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from llmop.builders import JobRef
from llmop.builders.config import trainer_config
from llmop.search.space import trial_spec
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.search import LLMHyperparameterSearchSpec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: benchmarks/ is not an installed package
from benchmarks.hpo_grid import cpu_model  # noqa: E402

EXAMPLE = REPO / "examples" / "search.yaml"
GRID = REPO / "benchmarks" / "hpo_grid.json"
OUT = REPO / "benchmarks" / "hpo_variation.json"

# Name -> environment on top of the trial's own (OMP_NUM_THREADS=1 from the template).
VARIANTS: dict[str, dict[str, str]] = {
    "trial (1 thread)": {},
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "AVX2 kernels": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "no-SIMD ATen kernels": {"ATEN_CPU_CAPABILITY": "default"},
}


def trial_config(search: LLMHyperparameterSearchSpec, lr: Any, work: Path) -> Path:
    """The TrainerConfig the operator puts in a trial's ConfigMap, with paths under ``work``."""
    spec = LLMTrainingJobSpec.model_validate(trial_spec(search, {"lr": lr}))
    wire = trainer_config(JobRef(name="variation", namespace="default", uid="0", spec=spec)).to_wire()
    wire["paths"] = {
        "dataDir": str(work / "data"),
        "checkpointDir": str(work / "checkpoints"),
        "outputDir": str(work / "output"),
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(wire, sort_keys=False))
    return path


def base_env(search: LLMHyperparameterSearchSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "ATEN_", "ONEDNN_"))}
    for var in search.trial_template.workers.env:
        env[var.name] = var.value or ""
    env.update(LLMTRAIN_LOG_FORMAT="json", LLMOP_METRICS_PORT="0")
    return env


def llmtrain(command: str, config: Path, env: dict[str, str]) -> dict[str, Any]:
    message = config.parent / f"{command}.termination"
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", command, str(config)],
        capture_output=True,
        text=True,
        env={**env, "LLMOP_TERMINATION_LOG": str(message)},
        timeout=1800,
    )
    if proc.returncode != 0:
        raise SystemExit(f"llmtrain {command} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return dict(json.loads(message.read_text())) if message.exists() else {}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=2)
    args = parser.parse_args(argv)
    search = LLMHyperparameterSearchSpec.model_validate(yaml.safe_load(EXAMPLE.read_text())["spec"])
    grid = json.loads(GRID.read_text())
    ranked = sorted(
        (p for p in grid["points"] if p["validationLoss"] is not None), key=lambda p: p["validationLoss"]
    )
    env = base_env(search)
    started = time.monotonic()
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="llmop-variation-") as tmp:
        data: Path | None = None
        for point in ranked[: args.points]:
            losses: dict[str, float] = {}
            for name, extra in VARIANTS.items():
                work = Path(tmp) / f"lr{point['lr']}-{len(losses)}"
                work.mkdir()
                config = trial_config(search, point["lr"], work)
                if data is None:  # the same corpus for every run: preparation is not what varies here
                    llmtrain("prepare", config, env)
                    data = work / "data"
                else:
                    (work / "data").symlink_to(data)
                summary = llmtrain("train", config, {**env, **extra})
                losses[name] = float(summary["validationLoss"])
                print(f"  lr {point['lr']:<10g} {name:<22} validation loss {losses[name]!r}", flush=True)
            spread = max(losses.values()) - min(losses.values())
            points.append(
                {"lr": point["lr"], "gridValidationLoss": point["validationLoss"], "losses": losses}
            )
            points[-1]["spread"] = spread
            print(f"  lr {point['lr']:<10g} spread {spread:.3g}", flush=True)
    report = {
        "command": f"benchmarks/hpo_variation.py --points {args.points}",
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "variants": VARIANTS,
        "points": points,
        "maxSpread": max(p["spread"] for p in points),
        "seconds": round(time.monotonic() - started),
    }
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUT} ({report['seconds']} s)")
    print(
        f"largest spread of a trial's validation loss across {len(VARIANTS)} environments: {report['maxSpread']:.3g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
