"""Elastic gangs: shrink after the grace period to what fits, grow back when room returns.

The same passes run on a real cluster in tests/cluster/test_elastic.py; here each decision is pinned
to the clock and the capacity seen.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from llmop.builders import JobRef, workers
from llmop.capacity import Fit
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from tests.unit.test_planner import NOW, Observed, plan, pod, snapshot

GRACE = 60


def elastic(num: int = 2, **w: Any) -> LLMTrainingJobSpec:
    return LLMTrainingJobSpec.model_validate(
        {
            "data": {"prepare": False},
            "training": {"maxSteps": 10, "globalBatchSize": w.pop("batch", 4), "microBatchSize": 1},
            "workers": {
                "numNodes": num,
                "procsPerNode": 1,
                "gpusPerNode": 1,
                "resizeGraceSeconds": GRACE,
                **w,
            },
        }
    )


def gated(n: int, attempt: int) -> list[Any]:
    return [pod(i, attempt=attempt, phase="Pending", gated=True, node=None) for i in range(n)]


def short(feasible: int, needed: int = 2) -> Fit:
    return Fit(
        False, feasible, needed, f"needs {needed} nodes with 1 free nvidia.com/gpu; {feasible} available"
    )


def waiting(s: LLMTrainingJobSpec, n: int = 2) -> dict[str, Any]:
    """The status of a gang waiting for capacity as attempt 2 (after its node was lost)."""
    first = plan(snapshot(s, {"attempt": 2}), Observed(gated(n, 2), None, NOW, fit=short(n - 1, n)))
    assert first.status["state"] == "Pending"
    return first.status


def test_a_gang_short_of_nodes_waits_the_grace_period_then_restarts_on_what_fits() -> None:
    s = elastic(minNodes=1)
    status = waiting(s)
    early = plan(
        snapshot(s, status), Observed(gated(2, 2), None, NOW + timedelta(seconds=GRACE - 1), fit=short(1))
    )
    assert early.status["attempt"] == 2 and not early.delete_pods and early.requeue_after <= 2
    late = plan(
        snapshot(s, early.status), Observed(gated(2, 2), None, NOW + timedelta(seconds=GRACE), fit=short(1))
    )
    assert late.status["attempt"] == 3 and late.status["currentNodes"] == 1
    assert sorted(late.delete_pods) == ["j-worker-0", "j-worker-1"]
    [entry] = late.status["resizes"]
    assert (entry["fromNodes"], entry["toNodes"], entry["attempt"], entry["reason"]) == (
        2,
        1,
        3,
        "GangShrunk",
    )
    assert [(e.reason, e.key) for e in late.events if e.key] == [("GangShrunk", "attempt-3")]
    assert late.status["restartCount"] == 0 and late.status["disruptionCount"] == 0  # a resize is neither
    # The next pass builds the smaller gang: one worker, and its pod says NNODES=1.
    after = plan(snapshot(s, late.status), Observed([], None, NOW + timedelta(seconds=GRACE + 1)))
    assert after.create_workers == [0]
    ref = JobRef("j", "ns", "uid", s.at_size(after.status["currentNodes"]))
    env = {e["name"]: e.get("value") for e in workers.build_worker(ref, 0, 3)["spec"]["containers"][0]["env"]}
    assert env["NNODES"] == "1"


def test_a_fixed_gang_or_one_at_its_minimum_keeps_waiting() -> None:
    fixed = elastic()
    p = plan(
        snapshot(fixed, waiting(fixed)), Observed(gated(2, 2), None, NOW + timedelta(hours=1), fit=short(1))
    )
    assert p.status["attempt"] == 2 and not p.delete_pods and p.status["state"] == "Pending"
    floor = elastic(minNodes=2, maxNodes=3)
    p = plan(
        snapshot(floor, waiting(floor)), Observed(gated(2, 2), None, NOW + timedelta(hours=1), fit=short(1))
    )
    assert p.status["attempt"] == 2 and not p.delete_pods


def test_only_sizes_that_keep_the_global_batch_are_chosen() -> None:
    # globalBatchSize 8 on 1 process per node: 4 and 2 nodes keep it, 3 would need 8/3 micro-batches.
    s = elastic(4, minNodes=2, batch=8)
    status = waiting(s, 4)
    p = plan(
        snapshot(s, status), Observed(gated(4, 2), None, NOW + timedelta(seconds=GRACE), fit=short(3, 4))
    )
    assert p.status["currentNodes"] == 2
    assert s.elastic_sizes() == [4, 2]


def running_at(s: LLMTrainingJobSpec, size: int) -> dict[str, Any]:
    status = plan(
        snapshot(s, {"attempt": 3, "currentNodes": size}),
        Observed([pod(i, 3) for i in range(size)], None, NOW),
    )
    assert status.status["state"] == "Running"
    return status.status


def test_a_smaller_gang_grows_back_when_room_has_lasted_the_grace_period() -> None:
    s = elastic(minNodes=1)
    status = running_at(s, 1)
    gang = [pod(0, 3)]
    first = plan(snapshot(s, status), Observed(gang, None, NOW, room=1))
    assert not first.delete_pods and first.status["capacityShortSince"]
    gone = plan(snapshot(s, first.status), Observed(gang, None, NOW + timedelta(seconds=5), room=0))
    assert "capacityShortSince" not in gone.status  # the room went away: the clock starts again
    again = plan(snapshot(s, gone.status), Observed(gang, None, NOW + timedelta(seconds=10), room=1))
    grown = plan(snapshot(s, again.status), Observed(gang, None, NOW + timedelta(seconds=10 + GRACE), room=1))
    assert grown.status["currentNodes"] == 2 and grown.status["attempt"] == 4
    assert grown.delete_pods == ["j-worker-0"]  # with its grace period: the trainer checkpoints on SIGTERM
    assert grown.status["resizes"][-1]["reason"] == "GangGrown"
    # At its largest size nothing more is asked for, whatever room there is.
    full = running_at(s, 2)
    p = plan(snapshot(s, full), Observed([pod(0, 3), pod(1, 3)], None, NOW + timedelta(hours=1), room=5))
    assert not p.delete_pods and p.status["currentNodes"] == 2


def test_a_gang_admitted_on_a_stale_view_shrinks_to_the_workers_placed() -> None:
    s = elastic(minNodes=1)
    placed = pod(0, 2, phase="Pending")
    stuck = pod(1, 2, phase="Pending", node=None, unschedulable="0/5 nodes are available")
    first = plan(snapshot(s, {"attempt": 2}), Observed([placed, stuck], None, NOW))
    assert first.status["state"] == "Pending" and not first.delete_pods
    later = NOW + timedelta(seconds=GRACE)
    p = plan(snapshot(s, first.status), Observed([placed, stuck], None, later))
    assert p.status["currentNodes"] == 1 and p.status["attempt"] == 3
    assert p.status["resizes"][-1]["reason"] == "GangShrunk"
