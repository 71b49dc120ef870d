"""Goodput of a long run under random node failures: fixed vs elastic gang, fixed vs recommended interval.

A simulation, seeded, of the decisions the operator takes, with the times it needs measured here:

1. Measured on this machine (real `llmtrain train` runs, 2 ranks under torchrun, ZeRO-2, CPU): the
   seconds one checkpoint takes (the trainer's ``checkpoint`` events), and the restart: from starting
   the resumed run to its first step (imports, DeepSpeed start-up, the checkpoint's verification and
   load), plus the gang recovery the operator adds before that (``--gang-recovery-seconds``, the p50 of
   benchmarks/recovery.py on kwok, docs/benchmarks.md).
2. Simulated: ``--gpus`` GPUs in nodes of 8 for ``--days`` of wall time; node failures as a Poisson
   process at Llama 3's rate (466 interruptions in 54 days on 16,384 GPUs) scaled to the GPU count. A
   failed node comes back after ``--repair-minutes`` (exponential). Every failure loses the work since
   the last checkpoint and costs one restart.

   - fixed gang: waits for the node to return (``--spare-minutes`` when a spare is swapped in, here no
     spares: the repair time), then restarts at full size;
   - elastic gang (minNodes = nodes - 4): after ``--grace-seconds`` without a replacement, restarts on
     the nodes left; grows back at the first checkpoint after the node returns (one more restart,
     nothing recomputed). The global batch is kept, so a smaller gang does the same steps slower.

Goodput is productive training time over wall time (seconds spent on steps that are kept, not
recomputed, not waiting, not restarting, not writing checkpoints); "work" is the steps done relative
to the full gang running all the time (a smaller gang's steps take longer). The interval is
``--interval-minutes`` (a common fixed choice) or Daly's from the measured checkpoint time and the
interruption rate (llmop_contract.interval).

    python benchmarks/goodput.py [--gpus 1024] [--days 30] [--trials 20] [--seed 0]

The last line is ``simulated goodput at 1024 GPUs: X`` for the elastic gang at the recommended
interval (goal >= 0.95). Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT)]

from llmop_contract import interval  # noqa: E402

GPUS_PER_NODE = 8


# --- 1. measured here -------------------------------------------------------------------------------


def measure(work: Path) -> tuple[float, float, float]:
    """(checkpoint seconds p50, restart-to-first-step seconds, step seconds) from real runs."""
    from llmtrain import prepare
    from llmtrain.config import load_config
    from llmtrain.testing import debug_config
    from llmtrain.train.dist import free_port
    from tests.trainer.ranks import TRAIN, env, events

    data = work / "data"
    prepare.run(load_config(str(debug_config(work / "prep", data))))

    def spec(steps: int) -> dict[str, object]:
        return {
            "training": {
                "maxSteps": steps,
                "microBatchSize": 4,
                "globalBatchSize": 16,
                "logIntervalSteps": 1,
                "checkpointing": {"intervalSteps": 10, "keepLast": 2},
                "evaluation": {"intervalSteps": 1000, "maxBatches": 1},
            },
            "deepspeed": {"zeroStage": 2},
            "workers": {"procsPerNode": 2},
        }

    log = work / "train.log"

    def train(steps: int) -> float:
        config = debug_config(work / "run", data, spec(steps))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", *TRAIN, str(config)]
        started = time.time()
        with log.open("a") as out:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), check=True, timeout=900)
        return started

    train(40)
    launched = train(50)  # resumes from step 40
    checkpoints = [float(e["seconds"]) for e in events(log, "checkpoint")]
    progress = events(log, "progress")
    first_after = next(e for e in progress if float(e["ts"]) > launched)
    restart = float(first_after["ts"]) - launched
    steps = [e for e in progress if float(e["ts"]) < launched]
    step_seconds = (float(steps[-1]["ts"]) - float(steps[5]["ts"])) / (len(steps) - 6)
    return statistics.median(checkpoints), restart, step_seconds


# --- 2. simulated ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    nodes: int
    checkpoint_seconds: float
    restart_seconds: float
    interval_seconds: float
    repair_seconds: float
    grace_seconds: float
    elastic: bool
    min_nodes: int


@dataclass
class Outcome:
    wall: float = 0.0
    productive: float = 0.0
    work: float = 0.0
    """Full-gang-equivalent productive seconds."""
    interruptions: int = 0
    resizes: int = 0


def simulate(s: Setting, wall_seconds: float, node_mtbf_seconds: float, rng: random.Random) -> Outcome:
    """One run of ``wall_seconds``. Any healthy node fails at rate 1 / node_mtbf and is repaired alone;
    a failure of a node outside the running gang (a shrunk gang leaves healthy nodes idle) interrupts
    nothing. Failure times are redrawn after every pause (memoryless, so this is exact)."""
    out = Outcome()
    t, up, gang = 0.0, s.nodes, s.nodes
    repairs: list[float] = []  # when failed nodes come back
    since_checkpoint = 0.0  # productive seconds since the last checkpoint: lost at an interruption

    def repaired(now: float) -> None:
        nonlocal up
        while repairs and repairs[0] <= now:
            repairs.pop(0)
            up += 1

    def wait_for(nodes: int) -> None:
        nonlocal t
        while up < nodes:
            t = max(t, repairs[0])
            repaired(t)

    failure = t + rng.expovariate(up / node_mtbf_seconds)
    while t < wall_seconds:
        end = min(t + s.interval_seconds - since_checkpoint, failure, wall_seconds)
        ran = end - t
        out.productive += ran
        out.work += ran * gang / s.nodes
        since_checkpoint += ran
        t = end
        repaired(t)
        if t >= wall_seconds:
            break
        if t == failure:
            hit_gang = rng.random() < gang / up
            up -= 1
            repairs.append(t + rng.expovariate(1 / s.repair_seconds))
            repairs.sort()
            if hit_gang:
                out.interruptions += 1
                out.productive -= since_checkpoint
                out.work -= since_checkpoint * gang / s.nodes
                since_checkpoint = 0.0
                if s.elastic:
                    # A replacement within the grace period keeps the size; otherwise restart on the
                    # nodes left (never below minNodes: then wait for enough to come back).
                    if repairs[0] - t <= s.grace_seconds and up + 1 >= gang:
                        wait_for(gang)
                    else:
                        t += s.grace_seconds
                        repaired(t)
                        wait_for(s.min_nodes)
                    new_gang = min(up, s.nodes)
                    out.resizes += int(new_gang != gang)
                    gang = new_gang
                else:
                    wait_for(s.nodes)
                t += s.restart_seconds
                repaired(t)
        else:  # a checkpoint boundary
            t += s.checkpoint_seconds
            since_checkpoint = 0.0
            repaired(t)
            if s.elastic and gang < min(up, s.nodes):
                gang = min(up, s.nodes)  # grow back at the checkpoint: nothing is recomputed
                out.resizes += 1
                t += s.restart_seconds
                repaired(t)
        failure = t + rng.expovariate(up / node_mtbf_seconds)
    out.wall = max(t, wall_seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1024)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval-minutes", type=float, default=60.0)
    parser.add_argument("--repair-minutes", type=float, default=120.0)
    parser.add_argument("--grace-seconds", type=float, default=120.0)
    parser.add_argument("--gang-recovery-seconds", type=float, default=0.46)
    # What-if figures for a larger model than the one measured here (both skip the measurement).
    parser.add_argument("--checkpoint-seconds", type=float, help="instead of the measured checkpoint time")
    parser.add_argument("--restart-seconds", type=float, help="instead of the measured restart time")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="with the two above")
    args = parser.parse_args()

    if args.checkpoint_seconds is not None and args.restart_seconds is not None:
        checkpoint, restart, step = args.checkpoint_seconds, args.restart_seconds, args.step_seconds
        source = "given"
    else:
        with tempfile.TemporaryDirectory(prefix="llmop-goodput-") as tmp:
            checkpoint, restart, step = measure(Path(tmp))
        source = "measured here"
    restart_total = restart + args.gang_recovery_seconds
    print(
        f"{source}: checkpoint {checkpoint:.3f} s, restart to first step {restart:.2f} s, step {step:.3f} s"
    )
    print(
        f"restart incl. gang recovery ({args.gang_recovery_seconds} s, recovery.py p50): {restart_total:.2f} s"
    )

    nodes = args.gpus // GPUS_PER_NODE
    job_mtbf = interval.mean_time_between_interruptions(args.gpus)
    node_mtbf = job_mtbf * nodes
    recommended = interval.daly_interval(checkpoint, job_mtbf)
    print(
        f"{args.gpus} GPUs ({nodes} nodes): one interruption every {job_mtbf / 3600:.1f} h (Llama 3 rate); "
        f"recommended interval {recommended / 60:.1f} min ({interval.interval_steps(checkpoint, step, job_mtbf)} "
        f"steps of {step:.3f} s) vs fixed {args.interval_minutes:.0f} min"
    )
    rows: dict[str, float] = {}
    for name, elastic, every in (
        ("fixed gang, fixed interval", False, args.interval_minutes * 60),
        ("fixed gang, recommended interval", False, recommended),
        ("elastic gang, fixed interval", True, args.interval_minutes * 60),
        ("elastic gang, recommended interval", True, recommended),
    ):
        setting = Setting(
            nodes=nodes,
            checkpoint_seconds=checkpoint,
            restart_seconds=restart_total,
            interval_seconds=every,
            repair_seconds=args.repair_minutes * 60,
            grace_seconds=args.grace_seconds,
            elastic=elastic,
            min_nodes=max(1, nodes - 4),
        )
        rng = random.Random(args.seed)
        outcomes = [simulate(setting, args.days * 86400, node_mtbf, rng) for _ in range(args.trials)]
        goodput = statistics.mean(o.productive / o.wall for o in outcomes)
        work = statistics.mean(o.work / o.wall for o in outcomes)
        interruptions = statistics.mean(o.interruptions for o in outcomes)
        resizes = statistics.mean(o.resizes for o in outcomes)
        rows[name] = goodput
        print(
            f"{name:36s} goodput {goodput:.4f}  work {work:.4f}  "
            f"interruptions {interruptions:.1f}  resizes {resizes:.1f}  ({args.trials} x {args.days:g} days)"
        )
    print(f"simulated goodput at {args.gpus} GPUs: {rows['elastic gang, recommended interval']:.4f}")


if __name__ == "__main__":
    main()
