"""What one planning pass of a job shares between its phases: the job as read (typed status
included), what was observed of its children, and the plan being built.

Each phase (``lifecycle``, ``preparation``, ``training``, ``gang``, ``stages``, ``serving``) is a set of
functions of a ``Pass``; ``llmop.planner.plan`` runs them in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from llmop import conditions as cond
from llmop import naming
from llmop.builders.compress import Stage
from llmop.capacity import Fit
from llmop.observe import BatchJobView, PodView, ServingView
from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.lifecycle import ServingEngine
from llmop_contract.api.v1alpha1.status import (
    FINISHED_STAGE_STATES,
    MAX_INTERRUPTIONS,
    Interruption,
    JobReason,
    JobState,
    LLMTrainingJobStatus,
    StageState,
    StageStatus,
)

PREPARE = "prepare"  # the data preparation stage's entry in status.stages
TRAIN = "train"  # the training stage's entry


@dataclass(frozen=True)
class JobSnapshot:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: LLMTrainingJobSpec
    status: LLMTrainingJobStatus


@dataclass(frozen=True)
class Observed:
    pods: list[PodView]
    prepare: BatchJobView | None
    now: datetime
    fit: Fit | None = None  # only computed when gated workers wait for capacity (see ``gang``)
    # Nodes free for one more worker each beside the running gang: only computed for an elastic
    # gang running below its largest size (see ``elastic.grow``).
    room: int | None = None
    # data.distributed: the phases' Indexed Jobs (``prepare`` is the single-pod Job otherwise).
    prepare_phases: list[BatchJobView] = field(default_factory=list)
    compress_jobs: list[BatchJobView] = field(default_factory=list)
    compress_pods: list[PodView] = field(default_factory=list)
    serving: ServingView | None = None
    serving_unavailable: str | None = None  # e.g. KServe asked for but its CRDs are not installed
    # The nodes of this job's pods that are gone or not ready, each with what happened to it
    # ("was deleted", "is NotReady (Ready=Unknown)"); see ``llmop.nodewatch``.
    lost_nodes: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    status: LLMTrainingJobStatus
    ensure_base: bool = False
    create_prepare: bool = False
    create_prepare_phase: PreparePhase | None = None  # data.distributed: the phase Job to create
    create_workers: list[int] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    # Deleted with grace 0: their node is lost, so no kubelet will ever confirm their termination.
    force_delete_pods: list[str] = field(default_factory=list)
    ungate: list[str] = field(default_factory=list)
    # Kueue Workloads of gang attempts that are over (``naming.kueue_pod_group``).
    delete_workloads: list[str] = field(default_factory=list)
    create_compress: list[Stage] = field(default_factory=list)
    delete_batch_jobs: list[str] = field(default_factory=list)
    finished_stages: list[StageStatus] = field(default_factory=list)  # stage entries that just ended
    serve_model: str | None = None  # ensure serving of this model directory
    serve_engine: ServingEngine = ServingEngine.BUILTIN  # with this engine
    remove_serving: bool = False
    delete_job: bool = False
    transitions: list[cond.Transition] = field(default_factory=list)
    requeue_after: float | None = None
    gang_running_since: datetime | None = None  # set when the gang just became fully Running
    events: list[Event] = field(default_factory=list)  # posted besides the conditions' transitions


@dataclass(frozen=True)
class Event:
    """An Event about the job that is not a condition's transition."""

    reason: str
    message: str
    warning: bool = False
    # Set for an Event that must be posted exactly once (a restart, keyed by the attempt it starts):
    # the operator names it from the job's UID and this key and posts it before the status write
    # (see ``llmop.events``).
    key: str | None = None


