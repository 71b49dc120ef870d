"""The LLMTrainingJob kind: spec, identity and the cross-field rules that span sections."""

from __future__ import annotations

import re

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.api.v1alpha1.data import DataSpec, RecordFormat
from llmop_contract.api.v1alpha1.lifecycle import CompressionSpec, ServingSpec
from llmop_contract.api.v1alpha1.model import DEFAULT_CONTEXT_LENGTH, ModelSpec
from llmop_contract.api.v1alpha1.parallelism import ParallelismSpec
from llmop_contract.api.v1alpha1.training import DeepSpeedSpec, Method, TrainingSpec
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
# A DNS-1035 label. The apiserver admits any DNS-1123 subdomain as an object name ("my.job",
# "1job"), but the Services <name>-workers and <name>-serve need a DNS-1035 label, which is also a
# valid pod hostname (DNS-1123 label) and label value: checking the strictest covers every child.
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
_DNS_1035 = "a DNS-1035 label (lowercase letters, digits and '-', starting with a letter and ending with a letter or digit)"
JOB_CHILDREN = (
    "the Services <name>-workers and <name>-serve, the pod hostnames <name>-worker-N"
    " and the llmop.io/job-name label value"
)


def name_rule(children: str) -> Rule:
    """The root-level CEL rule on metadata.name of a kind whose children are named from it.

    Its check takes the name itself: metadata is the apiserver's, the models only see the spec.
    """
    return Rule(
        f"self.metadata.name.matches('{NAME_PATTERN}')",
        lambda name: re.fullmatch(NAME_PATTERN, name) is not None,
        f"metadata.name must be {_DNS_1035}: it names {children}",
        ".metadata.name",
    )


def derived_name_problem(name: str, max_length: int, children: str) -> str | None:
    """Why ``name`` cannot name an object whose children are derived from it, or None."""
    if len(name) > max_length:
        return f"metadata.name must be at most {max_length} characters: it names {children}"
    rule = name_rule(children)
    return None if rule.check(name) else rule.message


NAME_RULE = name_rule(JOB_CHILDREN)


def name_problem(name: str) -> str | None:
    """Why an LLMTrainingJob cannot be called ``name`` (a child would be invalid), or None."""
    return derived_name_problem(name, MAX_NAME_LENGTH, JOB_CHILDREN)


# Sections a started job cannot take a change to: the ConfigMap, the prepared data, the PVC, the
# PodGroup and the running gang were made from them. runPolicy, compression and serving stay
# mutable: the operator reads them on every pass and acts on the new value.
IMMUTABLE_SECTIONS = (
    "model",
    "data",
    "training",
    "deepspeed",
    "parallelism",
    "workers",
    "scheduling",
    "storage",
)
MUTABLE_SECTIONS = ("runPolicy", "compression", "serving")


def _immutable(section: str) -> Rule:
    return Rule(
        f"self.{section} == oldSelf.{section}",
        lambda m: True,  # a transition rule: only the apiserver sees the old object
        f"spec.{section} is immutable: create a new job",
        f".{section}",
    )


# On the job's spec only, not on LLMTrainingJobSpec.rules: a search's trialTemplate embeds the same
# model and has its own transition rule and message.
IMMUTABILITY_RULES = tuple(_immutable(section) for section in IMMUTABLE_SECTIONS)

# compression is read when training finishes: the stages are planned then, and a finished stage is
# never redone. An edit after that point would move observedGeneration without any effect, so from
# then on it is refused. A root-level transition rule, the only place CEL sees the status.
COMPRESSION_FROZEN_RULE = Rule(
    "!has(oldSelf.status) || !has(oldSelf.status.conditions)"
    " || !oldSelf.status.conditions.exists(c, c.type == 'Trained' && c.status == 'True')"
    " || (has(self.spec.compression) == has(oldSelf.spec.compression)"
    " && (!has(self.spec.compression) || self.spec.compression == oldSelf.spec.compression))",
    lambda m: True,  # a transition rule: only the apiserver sees the old object
    "spec.compression cannot change once training has finished (condition Trained): its stages"
    " were planned from the old value; create a new job",
    ".spec.compression",
)


