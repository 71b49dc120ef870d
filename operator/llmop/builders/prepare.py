"""The data-preparation batch Jobs that must succeed before the training gang starts: one Job, or
with data.distributed one Indexed Job per phase (``PreparePhase``), each pod taking its index's slice."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest, batch, pod
from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.workload import Stage
from llmop_contract.protocol import Env, ExitCode

GPU = "nvidia.com/gpu"


def _container(job: JobRef, args: list[str], requests: Manifest, limits: Manifest | None = None) -> Manifest:
    # The trainer's image, identity, volumes and placement; the user's environment, credentials,
    # volumes and the hub token: pod.STAGES[PREPARE].
    env = [*pod.home_env(), pod.var(Env.JOB_NAME, job.name)]
    return pod.container(job, Stage.PREPARE, "prepare", args, env, pod.resources(requests, limits))


def _node_requests(job: JobRef) -> Manifest:
    # The node's CPU and memory, no GPUs (and no limits, no priority class: preparation is CPU work
    # that should not preempt training).
    return {k: v for k, v in job.spec.workers.resources_per_node.requests.items() if k != GPU}


def build_prepare_job(job: JobRef) -> Manifest:
    main = _container(job, ["prepare", pod.CONFIG_PATH], _node_requests(job))
    labels = naming.common_labels(job.name, naming.ROLE_PREPARE)
    return batch.batch_job(
        job,
        naming.prepare_job_name(job.name),
        labels,
        batch.template_metadata(job, labels),
        pod.pod_spec(job, Stage.PREPARE, main),
        backoff_limit=job.spec.run_policy.backoff_limit,
        # Preparation is idempotent (a re-run finds the manifest and exits), so a crash is retried;
        # a refusal (exit 2: a source that does not exist, no usable record) fails at once.
        failure_rules=[batch.fail_on_exit_codes("prepare", [int(ExitCode.BAD_CONFIG)])],
    )


def build_phase_job(job: JobRef, phase: PreparePhase) -> Manifest:
    """The Indexed Job of one phase: its pods read their index from JOB_COMPLETION_INDEX.

    A failed pod is retried alone (backoffLimitPerIndex) while the other indexes keep what they
    finished; the trainer's per-index markers make a retried pod redo only its own share.
    """
    distributed = job.spec.data.distributed
    assert distributed is not None, "a phase Job is only built for data.distributed"
    own = distributed.resources
    requests = dict(own.requests) if own is not None else _node_requests(job)
    limits = dict(own.limits) if own is not None and own.limits else None
    main = _container(job, ["prepare", pod.CONFIG_PATH, "--phase", phase.value], requests, limits)
    labels = {**naming.common_labels(job.name, naming.ROLE_PREPARE), naming.PHASE_LABEL: phase.value}
    count = distributed.count(phase)
    manifest = batch.batch_job(
        job,
        naming.prepare_phase_job_name(job.name, phase.value),
        labels,
        batch.template_metadata(job, labels),
        pod.pod_spec(job, Stage.PREPARE, main),
        backoff_limit=job.spec.run_policy.backoff_limit,
        failure_rules=[batch.fail_on_exit_codes("prepare", [int(ExitCode.BAD_CONFIG)])],
    )
    spec = manifest["spec"]
    # backoffLimitPerIndex replaces the Job-wide backoffLimit (which then defaults to the maximum).
    del spec["backoffLimit"]
    spec.update(
        completionMode="Indexed",
        completions=count,
        parallelism=count,
        backoffLimitPerIndex=distributed.backoff_limit_per_index,
    )
    return manifest
