"""The decision: from a job's spec, its last status and what is observed now, what to do next.

Pure and synchronous, so every branch is unit-testable without a cluster; ``llmop.controller``
gathers the observations and carries the plan out. Running it twice on the same input plans the
same actions, and every action is idempotent, so a crash at any point converges on the next pass.

A pass runs its phases in order over one shared ``context.Pass`` (typed status, snapshot, what was
observed, the plan being built): the lifecycle (``lifecycle``: acknowledge, deadline, suspend),
data preparation (``preparation``), training (``training``, with gang admission in ``gang``), the
post-training stages (``stages``) and, once the job succeeded, serving (``serving``).
"""

from __future__ import annotations

from llmop import conditions as cond
from llmop.planner import lifecycle, preparation, stages, training
from llmop.planner.context import JobSnapshot, Observed, Pass, Plan
from llmop.planner.training import Failure, classify_failure

__all__ = ["Failure", "JobSnapshot", "Observed", "Plan", "classify_failure", "plan"]


def plan(job: JobSnapshot, seen: Observed) -> Plan:
    p = Pass(job, seen)
    if p.finished():
        lifecycle.after_finish(p)
        return p.plan
    lifecycle.acknowledge(p)
    if lifecycle.deadline_exceeded(p) or lifecycle.suspended(p):
        return p.plan
    if p.holds(cond.TRAINED):
        # The trained model is on the volume: never train again, even if the workers' pods vanish.
        stages.post_training(p)
        return p.plan
    if p.spec.data.prepare and not preparation.prepared(p):
        return p.plan
    training.train(p)
    return p.plan
