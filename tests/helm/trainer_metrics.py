"""A rank-0 trainer's metrics endpoint for a job whose pods kwok plays: `llmtrain`'s own Metrics
registry and HTTP server, on the worker-0 pod's (loopback) IP and metrics port, driven through a
scripted run: steps advance, loss falls, throughput and MFU are reported as the trainer does.

Nothing trains on kwok's fake nodes; this puts the real series, with their real names, types and
server, where the operator's progress reader and Prometheus' PodMonitor look for them.

    python -m tests.helm.trainer_metrics ADDR PORT TOTAL_STEPS SECONDS
"""

from __future__ import annotations

import math
import signal
import sys
import time

from llmtrain.train.metrics import Metrics

TOKENS_PER_STEP = 8 * 256  # global batch 8, sequence 256


def main(argv: list[str]) -> int:
    addr, port, total, seconds = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    metrics = Metrics(with_mfu=True)  # as on a GPU whose peak FLOP/s is known
    metrics.total_steps.set(total)
    metrics.serve(port, addr=addr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving llmtrain metrics on {addr}:{port}", flush=True)
    start = time.monotonic()
    step = 0
    while True:
        elapsed = time.monotonic() - start
        target = min(total, int(total * elapsed / seconds))
        if target > step:
            metrics.tokens.inc((target - step) * TOKENS_PER_STEP)
            step = target
            metrics.step.set(step)
            metrics.loss.set(2.0 + 6.0 * math.exp(-step / (total / 3)))
            metrics.lr.set(3e-4 * min(1.0, step / 10))
            metrics.tokens_per_second.set(TOKENS_PER_STEP * total / seconds)
            metrics.samples_per_second.set(8 * total / seconds)
            assert metrics.mfu is not None and metrics.flops_per_second is not None
            metrics.mfu.set(0.41)
            metrics.flops_per_second.set(0.41 * 989e12)
            metrics.memory.set(9.5e9)
            metrics.eta.set(max(0.0, seconds - elapsed))
            if step % max(1, total // 4) == 0:
                metrics.val_loss.set(2.1 + 6.0 * math.exp(-step / (total / 3)))
                metrics.val_ppl.set(math.exp(2.1 + 6.0 * math.exp(-step / (total / 3))))
                metrics.checkpoint_seconds.set(0.8)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
