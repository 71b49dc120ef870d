"""Compression stages: one batch Job per requested method, run after training succeeds; and the
ONNX export of the chosen model, which runs the same way."""

from __future__ import annotations

from dataclasses import dataclass

from llmop import naming
from llmop.builders import JobRef, Manifest, batch, pod, storage
from llmop_contract.api.v1alpha1 import workload
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.lifecycle import CompressionSpec
from llmop_contract.protocol import DISTILL, ExitCode, prune, quantize


@dataclass(frozen=True)
class Stage:
    """A compression stage: its name (the `llmtrain compress --stage` argument) and method."""

    name: str
    method: str
    model_dir: str | None = None  # input of the ONNX export stage (the chosen model)


ONNX = "onnx"
ONNX_DIR = f"{storage.OUTPUT_DIR}/onnx"
CONTAINER = "compress"


def stages(spec: LLMTrainingJobSpec) -> list[Stage]:
    """Stages in spec order; names index into the spec's lists, as `llmtrain compress` reads them."""
    c = spec.compression
    if c is None:
        return []
    out = [Stage(str(quantize(i)), q.method.value) for i, q in enumerate(c.quantization)]
    out += [Stage(str(prune(i)), p.method.value) for i, p in enumerate(c.pruning)]
    if c.distillation is not None:
        out.append(Stage(str(DISTILL), "Distillation"))
    return out


def _args(stage: Stage) -> list[str]:
    if stage.name == ONNX:
        assert stage.model_dir is not None
        return ["export-onnx", "--model-dir", stage.model_dir, "--out", ONNX_DIR]
    return ["compress", pod.CONFIG_PATH, "--stage", stage.name]


def build_compress_job(job: JobRef, stage: Stage) -> Manifest:
    # The trainer's image, identity, volumes and placement (the trained model and the shards are on
    # the job's volume), the compression section's resources; the job's identity and caches, then
    # what pod.STAGES[COMPRESS] gives (the user's environment, credentials, volumes), not a gang
    # member's rendezvous or metrics.
    # serving.onnxExport runs without a compression section too: then the section's defaults.
    compression = job.spec.compression or CompressionSpec()
    main = pod.container(
        job,
        workload.Stage.COMPRESS,
        CONTAINER,
        _args(stage),
        [*pod.identity_env(job), *pod.cache_env()],
        pod.resources(compression.resources.requests, compression.resources.limits),
    )
    labels = {**naming.common_labels(job.name, naming.ROLE_COMPRESS), naming.STAGE_LABEL: stage.name}
    template_metadata = batch.template_metadata(job, labels)
    return batch.batch_job(
        job,
        naming.compress_job_name(job.name, stage.name),
        labels,
        template_metadata,
        pod.pod_spec(job, workload.Stage.COMPRESS, main),
        backoff_limit=compression.backoff_limit,
        # A bad method/parameter combination: retrying cannot help.
        failure_rules=[batch.fail_on_exit_codes(CONTAINER, [int(ExitCode.BAD_CONFIG)])],
    )
