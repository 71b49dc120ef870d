"""The operator's own Prometheus metrics (the trainer exports training metrics itself)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmop.conditions import parse_time
from llmop_contract.api.v1alpha1.status import JobState, PreparationStatus, StageStatus
from llmop_contract.protocol import StageName

REGISTRY = CollectorRegistry()

JOBS_CREATED = Counter(
    "llmop_jobs_created_total", "LLMTrainingJobs accepted by the operator", ["namespace"], registry=REGISTRY
)
JOBS_SUCCEEDED = Counter(
    "llmop_jobs_succeeded_total", "LLMTrainingJobs that succeeded", ["namespace"], registry=REGISTRY
)
JOBS_FAILED = Counter(
    "llmop_jobs_failed_total", "LLMTrainingJobs that failed", ["namespace", "reason"], registry=REGISTRY
)
JOBS_RESTARTED = Counter(
    "llmop_jobs_restarted_total",
    "Gang restarts, by cause (WorkerFailed counts against backoffLimit)",
    ["namespace", "reason"],
    registry=REGISTRY,
)
JOBS_BY_STATE = Gauge("llmop_jobs", "LLMTrainingJobs by state", ["state"], registry=REGISTRY)
TIME_TO_RUNNING = Histogram(
    "llmop_gang_time_to_running_seconds",
    "Time from a gang's creation (or the job's, for the first attempt) until every worker runs",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
RESTART_LOST = Histogram(
    "llmop_restart_lost_seconds",
    "Per gang restart: seconds from the restart until training was back at the step it had reached"
    " (restart, resume and recomputed steps; status.interruptions[].lostSeconds)",
    ["namespace"],
    buckets=(5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "llmop_reconcile_duration_seconds",
    "Duration of one reconcile pass",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "llmop_reconcile_errors_total", "Reconcile passes that raised", ["namespace"], registry=REGISTRY
)
JOB_INFO = Gauge(
    "llmop_job_info",
    "One series per live job",
    ["namespace", "job", "nodes", "gpus_per_node"],
    registry=REGISTRY,
)
JOB_STEP = Gauge(
    "llmop_job_training_step",
    "Training step read from the rank-0 trainer",
    ["namespace", "job"],
    registry=REGISTRY,
)
JOB_LOSS = Gauge(
    "llmop_job_training_loss",
    "Training loss read from the rank-0 trainer",
    ["namespace", "job"],
    registry=REGISTRY,
)
JOB_GOODPUT = Gauge(
    "llmop_job_goodput",
    "Productive training seconds over wall seconds since the job started (status.progress.goodput)",
    ["namespace", "job"],
    registry=REGISTRY,
)
JOB_TOKENS = Gauge(
    "llmop_job_tokens_per_second",
    "Tokens/s read from the rank-0 trainer",
    ["namespace", "job"],
    registry=REGISTRY,
)
STAGE_DURATION = Histogram(
    "llmop_stage_duration_seconds",
    "Wall time of finished lifecycle stages (prepare, train, each compression method)",
    ["namespace", "stage", "method", "result"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
    registry=REGISTRY,
)
COMPRESSION_RESULT = Gauge(
    "llmop_compression_result",
    "Key figures of a finished compression stage relative to the trained model",
    ["namespace", "job", "stage", "method", "figure"],
    registry=REGISTRY,
)
# The figures worth a time series; the rest stays in status.
COMPRESSION_FIGURES = ("sizeRatio", "perplexityIncreasePercent", "speedup", "sparsity", "parameterRatio")
JOB_RESTARTS = Gauge("llmop_job_restarts", "restartCount of the job", ["namespace", "job"], registry=REGISTRY)
PREPARE_PODS = Gauge(
    "llmop_prepare_phase_pods",
    "data.distributed: pods of each preparation phase by state (Succeeded, Failed, Pending: not yet done)",
    ["namespace", "job", "phase", "state"],
    registry=REGISTRY,
)
PREPARE_DOCUMENTS = Gauge(
    "llmop_prepare_phase_documents",
    "data.distributed: documents the finished pods of each preparation phase read and kept",
    ["namespace", "job", "phase", "kind"],
    registry=REGISTRY,
)

_states: dict[tuple[str, str], str] = {}
STATES = tuple(state.value for state in JobState)


def set_state(namespace: str, job: str, state: str | None) -> None:
    if state:
        _states[(namespace, job)] = state
    _publish_states()


def _publish_states() -> None:
    counts = dict.fromkeys(STATES, 0)
    for s in _states.values():
        counts[s] = counts.get(s, 0) + 1
    for state, n in counts.items():
        JOBS_BY_STATE.labels(state).set(n)


def _stage_kind(name: str) -> str:
    """The stage label: quantize/prune/distill for compression stages, else the stage's own name."""
    try:
        return StageName.parse(name).kind.value
    except ValueError:
        return name  # prepare, train, onnx, serve


def record_stage(namespace: str, job: str, stage: StageStatus) -> None:
    """A stage just ended: its duration, and for compression its headline figures."""
    method = stage.method or stage.name
    if stage.start_time and stage.completion_time:
        seconds = (parse_time(stage.completion_time) - parse_time(stage.start_time)).total_seconds()
        STAGE_DURATION.labels(namespace, _stage_kind(stage.name), method, stage.state.value).observe(seconds)
    for figure in COMPRESSION_FIGURES:
        if figure in stage.results:
            COMPRESSION_RESULT.labels(namespace, job, stage.name, method, figure).set(stage.results[figure])


def job_info(namespace: str, job: str, nodes: int, gpus: int) -> None:
    JOB_INFO.labels(namespace, job, str(nodes), str(gpus)).set(1)


def forget(namespace: str, job: str) -> None:
    """Drop every per-job series: no stale series after a job is deleted."""
    _states.pop((namespace, job), None)
    _publish_states()
    for gauge in (JOB_STEP, JOB_LOSS, JOB_TOKENS, JOB_RESTARTS, JOB_GOODPUT):
        try:
            gauge.remove(namespace, job)
        except KeyError:
            pass
    for family in (JOB_INFO, COMPRESSION_RESULT, PREPARE_PODS, PREPARE_DOCUMENTS):
        for labels in list(family._metrics):
            if labels[0] == namespace and labels[1] == job:
                family.remove(*labels)


def record_preparation(namespace: str, job: str, status: PreparationStatus | None) -> None:
    """Each phase's pods and documents, from status.preparation."""
    for phase in status.phases if status is not None else ():
        done = _count_indexes(phase.completed_indexes)
        failed = _count_indexes(phase.failed_indexes)
        for state, n in (("Succeeded", done), ("Failed", failed), ("Pending", phase.pods - done - failed)):
            PREPARE_PODS.labels(namespace, job, phase.name.value, state).set(max(0, n))
        for kind, value in (("read", phase.documents_read), ("kept", phase.documents_kept)):
            if value is not None:
                PREPARE_DOCUMENTS.labels(namespace, job, phase.name.value, kind).set(value)


def _count_indexes(ranges: str | None) -> int:
    """Indexes in the Job's compact form, "0-2,5" -> 4."""
    count = 0
    for part in (ranges or "").split(","):
        lo, _, hi = part.partition("-")
        if lo.strip().isdigit():
            count += (int(hi) if hi.strip().isdigit() else int(lo)) - int(lo) + 1
    return count
