"""A dense learning-rate grid for examples/search.yaml, run through the real stack; the reference the
TPE search is judged against (tests/e2e/test_search_local.py).

    LLMOP_CLUSTER_NAME=llmop-hpo .venv/bin/python benchmarks/hpo_grid.py [--points 21] [--parallel 2]

Starts (or reuses) the local cluster, the development runtime and the operator, and applies the
example with its algorithm switched to Grid over ``points`` learning rates evenly spaced in log10
over the example's own range, early stopping off (every point trains to the end). Each trial is the
same LLMTrainingJob a TPE trial would be (same template, seed and single-threaded CPU training, so a
learning rate always gives the same loss). Writes benchmarks/hpo_grid.json: every point's final
validation loss as the search's status reports it (six decimals), the best, the machine it ran on,
and a digest of the trial template so a test can tell the figures are for the template it runs. Another
machine gives slightly different losses (other SIMD kernels): benchmarks/hpo_variation.py measures by
how much, and the tests compare with that tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from llmop_dev import cluster
from llmop_dev.stack import start_operator, start_runtime

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "search.yaml"
OUT = REPO / "benchmarks" / "hpo_grid.json"
NAMESPACE = "llmop-hpo-grid"
NAME = "lr-grid"
# The search goes only after its trial jobs, whose finalizer needs the operator still running.
FOREGROUND = ("--cascade=foreground", "--timeout=300s")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def template_digest(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def grid_search(points: int, parallel: int) -> dict[str, Any]:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    spec = manifest["spec"]
    (lr,) = spec["parameters"]
    lo, hi = math.log10(lr["min"]), math.log10(lr["max"])
    values = [f"{10 ** (lo + (hi - lo) * k / (points - 1)):.6g}" for k in range(points)]
    spec["parameters"] = [{"name": "lr", "path": lr["path"], "type": "Categorical", "choices": values}]
    spec.update(algorithm="Grid", maxTrials=points, parallelTrials=parallel, maxFailedTrials=points)
    spec.pop("earlyStopping", None)
    manifest["metadata"]["name"] = NAME
    return dict(manifest)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)
    kubeconfig = cluster.up()
    bin_dir = cluster.ensure_binaries()
    logs = Path.home() / ".cache" / "llmop" / "hpo-grid"

    def kubectl(*a: str, input: str | None = None, check: bool = True) -> str:
        return cluster.kubectl(bin_dir, kubeconfig, *a, input=input, check=check)

    kubectl("create", "namespace", NAMESPACE, check=False)
    runtime = start_runtime(kubeconfig, logs / "runtime.log")
    operator, _ = start_operator(kubeconfig, NAMESPACE, logs / "operator.log")
    started = time.monotonic()
    try:
        kubectl("delete", "llmsearch", NAME, "-n", NAMESPACE, "--ignore-not-found", *FOREGROUND)
        manifest = grid_search(args.points, args.parallel)
        kubectl(
            "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest)
        )  # JSON: YAML would unquote "1e-05"
        finished = -1
        while True:
            status = (
                json.loads(kubectl("get", "llmsearch", NAME, "-n", NAMESPACE, "-o", "json")).get("status")
                or {}
            )
            counts = status.get("counts") or {}
            if counts.get("finished", 0) != finished:
                finished = counts.get("finished", 0)
                print(
                    f"[{time.monotonic() - started:6.0f}s] {finished}/{args.points} trials finished",
                    flush=True,
                )
            if status.get("state") in ("Succeeded", "Failed"):
                break
            time.sleep(5)
        seconds = time.monotonic() - started
        results = [
            {
                "lr": t["parameters"]["lr"],
                "validationLoss": t.get("value"),
                "trial": t["name"],
                "state": t["state"],
            }
            for t in status["trials"]
        ]
        best = min((r for r in results if r["validationLoss"] is not None), key=lambda r: r["validationLoss"])
        report = {
            "command": f"benchmarks/hpo_grid.py --points {args.points} --parallel {args.parallel}",
            "example": "examples/search.yaml",
            "templateDigest": template_digest(manifest["spec"]["trialTemplate"]),
            "points": results,
            "best": best,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
            "seconds": round(seconds),
        }
        OUT.write_text(json.dumps(report, indent=1) + "\n")
        for r in results:
            print(f"  lr {r['lr']:<10g} validation loss {r['validationLoss']}")
        print(
            f"best: lr {best['lr']:g} validation loss {best['validationLoss']} ({seconds:.0f} s); wrote {OUT}"
        )
        return 0 if status.get("state") == "Succeeded" else 1
    finally:
        kubectl("delete", "llmsearch", NAME, "-n", NAMESPACE, "--ignore-not-found", *FOREGROUND, check=False)
        operator.stop()
        runtime.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
