"""The batch Job around a run-to-completion stage's pod (data preparation, compression, ONNX export)."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest

# Scheduler group membership (Kueue pod groups, Volcano's scheduling.k8s.io/group-name): a batch
# stage's pod is not a member of the training gang.
GANG_ANNOTATIONS = ("kueue.", "scheduling.")

# As long as a worker gets to write its checkpoint: a stage stopped by an eviction finishes its write.
GRACE_SECONDS = 120


def template_metadata(job: JobRef, labels: dict[str, str]) -> Manifest:
    """A stage pod's labels, and the user's pod annotations (sidecar injection, log collection)
    except the gang scheduler's."""
    metadata: Manifest = {"labels": labels}
    annotations = {
        k: v for k, v in job.spec.workers.pod_annotations.items() if not k.startswith(GANG_ANNOTATIONS)
    }
    if annotations:
        metadata["annotations"] = annotations
    return metadata


def ignore_disruptions() -> Manifest:
    """Evictions and preemptions are not the stage's fault: they do not use up retries."""
    return {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def fail_on_exit_codes(container: str, codes: list[int]) -> Manifest:
    """A podFailurePolicy rule: these exit codes fail the Job at once (retrying cannot help)."""
    return {
        "action": "FailJob",
        "onExitCodes": {"containerName": container, "operator": "In", "values": codes},
    }


def batch_job(
    job: JobRef,
    name: str,
    labels: dict[str, str],
    template_metadata: Manifest,
    pod_spec: Manifest,
    *,
    backoff_limit: int,
    failure_rules: list[Manifest],
) -> Manifest:
    """A Job running the pod once to completion (retried by the Job controller, never restarted in place)."""
    if queue := job.spec.scheduling.kueue_queue:
        # Kueue's batch/Job integration: its webhook creates the Job suspended, and Kueue resumes it
        # once the LocalQueue's ClusterQueue has quota for its pods (and suspends it to preempt).
        labels = {**labels, naming.KUEUE_QUEUE_LABEL: queue}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job.metadata(name, labels),
        "spec": {
            "backoffLimit": backoff_limit,
            "podFailurePolicy": {"rules": [ignore_disruptions(), *failure_rules]},
            "template": {
                "metadata": template_metadata,
                "spec": {
                    **pod_spec,
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": GRACE_SECONDS,
                },
            },
        },
    }
