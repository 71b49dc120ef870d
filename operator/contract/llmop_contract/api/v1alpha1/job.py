"""The LLMTrainingJob kind: spec, identity and the cross-field rules that span sections."""

from __future__ import annotations

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.api.v1alpha1.data import DataSpec
from llmop_contract.api.v1alpha1.lifecycle import CompressionSpec, ServingSpec
from llmop_contract.api.v1alpha1.model import ModelSpec
from llmop_contract.api.v1alpha1.training import DeepSpeedSpec, TrainingSpec
from llmop_contract.api.v1alpha1.workload import RunPolicy, SchedulingSpec, StorageSpec, WorkersSpec

GROUP = "llmop.io"
VERSION = "v1alpha1"
KIND = "LLMTrainingJob"
PLURAL = "llmtrainingjobs"
SINGULAR = "llmtrainingjob"
SHORT_NAMES = ("llmjob", "ltj")
CATEGORIES = ("llmop", "all")

# Child names are derived from the job name ("<name>-worker-<i>", "<name>-compress-<method>-<n>"),
# and pod hostnames and label values must stay within 63 characters.
MAX_NAME_LENGTH = 40


def _samples_per_micro_step(spec: LLMTrainingJobSpec) -> int:
    return spec.training.micro_batch_size * spec.workers.num_nodes * spec.workers.procs_per_node


class LLMTrainingJobSpec(ApiModel):
    """Desired state of an LLMTrainingJob: one training run through its whole lifecycle."""

    rules = (
        Rule(
            # The guard keeps a zero (already rejected by its own minimum) from adding a
            # "modulus by zero" error on top of the real one.
            "self.training.microBatchSize * self.workers.numNodes * self.workers.procsPerNode == 0"
            " || self.training.globalBatchSize % (self.training.microBatchSize * self.workers.numNodes"
            " * self.workers.procsPerNode) == 0",
            lambda m: m.training.global_batch_size % _samples_per_micro_step(m) == 0,
            "training.globalBatchSize must be a multiple of training.microBatchSize x workers.numNodes"
            " x workers.procsPerNode",
            ".training.globalBatchSize",
        ),
        Rule(
            "self.training.sequenceLength <= self.model.contextLength",
            lambda m: m.training.sequence_length <= m.model.context_length,
            "training.sequenceLength must not exceed model.contextLength",
            ".training.sequenceLength",
        ),
        Rule(
            "self.training.precision != 'FP16' || self.deepspeed.zeroStage <= 2"
            " || self.deepspeed.offloadParameters == 'None'",
            lambda m: (
                m.training.precision != "FP16"
                or m.deepspeed.zero_stage <= 2
                or m.deepspeed.offload_parameters == "None"
            ),
            "FP16 with ZeRO 3 parameter offload is not supported; use BF16",
            ".training.precision",
        ),
    )

    model: ModelSpec = Field(default_factory=ModelSpec)
    """Model architecture, size and initialisation."""
    data: DataSpec
    """Data preparation."""
    training: TrainingSpec
    """Training loop."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed engine."""
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    """Gang shape, image and placement."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restarts, deadline, suspension, clean-up."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Gang scheduler and queue."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Shared storage."""
    compression: CompressionSpec | None = None
    """Compression after training."""
    serving: ServingSpec | None = None
    """Serving after success."""

    @property
    def world_size(self) -> int:
        """Training processes over all nodes."""
        return self.workers.num_nodes * self.workers.procs_per_node

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimiser step on each process."""
        return self.training.global_batch_size // _samples_per_micro_step(self)
