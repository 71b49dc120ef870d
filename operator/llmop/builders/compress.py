"""Compression stages: one batch Job per requested method, run after training succeeds."""

from __future__ import annotations

from dataclasses import dataclass

from llmop import naming
from llmop.builders import JobRef, Manifest, storage, workers
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec


@dataclass(frozen=True)
class Stage:
    """A compression stage: its name (the `llmtrain compress --stage` argument) and method."""

    name: str
    method: str
    model_dir: str | None = None  # input of the ONNX export stage (the chosen model)


ONNX = "onnx"
ONNX_DIR = f"{storage.OUTPUT_DIR}/onnx"


def stages(spec: LLMTrainingJobSpec) -> list[Stage]:
    """Stages in spec order; names index into the spec's lists, as `llmtrain compress` reads them."""
    c = spec.compression
    if c is None:
        return []
    out = [Stage(f"quantize-{i}", q.method.value) for i, q in enumerate(c.quantization)]
    out += [Stage(f"prune-{i}", p.method.value) for i, p in enumerate(c.pruning)]
    if c.distillation is not None:
        out.append(Stage("distill", "Distillation"))
    return out


def _resources(job: JobRef) -> Manifest:
    assert job.spec.compression is not None
    res = job.spec.compression.resources
    out: Manifest = {}
    if res.requests:
        out["requests"] = {k: str(v) for k, v in res.requests.items()}
    if res.limits:
        out["limits"] = {k: str(v) for k, v in res.limits.items()}
    return out


def build_compress_job(job: JobRef, stage: Stage) -> Manifest:
    # Same image, identity, volumes, placement and hardening as a worker (the trained model and the
    # shards are on the job's volume); the compression section's resources instead of a node's.
    worker = workers.build_worker(job, 0, attempt=0)
    container = worker["spec"]["containers"][0]
    container["name"] = "compress"
    if stage.name == ONNX:
        assert stage.model_dir is not None
        container["args"] = ["export-onnx", "--model-dir", stage.model_dir, "--out", ONNX_DIR]
    else:
        container["args"] = ["compress", f"{naming.CONFIG_MOUNT}/{naming.CONFIG_FILE}", "--stage", stage.name]
    # Not the rendezvous or metrics variables of a gang member; the user's env (DS_ACCELERATOR, ...) stays.
    keep = {"HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "LLMOP_JOB_NAME", "LLMOP_JOB_NAMESPACE"}
    keep |= {e.name for e in job.spec.workers.env}
    container["env"] = [e for e in container["env"] if e["name"] in keep]
    container.pop("ports", None)
    container["resources"] = _resources(job)
    pod_spec = {
        k: v
        for k, v in worker["spec"].items()
        if k not in ("hostname", "subdomain", "schedulingGates", "schedulerName")
    }
    pod_spec["restartPolicy"] = "Never"
    pod_spec["volumes"] = storage.volumes(job)
    labels = {**naming.common_labels(job.name, naming.ROLE_COMPRESS), naming.STAGE_LABEL: stage.name}
    template_meta: Manifest = {"labels": labels}
    if annotations := worker["metadata"].get("annotations"):
        template_meta["annotations"] = {
            k: v for k, v in annotations.items() if not k.startswith(("kueue.", "scheduling."))
        }
    assert job.spec.compression is not None
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job.metadata(naming.compress_job_name(job.name, stage.name), labels),
        "spec": {
            "backoffLimit": job.spec.compression.backoff_limit,
            # Evictions and preemptions are not the method's fault: they do not use up retries.
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    # Exit 2 is a bad method/parameter combination: retrying cannot help.
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "compress", "operator": "In", "values": [2]},
                    },
                ]
            },
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }
