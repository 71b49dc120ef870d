"""`llmtrain train`, the real entry point and training loop, with gates the test opens.

A tiny run takes a few seconds, so a scrape every second may or may not see it at any given step.
Rather than hoping it does, the run holds at step boundaries until the test lets it go on: the
training, the metrics registry and its HTTP server are llmtrain's own and keep serving while held.

The gate file holds a number G, written by the test (atomically, see `open_gate`). The run reports
steps up to G, then waits after computing step G+1 and before reporting it; the export after the
last step counts as step total+1, so G = total holds the run with every series of its last step
set and still served. While holding, it writes G to GATE.held, so the test can tell a held run from
a slow one.

    python -m tests.helm.paced_train GATE CONFIG
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from llmtrain import cli
from llmtrain.train import loop, sparsity


def open_gate(gate: Path, step: int) -> None:
    tmp = gate.with_suffix(".tmp")
    tmp.write_text(str(step))
    os.replace(tmp, gate)


def held(gate: Path) -> int | None:
    """The step the run is held after, or None while it is not held (or not started)."""
    path = gate.with_suffix(".held")
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    gate, config = Path(argv[0]), argv[1]
    marker = gate.with_suffix(".held")

    def allowed() -> int:
        try:
            return int(gate.read_text())
        except (OSError, ValueError):
            return -1

    def hold(step: int) -> None:
        """Block before reporting `step` until the gate lets it through."""
        if step <= allowed():
            return
        marker.write_text(str(step - 1))
        while step > allowed():
            time.sleep(0.05)
        marker.unlink()

    due, export = sparsity.due, loop.export

    def gated_due(step: int, sp: Any) -> bool:  # called once per step, before the step is reported
        hold(step)
        return due(step, sp)

    def gated_export(r: loop.Run) -> str | None:  # called once, after the last step's report
        hold(r.total_steps + 1)
        return export(r)

    sparsity.due = gated_due
    loop.export = gated_export
    return cli.main(["train", config])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
