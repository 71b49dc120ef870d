"""Remote checkpoint benchmark: training step time with and without storage.remote, same checkpoints.

Two kinds of run of ``llmtrain train`` (one process, CPU DeepSpeed, ZeRO 0), each in its own
subprocess, alternated ``--repeats`` times: ``local`` checkpoints to the volume only; ``remote`` does
the same and uploads every checkpoint to a SeaweedFS S3 server on 127.0.0.1 (tests/s3server.py,
started here; ``make bins`` builds ``weed``) in the background. The model is large enough that a
checkpoint is a visible cost on a CPU (``--hidden 384 --layers 6``: ~11M parameters, ~130 MB of model
and Adam state per checkpoint), saved every ``--interval`` steps.

Step time is the wall time between the progress events of step ``--warmup`` and of the last step,
divided by the steps between them: it includes the saves in that span (each save hashes its files
for the integrity manifest in both kinds; the remote kind also queues the upload, and waits when
maxPendingUploads are already queued) and the upload thread's competition for the CPU; the end of the
run (final save, export, model upload, drain) is outside it. Each kind's fastest run is kept (on a
shared machine the neighbours' load only ever adds time) and its median is printed beside it; the
ratio is remote / local of the fastest runs. The S3 server runs on the same cores as the trainer here
(its CPU seconds are printed), which a real object store does not.

    DS_ACCELERATOR=cpu python benchmarks/checkpoint_upload.py [--repeats 2] [--steps 60] [--interval 10]

The last line is ``remote checkpoint step-time ratio: X`` (goal <= 1.05). Nothing asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[checkpoint_upload {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spec(args: argparse.Namespace, remote: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": {
            "hiddenSize": args.hidden,
            "numLayers": args.layers,
            "numHeads": args.hidden // 64,
            "numKeyValueHeads": args.hidden // 64,
            "intermediateSize": args.hidden * 8 // 3 // 64 * 64,
            "contextLength": 128,
        },
        "training": {
            "maxSteps": args.steps,
            "sequenceLength": 128,
            "microBatchSize": 4,
            "globalBatchSize": 4,
            "logIntervalSteps": 1,
            "lrSchedule": {"warmupSteps": 5},
            "checkpointing": {"intervalSteps": args.interval, "keepLast": 2},
            "evaluation": {"intervalSteps": 100_000, "maxBatches": 1},
        },
    }
    if remote is not None:
        out["storage"] = remote
    return out


def run(config: Path, env: dict[str, str], warmup: int, steps: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"llmtrain train exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    records = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    at = {r["step"]: r["ts"] for r in records if r["event"] == "progress"}
    saves = [r["seconds"] for r in records if r["event"] == "checkpoint"]
    uploads = [r for r in records if r["event"] == "remote_uploaded" and "/checkpoints/" in r["uri"]]
    return {
        "step_seconds": (at[steps] - at[warmup]) / (steps - warmup),
        "save_seconds": statistics.mean(saves[:-1]) if len(saves) > 1 else float("nan"),
        "upload_seconds": statistics.mean(r["seconds"] for r in uploads) if uploads else 0.0,
        "upload_mb": (uploads[0]["bytes"] / 1e6) if uploads else 0.0,
        "uploads": float(len(uploads)),
        "failures": float(sum(1 for r in records if r["event"] == "remote_upload_failed")),
    }


def server_cpu_seconds(s3: Any) -> float:
    """CPU seconds the S3 server has used so far: on this machine it shares the trainer's cores."""
    import psutil

    times = psutil.Process(s3.proc.pid).cpu_times()
    return float(times.user + times.system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the trainer")
    args = parser.parse_args()

    from llmop_dev import cluster as devcluster
    from llmtrain.testing import debug_config, license_documents, write_shards
    from tests.s3server import S3Server

    weed = devcluster.cache_dir() / "bin" / "weed"
    if not weed.exists():
        print(f"{weed} is missing: run `make bins` first", file=sys.stderr)
        return 1
    base_env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    base_env.update(
        DS_ACCELERATOR="cpu",
        LLMTRAIN_LOG_FORMAT="json",
        LLMOP_METRICS_PORT="0",
        OMP_NUM_THREADS=str(args.threads),
    )
    with tempfile.TemporaryDirectory(prefix="llmop-bench-upload-") as tmp, S3Server(weed) as s3:
        root = Path(tmp)
        data = write_shards(root / "data", license_documents(), vocab_size=512)
        bucket = s3.make_bucket(f"bench-{secrets.token_hex(4)}")
        keys = {k: v for k, v in s3.env().items() if "ENDPOINT" not in k}
        results: dict[str, list[dict[str, float]]] = {"local": [], "remote": []}
        for i in range(args.repeats):
            for kind in ("local", "remote"):
                remote = None
                if kind == "remote":
                    remote = {
                        "objectStore": {
                            "endpoint": s3.endpoint,
                            "region": s3.region,
                            "addressingStyle": "Path",
                        },
                        "remote": {"uri": f"s3://{bucket}/run-{i}"},
                    }
                config = debug_config(root / f"{kind}-{i}", data, spec(args, remote))
                env = {**base_env, **(keys if kind == "remote" else {})}
                server_cpu = server_cpu_seconds(s3)
                figures = run(config, env, args.warmup, args.steps)
                figures["server_cpu_s"] = server_cpu_seconds(s3) - server_cpu
                results[kind].append(figures)
                log(f"{kind} run {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    def fastest(kind: str) -> float:
        return min(r["step_seconds"] for r in results[kind])

    local, remote = fastest("local"), fastest("remote")
    print(
        f"model hidden={args.hidden} layers={args.layers}, {args.steps} steps, checkpoint every {args.interval}, "
        f"threads={args.threads}, repeats={args.repeats}"
    )
    print(
        f"checkpoint: {median('remote', 'upload_mb'):.1f} MB, save {median('local', 'save_seconds'):.2f} s (local) / "
        f"{median('remote', 'save_seconds'):.2f} s (remote), background upload {median('remote', 'upload_seconds'):.2f} s, "
        f"failed attempts {sum(r['failures'] for r in results['remote']):.0f}, "
        f"S3 server CPU per remote run {median('remote', 'server_cpu_s'):.1f} s (on the trainer's cores)"
    )
    print(
        f"step time, fastest (median): local {local:.4f} s ({median('local', 'step_seconds'):.4f} s), "
        f"remote {remote:.4f} s ({median('remote', 'step_seconds'):.4f} s); "
        f"runs local {[round(r['step_seconds'], 4) for r in results['local']]}, "
        f"remote {[round(r['step_seconds'], 4) for r in results['remote']]}"
    )
    print(f"remote checkpoint step-time ratio: {remote / local:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
