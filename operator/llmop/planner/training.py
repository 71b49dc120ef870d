"""Training: one gang of workers per attempt, its placement, and the failure policy (restart the
whole gang or fail the job); when every worker succeeded, the trained model and its final figures."""

from __future__ import annotations

from enum import StrEnum

from llmop import conditions as cond
from llmop import progress
from llmop.builders import storage
from llmop.capacity import Fit
from llmop.observe import PodView
from llmop.planner import elastic, gang, remote, resume, stages
from llmop.planner.context import TRAIN, Event, Pass
from llmop.termination import final_figures
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import JobReason, JobState, Progress, StageState
from llmop_contract.api.v1alpha1.workload import ExitCodeAction, RestartPolicy


class Failure(StrEnum):
    DISRUPTION = "disruption"  # the platform's doing: not counted against backoffLimit
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


def classify_failure(spec: LLMTrainingJobSpec, pod: PodView) -> Failure:
    if pod.disrupted:
        return Failure.DISRUPTION
    policy = spec.run_policy
    code = pod.exit_code if pod.exit_code is not None else -1
    for rule in policy.exit_code_rules:
        if code in rule.exit_codes:
            return Failure.RETRYABLE if rule.action == ExitCodeAction.RESTART else Failure.PERMANENT
    if policy.restart_policy == RestartPolicy.NEVER:
        return Failure.PERMANENT
    if policy.restart_policy == RestartPolicy.EXIT_CODE:
        # Kubeflow's convention: 1-127 are the program's own errors, 128+ are signals (OOM kill, ...).
        return Failure.PERMANENT if 1 <= code <= 127 else Failure.RETRYABLE
    return Failure.RETRYABLE


def train(p: Pass) -> None:
    attempt = p.status.attempt or 1
    p.status.attempt = attempt
    current = [x for x in p.seen.pods if x.attempt == attempt]
    stale = [x for x in p.seen.pods if x.attempt != attempt]
    if stale:
        # Never two gangs at once: the next attempt starts only once every old pod is gone.
        p.delete_pods(stale)
        p.status.state = JobState.RESTARTING
        return
    if lost := lost_worker(p, current):
        # Its node is gone or NotReady: the worker is lost now, whatever the pod's phase still says
        # (nothing updates it until the pod is garbage-collected). Its peers' errors that follow are
        # the same disruption, so this comes before the failure policy.
        node = lost.node or ""
        what = f"node {node} of worker {lost.index} {p.seen.lost_nodes[node]}"
        restart(p, attempt, JobReason.NODE_LOST, what)
        return
    if evicted := next((x for x in current if x.deleting and x.disrupted), None):
        # Evicted, preempted or drained (DisruptionTarget): restart now rather than once it is gone,
        # so its peers stop (and checkpoint) together instead of hanging in collectives meanwhile.
        restart(p, attempt, JobReason.WORKER_DISRUPTED, f"worker {evicted.name} is being evicted")
        return
    present = {x.index for x in current}
    missing = [i for i in range(p.spec.workers.num_nodes) if i not in present]
    if missing and any(x.running or x.failed or x.succeeded for x in current):
        # A worker vanished from a started gang (node lost, pod deleted): its peers are stuck
        # in collectives, so the whole gang restarts, without counting against backoffLimit.
        restart(p, attempt, JobReason.WORKER_LOST, f"worker {missing[0]} disappeared from the running gang")
        return
    if missing:
        p.plan.create_workers = missing
        p.stage(TRAIN, StageState.RUNNING)
        p.status.state = JobState.STARTING
        return
    if failed := [x for x in current if x.failed]:
        restart_or_fail(p, failed[0], attempt)
        return
    if all(x.succeeded for x in current):
        trained(p, current, attempt)
        return
    if gang.admitted(p, current):
        placement(p, current)


def lost_worker(p: Pass, current: list[PodView]) -> PodView | None:
    """A worker of the current gang on a lost node that it had not finished on, if any."""
    lost = p.seen.lost_nodes
    return next((x for x in current if x.node in lost and not x.succeeded), None)