# Processes per model replica, the data-parallel size at ``nodes``, and the effective head counts, in CEL.
_MP = "self.parallelism.tensor * self.parallelism.pipeline * self.parallelism.sequence"


def _dp(nodes: str) -> str:
    return f"({nodes} * self.workers.procsPerNode / ({_MP}))"


_HEADS = f"(has(self.model.numHeads) ? self.model.numHeads : {ModelSpec().eff('num_heads')})"
_KV_HEADS = f"(has(self.model.numKeyValueHeads) ? self.model.numKeyValueHeads : {_HEADS})"
_LAYERS = f"(has(self.model.numLayers) ? self.model.numLayers : {ModelSpec().eff('num_layers')})"


def _samples_per_micro_step(spec: LLMTrainingJobSpec, nodes: int | None = None) -> int:
    """Samples one micro-step takes over the gang: microBatchSize x model replicas at ``nodes``."""
    world = (spec.workers.num_nodes if nodes is None else nodes) * spec.workers.procs_per_node
    return spec.training.micro_batch_size * spec.parallelism.data_parallel(world)


class LLMTrainingJobSpec(ApiModel):
    """Desired state of an LLMTrainingJob: one training run through its whole lifecycle."""

    rules = (
        Rule(
            f"{_MP} == 0 || (self.workers.numNodes * self.workers.procsPerNode) % ({_MP}) == 0",
            lambda m: m.world_size % m.parallelism.model_parallel == 0,
            "workers.numNodes x workers.procsPerNode must be a multiple of parallelism tensor x pipeline"
            " x sequence: the processes left over would hold no whole model replica",
            ".parallelism",
        ),
        Rule(
            # The guards keep a zero (already rejected by its own minimum) or a world the mesh does
            # not divide (the rule above) from adding a second error on top of the real one.
            f"{_MP} == 0 || (self.workers.numNodes * self.workers.procsPerNode) % ({_MP}) != 0"
            f" || self.training.microBatchSize * {_dp('self.workers.numNodes')} == 0"
            f" || self.training.globalBatchSize % (self.training.microBatchSize * {_dp('self.workers.numNodes')}) == 0",
            lambda m: (
                m.world_size % m.parallelism.model_parallel != 0
                or m.training.global_batch_size % _samples_per_micro_step(m) == 0
            ),
            "training.globalBatchSize must be a multiple of training.microBatchSize x the data-parallel"
            " size (workers.numNodes x workers.procsPerNode / (parallelism tensor x pipeline x sequence))",
            ".training.globalBatchSize",
        ),
        Rule(
            # An elastic gang keeps the global batch by gradient accumulation, so its smallest size
            # must divide it too (larger sizes that do not are skipped when it grows).
            f"!has(self.workers.minNodes) || {_MP} == 0"
            f" || (self.workers.minNodes * self.workers.procsPerNode) % ({_MP}) != 0"
            f" || self.training.microBatchSize * {_dp('self.workers.minNodes')} == 0"
            f" || self.training.globalBatchSize % (self.training.microBatchSize * {_dp('self.workers.minNodes')}) == 0",
            lambda m: (
                m.workers.min_nodes is None
                or m.workers.min_nodes * m.workers.procs_per_node % m.parallelism.model_parallel != 0
                or m.training.global_batch_size % _samples_per_micro_step(m, m.workers.min_nodes) == 0
            ),
            "training.globalBatchSize must be a multiple of training.microBatchSize x the data-parallel"
            " size at workers.minNodes: an elastic gang keeps the global batch at every size it runs at",
            ".workers.minNodes",
        ),
        Rule(
            "self.parallelism.tensor <= self.workers.procsPerNode"
            " && self.workers.procsPerNode % self.parallelism.tensor == 0",
            lambda m: (
                m.parallelism.tensor <= m.workers.procs_per_node
                and m.workers.procs_per_node % m.parallelism.tensor == 0
            ),
            "parallelism.tensor must divide workers.procsPerNode: tensor parallel all-reduces twice per"
            " layer, so its group stays inside one node (consecutive ranks of one pod)",
            ".parallelism.tensor",
        ),
        Rule(
            f"has(self.model.pretrained) || ({_HEADS} % self.parallelism.tensor == 0"
            f" && {_KV_HEADS} % self.parallelism.tensor == 0)",
            lambda m: (
                m.model.pretrained is not None
                or (
                    m.model.eff("num_heads") % m.parallelism.tensor == 0
                    and (m.model.num_key_value_heads or m.model.eff("num_heads")) % m.parallelism.tensor == 0
                )
            ),
            "parallelism.tensor must divide model.numHeads and model.numKeyValueHeads: each rank holds"
            " whole attention heads (a pretrained model's heads are checked by the trainer at start)",
            ".parallelism.tensor",
        ),
        Rule(
            "self.parallelism.tensor == 1 || self.deepspeed.zeroStage <= 2",
            lambda m: m.parallelism.tensor == 1 or m.deepspeed.zero_stage <= 2,
            "parallelism.tensor > 1 needs deepspeed.zeroStage 0, 1 or 2: DeepSpeed's AutoTP training does"
            " not combine with ZeRO-3's parameter partitioning",
            ".deepspeed.zeroStage",
        ),
        Rule(
            "(self.parallelism.tensor == 1 && self.parallelism.pipeline == 1)"
            " || (!self.training.sparsity.enabled"
            " && self.training.regularization.l1 == 0.0 && self.training.regularization.l2 == 0.0)",
            lambda m: (
                (m.parallelism.tensor == 1 and m.parallelism.pipeline == 1)
                or (
                    not m.training.sparsity.enabled
                    and m.training.regularization.l1 == 0
                    and m.training.regularization.l2 == 0
                )
            ),
            "parallelism.tensor or pipeline > 1 does not combine with training.sparsity or L1/L2"
            " regularization: AutoTP replaces the masked, penalised projections with its own sharded"
            " layers, and the pruning schedule and the penalty need the whole model, which no stage holds",
            ".parallelism",
        ),
        Rule(
            "self.parallelism.tensor == 1 || self.training.method == 'Full'",
            lambda m: m.parallelism.tensor == 1 or m.training.method == Method.FULL,
            "parallelism.tensor > 1 needs training.method Full: adapters (LoRA, QLoRA) train on one"
            " process per replica; use data parallel for them",
            ".parallelism.tensor",
        ),
        Rule(
            "self.parallelism.pipeline == 1 || !has(self.model.pretrained)",
            lambda m: m.parallelism.pipeline == 1 or m.model.pretrained is None,
            "parallelism.pipeline > 1 needs a model from scratch (no model.pretrained): the pipeline"
            " stages (DeepSpeed PipelineModule) are built from the project's Llama blocks only",
            ".parallelism.pipeline",
        ),
        Rule(
            f"has(self.model.pretrained) || self.parallelism.pipeline <= {_LAYERS}",
            lambda m: m.model.pretrained is not None or m.parallelism.pipeline <= m.model.eff("num_layers"),
            "parallelism.pipeline must not exceed model.numLayers: every pipeline stage holds at least"
            " one transformer block",
            ".parallelism.pipeline",
        ),
        Rule(
            "self.parallelism.pipeline == 1 || (has(self.model.tieEmbeddings) && !self.model.tieEmbeddings)",
            lambda m: m.parallelism.pipeline == 1 or m.model.tie_embeddings is False,
            "parallelism.pipeline > 1 needs model.tieEmbeddings false: the embedding and the output head"
            " sit on different pipeline stages, so they cannot share one weight",
            ".parallelism.pipeline",
        ),
        Rule(
            "self.parallelism.pipeline == 1 || self.data.format.type == 'Text'",
            lambda m: m.parallelism.pipeline == 1 or m.data.format.type == RecordFormat.TEXT,
            "parallelism.pipeline > 1 needs data.format.type Text: packed records carry per-token"
            " positions that the pipeline stages do not pass along",
            ".parallelism.pipeline",
        ),
        Rule(
            "self.parallelism.pipeline == 1 || self.deepspeed.zeroStage <= 1",
            lambda m: m.parallelism.pipeline == 1 or m.deepspeed.zero_stage <= 1,
            "parallelism.pipeline > 1 needs deepspeed.zeroStage 0 or 1: DeepSpeed's PipelineEngine"
            " supports ZeRO stages 0 and 1 only",
            ".deepspeed.zeroStage",
        ),
        Rule(
            "self.parallelism.pipeline == 1 || self.training.method == 'Full'",
            lambda m: m.parallelism.pipeline == 1 or m.training.method == Method.FULL,
            "parallelism.pipeline > 1 needs training.method Full: adapters (LoRA, QLoRA) are not built"
            " for pipeline stages; use data parallel for them",
            ".parallelism.pipeline",
        ),
        Rule(
            # Ulysses all-to-alls heads: each of tensor x sequence ranks of one layer holds whole heads.
            f"self.parallelism.sequence == 1 || has(self.model.pretrained)"
            f" || ({_HEADS} % (self.parallelism.tensor * self.parallelism.sequence) == 0"
            f" && {_KV_HEADS} % (self.parallelism.tensor * self.parallelism.sequence) == 0)",
            lambda m: (
                m.parallelism.sequence == 1
                or m.model.pretrained is not None
                or (
                    m.model.eff("num_heads") % (m.parallelism.tensor * m.parallelism.sequence) == 0
                    and (m.model.num_key_value_heads or m.model.eff("num_heads"))
                    % (m.parallelism.tensor * m.parallelism.sequence)
                    == 0
                )
            ),
            "parallelism.tensor x parallelism.sequence must divide model.numHeads and"
            " model.numKeyValueHeads: DeepSpeed Ulysses hands each sequence rank whole attention heads"
            " (a pretrained model's heads are checked by the trainer at start)",
            ".parallelism.sequence",
        ),
        Rule(
            "self.training.sequenceLength % self.parallelism.sequence == 0",
            lambda m: m.training.sequence_length % m.parallelism.sequence == 0,
            "parallelism.sequence must divide training.sequenceLength: DeepSpeed Ulysses splits every"
            " sequence into equal slices",
            ".parallelism.sequence",
        ),
        Rule(
            "self.parallelism.sequence == 1 || (!has(self.model.pretrained)"
            " && self.parallelism.tensor == 1 && self.parallelism.pipeline == 1)",
            lambda m: (
                m.parallelism.sequence == 1
                or (m.model.pretrained is None and m.parallelism.tensor == 1 and m.parallelism.pipeline == 1)
            ),
            "parallelism.sequence > 1 needs a model from scratch and tensor and pipeline 1: Ulysses is"
            " built for the project's Llama, not yet combined with the other meshes",
            ".parallelism.sequence",
        ),
        Rule(
            "self.parallelism.sequence == 1 || self.data.format.type == 'Text'",
            lambda m: m.parallelism.sequence == 1 or m.data.format.type == RecordFormat.TEXT,
            "parallelism.sequence > 1 needs data.format.type Text: supervised records carry a per-token"
            " loss mask and padding that the sequence slices do not split yet",
            ".parallelism.sequence",
        ),
        Rule(
            # A pretrained model's context comes from its config.json: the trainer checks it at start.
            "has(self.model.pretrained) || self.training.sequenceLength <="
            f" (has(self.model.contextLength) ? self.model.contextLength : {DEFAULT_CONTEXT_LENGTH})",
            lambda m: (
                m.model.pretrained is not None or m.training.sequence_length <= m.model.eff("context_length")
            ),
            "training.sequenceLength must not exceed model.contextLength",
            ".training.sequenceLength",
        ),
        Rule(
            "self.training.method == 'Full' || has(self.model.pretrained)",
            lambda m: m.training.method == Method.FULL or m.model.pretrained is not None,
            "training.method LoRA and QLoRA adapt an existing model: set model.pretrained",
            ".training.method",
        ),
        Rule(
            "self.training.method != 'QLoRA' || self.workers.gpusPerNode > 0",
            lambda m: m.training.method != Method.QLORA or m.workers.gpus_per_node > 0,
            "training.method QLoRA needs GPUs (bitsandbytes 4-bit kernels are CUDA only): set"
            " workers.gpusPerNode, or use LoRA on CPU",
            ".training.method",
        ),
        Rule(
            "self.training.method != 'QLoRA' || self.deepspeed.zeroStage <= 2",
            lambda m: m.training.method != Method.QLORA or m.deepspeed.zero_stage <= 2,
            "training.method QLoRA supports deepspeed.zeroStage 0-2: the 4-bit base is not partitioned",
            ".deepspeed.zeroStage",
        ),
        Rule(
            "self.data.format.type == 'Text' || has(self.model.pretrained)",
            lambda m: m.data.format.type == RecordFormat.TEXT or m.model.pretrained is not None,
            "data.format supervised types need model.pretrained: the loss-masked records are tokenised"
            " with (and Chat rendered by the chat template of) the pretrained model's tokenizer",
            ".data.format.type",
        ),
        Rule(
            "!has(self.model.pretrained) || !has(self.data.tokenizer.path)",
            lambda m: m.model.pretrained is None or m.data.tokenizer.path is None,
            "data.tokenizer.path cannot be used with model.pretrained: its tokenizer is the model's"
            " (or model.pretrained.tokenizer)",
            ".data.tokenizer.path",
        ),
        Rule(
            "!has(self.model.pretrained) || (!self.training.sparsity.enabled"
            " && self.training.regularization.l1 == 0.0 && self.training.regularization.l2 == 0.0"
            " && self.training.regularization.dropout == 0.0)",
            lambda m: (
                m.model.pretrained is None
                or (
                    not m.training.sparsity.enabled
                    and m.training.regularization.l1 == 0
                    and m.training.regularization.l2 == 0
                    and m.training.regularization.dropout == 0
                )
            ),
            "training.sparsity and training.regularization apply to a model from scratch only; a"
            " pretrained model keeps its own dropout (use lora.dropout for adapters)",
            ".training.regularization",
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
        Rule(
            # Only the claim the operator creates has this access mode; an existing claim is the
            # user's to size and share.
            "has(self.storage.claimName) || self.storage.accessMode != 'ReadWriteOncePod'"
            " || (self.workers.numNodes == 1 && (!has(self.serving) || self.serving.replicas <= 1))",
            lambda m: (
                m.storage.claim_name is not None
                or m.storage.access_mode != "ReadWriteOncePod"
                or (m.workers.num_nodes == 1 and (m.serving is None or m.serving.replicas <= 1))
            ),
            "storage.accessMode ReadWriteOncePod lets one pod mount the volume: workers.numNodes and"
            " serving.replicas must be 1 (use ReadWriteMany)",
            ".storage.accessMode",
        ),
    )

    model: ModelSpec = Field(default_factory=ModelSpec)
    """The model: an existing checkpoint to fine-tune (pretrained), or a shape built from scratch."""
    data: DataSpec
    """Data preparation."""
    training: TrainingSpec
    """Training loop."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed engine."""
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    """Tensor, pipeline and sequence parallel sizes; data parallel (ZeRO) over what is left."""
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

    def keeps_global_batch(self, nodes: int) -> bool:
        """Whether a gang of ``nodes`` holds whole model replicas and reaches globalBatchSize exactly by
        gradient accumulation."""
        if nodes * self.workers.procs_per_node % self.parallelism.model_parallel:
            return False  # not whole model replicas
        return self.training.global_batch_size % _samples_per_micro_step(self, nodes) == 0

    def at_size(self, nodes: int) -> LLMTrainingJobSpec:
        """The spec as an attempt of ``nodes`` workers runs it: numNodes is the attempt's size, and the
        elastic bounds stay those written (so an attempt's spec still says which sizes are allowed)."""
        w = self.workers
        if nodes == w.num_nodes:
            return self
        bounds = {"num_nodes": nodes, "min_nodes": w.smallest, "max_nodes": w.largest}
        return self.model_copy(update={"workers": w.model_copy(update=bounds)})

    def elastic_sizes(self) -> list[int]:
        """The sizes an elastic gang may run at, largest first: minNodes..maxNodes keeping the batch."""
        w = self.workers
        return [n for n in range(w.largest, w.smallest - 1, -1) if self.keeps_global_batch(n)]
