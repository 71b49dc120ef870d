"""The data-preparation batch Job that must succeed before the training gang starts."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest, batch, pod
from llmop_contract.api.v1alpha1.workload import Stage
from llmop_contract.protocol import Env, ExitCode

GPU = "nvidia.com/gpu"


def build_prepare_job(job: JobRef) -> Manifest:
    # The trainer's image, identity, volumes and placement; the node's CPU and memory, no GPUs (and
    # no limits, no priority class: preparation is CPU work that should not preempt training).
    requests = {k: v for k, v in job.spec.workers.resources_per_node.requests.items() if k != GPU}
    # The user's environment, credentials, volumes and the hub token: pod.STAGES[PREPARE].
    main = pod.container(
        job,
        Stage.PREPARE,
        "prepare",
        ["prepare", pod.CONFIG_PATH],
        [*pod.home_env(), pod.var(Env.JOB_NAME, job.name)],
        pod.resources(requests),
    )
    labels = naming.common_labels(job.name, naming.ROLE_PREPARE)
    return batch.batch_job(
        job,
        naming.prepare_job_name(job.name),
        labels,
        {"labels": labels},
        pod.pod_spec(job, Stage.PREPARE, main),
        backoff_limit=job.spec.run_policy.backoff_limit,
        # Preparation is idempotent (a re-run finds the manifest and exits), so a crash is retried;
        # a refusal (exit 2: a source that does not exist, no usable record) fails at once.
        failure_rules=[batch.fail_on_exit_codes("prepare", [int(ExitCode.BAD_CONFIG)])],
    )