class Pass:
    """One planning pass: the job, what was seen, and the plan (with its typed status) being built."""

    def __init__(self, job: JobSnapshot, seen: Observed) -> None:
        # The spec as the current attempt runs it: numNodes is an elastic gang's current size
        # (``planner.elastic``); job.spec keeps the size as written.
        self.job, self.seen, self.spec = (
            job,
            seen,
            job.spec.at_size(job.status.current_nodes or job.spec.workers.num_nodes),
        )
        self.plan = Plan(status=job.status.model_copy(deep=True))
        self.status = self.plan.status
        if self.status.current_nodes is None:  # from the first pass on: the NODES printer column
            self.status.current_nodes = self.spec.workers.num_nodes
        self.now = cond.now_iso(seen.now)

    def condition(self, type_: str, status: bool, reason: JobReason, message: str) -> None:
        t = cond.set_condition(
            self.status.conditions, type_, status, reason, message, self.job.generation, self.seen.now
        )
        if t:
            self.plan.transitions.append(t)

    def config_blocked(self, type_: str, pods: Iterable[PodView]) -> str | None:
        """Condition ``type_`` False/ContainerConfigError while one of ``pods`` cannot start because a
        Secret, ConfigMap or key it refers to is missing; the kubelet's message (names, never values),
        a Warning Event the first time. None when no pod is blocked."""
        pod = next((x for x in pods if x.config_error and not x.deleting), None)
        if pod is None:
            return None
        why = (
            f"pod {pod.name} cannot start: {pod.config_error} (a Secret, ConfigMap or key named by"
            " workers.env, workers.envFrom, workers.volumes or storage.objectStore.credentialsSecret)"
        )
        before = cond.find(self.status.conditions, type_)
        transitions = len(self.plan.transitions)
        self.condition(type_, False, JobReason.CONTAINER_CONFIG_ERROR, why)
        new = before is None or before.reason != JobReason.CONTAINER_CONFIG_ERROR
        if new and len(self.plan.transitions) == transitions:  # a transition posts its own Event
            self.plan.events.append(Event(JobReason.CONTAINER_CONFIG_ERROR, why, warning=True))
        return why

    def holds(self, type_: str) -> bool:
        return cond.holds(self.status.conditions, type_)

    def observe_generation(self) -> None:
        """This pass acts on the spec as it is now: say so in observedGeneration, with an Event when
        an edit (of the sections that stay mutable: runPolicy, compression, serving) was taken up."""
        seen = self.status.observed_generation
        if seen is not None and seen < self.job.generation:
            message = f"generation {self.job.generation} of the spec applied (was {seen})"
            self.plan.events.append(Event(JobReason.SPEC_UPDATED, message))
        self.status.observed_generation = self.job.generation

    def find_stage(self, name: str) -> StageStatus | None:
        return next((s for s in self.status.stages if s.name == name), None)

    def stage(self, name: str, state: StageState, message: str | None = None) -> StageStatus:
        """Move a stage's entry to ``state`` (created Pending first); times are stamped on the way."""
        entry = self.find_stage(name)
        if entry is None:
            entry = StageStatus(name=name, state=StageState.PENDING)
            self.status.stages.append(entry)
        if state == StageState.RUNNING and not entry.start_time:
            entry.start_time = self.now
        if state in FINISHED_STAGE_STATES and entry.state not in FINISHED_STAGE_STATES:
            entry.start_time = entry.start_time or self.now
            entry.completion_time = self.now
            self.plan.finished_stages.append(entry)
        entry.state = state
        if message is not None:
            entry.message = message
        return entry

    def finished(self) -> bool:
        return self.holds(cond.SUCCEEDED) or self.holds(cond.FAILED)

    def interrupted(self, attempt: int, reason: JobReason) -> None:
        """Record that the gang of ``attempt`` stops and ``attempt + 1`` will resume it
        (``progress.settle_interruption`` fills in what it cost once the new attempt has caught up)."""
        last = self.status.interruptions[-1] if self.status.interruptions else None
        if last is not None and last.attempt == attempt and last.lost_seconds is None:
            # The attempt that was to resume never trained (its gang did not fit, and is resized now):
            # the same interruption goes on, still counted from its own cause and time.
            last.attempt = attempt + 1
            return
        step = self.status.progress.step if self.status.progress is not None else 0
        entry = Interruption(attempt=attempt + 1, reason=reason, time=self.now, step_before=step)
        self.status.interruptions = [*self.status.interruptions, entry][-MAX_INTERRUPTIONS:]

    def delete_all_pods(self) -> None:
        self.delete_pods(self.seen.pods)
        # Compression still running when the job fails (deadline, deletion of the gang) stops too.
        self.plan.delete_batch_jobs = [j.name for j in self.seen.compress_jobs if j.active]

    def delete_pods(self, pods: list[PodView]) -> None:
        """Delete these pods: gracefully, or at once where their node is lost.

        A pod on a deleted or NotReady node stays Terminating until the node comes back or the pod
        garbage collector removes it (a minute or more), and the next gang waits for every old pod
        to be gone: only a deletion with grace 0 removes it now. Even one already Terminating.
        """
        lost = self.seen.lost_nodes
        self.plan.delete_pods = [p.name for p in pods if not p.deleting and p.node not in lost]
        self.plan.force_delete_pods = [p.name for p in pods if p.node in lost]
        if self.spec.scheduling.kueue_queue is not None:
            # A pod of a Kueue pod group keeps Kueue's finalizer until its Workload is finished or
            # deleted, and a group whose pods are gone is never finished: it would hold its quota
            # and its pods Terminating forever. A gang attempt whose pods go is over, so is its
            # Workload (Kueue then stops and releases its pods). Already-deleting pods count too:
            # those are the ones Kueue itself stopped to preempt the gang.
            self.plan.delete_workloads = sorted(
                {naming.kueue_pod_group(self.job.name, p.attempt) for p in pods}
            )

    def fail(self, reason: JobReason, message: str) -> None:
        self.delete_all_pods()
        self.condition(cond.RUNNING, False, reason, message)
        self.condition(cond.RESTARTING, False, reason, message)
        self.condition(cond.FAILED, True, reason, message)
        self.status.completion_time = self.now
        self.status.state = JobState.FAILED