def placement(p: Pass, current: list[PodView]) -> None:
    """An admitted gang: Pending while the scheduler cannot place it, Running once all workers run."""
    if unschedulable := [x for x in current if x.unschedulable]:
        message = f"{unschedulable[0].name}: {unschedulable[0].unschedulable}"
        # Admitted on a capacity view that was already stale (a node gone meanwhile): an elastic
        # gang shrinks to the workers the scheduler placed, after the same grace period.
        placed = sum(1 for x in current if x.node)
        if elastic.shrink(p, p.status.attempt, Fit(False, placed, len(current), message)):
            return
        p.condition(cond.GANG_SCHEDULED, False, JobReason.UNSCHEDULABLE, message)
        p.status.state = JobState.PENDING
        return
    if not all((x.running and x.ready) or x.succeeded for x in current):
        p.config_blocked(cond.RUNNING, current)
        p.status.state = JobState.STARTING
        return
    if not p.holds(cond.RUNNING):
        p.plan.gang_running_since = p.seen.now
    elif elastic.grow(p, p.status.attempt, p.seen.room):
        return
    n = len(current)
    p.condition(cond.GANG_SCHEDULED, True, JobReason.GANG_SCHEDULED, f"all {n} workers placed")
    p.condition(cond.RESTARTING, False, JobReason.ALL_WORKERS_RUNNING, "the gang is running")
    p.condition(cond.RUNNING, True, JobReason.ALL_WORKERS_RUNNING, f"all {n} workers are running")
    p.status.state = JobState.RUNNING


def trained(p: Pass, current: list[PodView], attempt: int) -> None:
    p.stage(TRAIN, StageState.SUCCEEDED)
    rank0 = next((x for x in current if x.index == 0), None)
    figures = final_figures(rank0.termination_message if rank0 else "")
    resume.report(p.job, p.plan, attempt, resume.Resumed.terminated(figures.message))
    if figures.progress:
        # The last scrape may predate the final step; the trainer's own summary is authoritative.
        before = p.status.progress.to_wire() if p.status.progress else {}
        final = dict(figures.progress)
        if "productiveSeconds" in final:
            final["productiveSeconds"] = round(final["productiveSeconds"], 1)
            share = progress.goodput(final["productiveSeconds"], p.status.start_time, p.seen.now)
            if share is not None:
                final["goodput"] = share
        if "energyJoules" in final:
            values = {"energyAvailable": 1.0, "energyJoules": final.pop("energyJoules")}
            if "joulesPerToken" in final:
                values["joulesPerToken"] = final.pop("joulesPerToken")
            final.update(progress.energy_wire(values))
        p.status.progress = Progress.model_validate({**before, **final, "updateTime": p.now})
    entry = p.stage(TRAIN, StageState.SUCCEEDED)
    entry.output_path = figures.model_path or f"{storage.OUTPUT_DIR}/model"
    p.status.output_model_path = entry.output_path
    if figures.model_uri:
        entry.output_uri = figures.model_uri
    final_step = p.status.progress.step if p.status.progress else None
    remote.uploaded(p.job, p.plan, p.seen.now, figures.model_uri, final_step)
    message = f"training finished in attempt {attempt}"
    p.condition(cond.TRAINED, True, JobReason.TRAINING_SUCCEEDED, message)
    p.condition(cond.RESTARTING, False, JobReason.TRAINING_SUCCEEDED, message)
    stages.post_training(p)


def restart_or_fail(p: Pass, pod: PodView, attempt: int) -> None:
    kind = classify_failure(p.spec, pod)
    what = f"worker {pod.name} failed (exit code {pod.exit_code}, reason {pod.reason or 'Error'})"
    if kind == Failure.PERMANENT:
        p.fail(JobReason.PERMANENT_FAILURE, f"{what}; not retryable under the restart policy")
        return
    if kind == Failure.DISRUPTION:
        restart(p, attempt, JobReason.WORKER_DISRUPTED, what)
        return
    limit = p.spec.run_policy.backoff_limit
    if p.status.restart_count >= limit:
        p.fail(JobReason.BACKOFF_LIMIT_EXCEEDED, f"{what}; backoffLimit {limit} reached")
        return
    p.status.restart_count += 1
    restart(p, attempt, JobReason.WORKER_FAILED, what)


def restart(p: Pass, attempt: int, reason: JobReason, what: str) -> None:
    if reason != JobReason.WORKER_FAILED:
        p.status.disruption_count += 1
    # Record the new attempt before deleting anything: if the operator dies right after, the
    # next pass sees attempt-N pods as stale and finishes the restart without counting twice.
    p.interrupted(attempt, reason)
    p.status.attempt = attempt + 1
    p.delete_all_pods()
    p.condition(cond.RUNNING, False, reason, what)
    message = f"{what}; restarting the whole gang as attempt {attempt + 1}"
    p.condition(cond.RESTARTING, True, reason, message)
    # Its own Event, not only the condition's transition: a restart while Restarting is still True
    # (a second failure before the gang ran again) changes no condition status, yet is a restart.
    p.plan.events.append(Event(reason, message, warning=True, key=f"attempt-{attempt + 1}"))
    p.status.state = JobState.RESTARTING
