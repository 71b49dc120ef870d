"""What happens after training: compression of the trained model and hand-off to serving."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.api.v1alpha1.model import TransformerShape
from llmop_contract.api.v1alpha1.workload import ResourceRequirements


class QuantizationMethod(StrEnum):
    INT8_WEIGHT_ONLY = "Int8WeightOnly"
    INT8_DYNAMIC = "Int8Dynamic"
    INT4_WEIGHT_ONLY = "Int4WeightOnly"


class Quantization(ApiModel):
    """Post-training quantisation of the linear layers."""

    rules = (
        Rule(
            "self.method == 'Int4WeightOnly' || !has(self.groupSize)",
            lambda m: m.method == QuantizationMethod.INT4_WEIGHT_ONLY or m.group_size is None,
            "groupSize applies only to Int4WeightOnly",
            ".groupSize",
        ),
    )

    method: QuantizationMethod
    """Int8WeightOnly, Int8Dynamic (weights and activations) or Int4WeightOnly (group-wise)."""
    group_size: int | None = Field(None, ge=16, le=1024)
    """Weights per quantisation group for Int4WeightOnly (default 64)."""


class PruningMethod(StrEnum):
    MAGNITUDE = "Magnitude"
    STRUCTURED = "Structured"


class Pruning(ApiModel):
    """Post-training pruning."""

    method: PruningMethod
    """Magnitude (unstructured, per weight) or Structured (removes attention heads and MLP channels)."""
    sparsity: float = Field(0.5, gt=0, lt=1)
    """Fraction of weights (Magnitude) or of heads and channels (Structured) removed."""
    recovery_steps: int = Field(0, ge=0, le=1_000_000)
    """Fine-tuning steps after pruning to recover quality."""


class Distillation(ApiModel):
    """Knowledge distillation into a smaller student trained on the teacher's logits."""

    student: TransformerShape
    """Shape of the student (vocabulary and context come from the teacher)."""
    # Defaults measured on the bundled corpus (docs/compression.md): with T=2, alpha=0.5 a short run's
    # student did worse than the same student trained from scratch; T=1, alpha=0.9 did better.
    temperature: float = Field(1.0, gt=0, le=100)
    """Softmax temperature applied to both logit sets."""
    alpha: float = Field(0.9, ge=0, le=1)
    """Weight of the distillation loss; 1 - alpha weights the next-token loss."""
    steps: int = Field(500, ge=1, le=10_000_000)
    """Student training steps."""
    learning_rate: float = Field(5e-4, gt=0, le=10)
    """Student peak learning rate."""


class SelectionObjective(StrEnum):
    SMALLEST = "Smallest"
    FASTEST = "Fastest"


class Selection(ApiModel):
    """Rule that picks one compressed model as the job's output."""

    objective: SelectionObjective = SelectionObjective.SMALLEST
    """Among results within the budget, pick the smallest on disk or the fastest to generate."""
    max_perplexity_increase_percent: float = Field(5.0, ge=0, le=10_000)
    """Results whose validation perplexity rises more than this over the trained model are not eligible."""


class CompressionSpec(ApiModel):
    """Compression jobs run after training succeeds, one Kubernetes Job per method."""

    quantization: list[Quantization] = Field(default_factory=list, max_length=8)
    """Quantisation variants to produce."""
    pruning: list[Pruning] = Field(default_factory=list, max_length=8)
    """Pruning variants to produce."""
    distillation: Distillation | None = None
    """Distil into a student."""
    selection: Selection | None = None
    """Pick one result as the job's output; unset keeps the trained model as the output."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Resources of each compression pod."""
    backoff_limit: int = Field(2, ge=0, le=100)
    """Retries of each compression Job."""


class ServingSource(StrEnum):
    TRAINED = "Trained"
    SELECTED = "Selected"


class ServingEngine(StrEnum):
    VLLM = "VLLM"
    BUILTIN = "Builtin"


class VllmDtype(StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


# A pinned release of vLLM's OpenAI server image: a moving tag would change the engine under a
# running job at its next rollout.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
GPU_RESOURCE = "nvidia.com/gpu"


class VllmSettings(ApiModel):
    """How vLLM serves the model (serving.engine VLLM, or unset on GPUs)."""

    image: str = Field(DEFAULT_VLLM_IMAGE, min_length=1, max_length=512)
    """vLLM's OpenAI server image."""
    max_model_len: int | None = Field(None, gt=0, le=10_000_000)
    """Longest prompt plus completion in tokens (--max-model-len); unset: the model's context length."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU's memory vLLM takes for weights and KV cache (--gpu-memory-utilization)."""
    dtype: VllmDtype = VllmDtype.AUTO
    """Weights' and activations' dtype (--dtype); auto reads it from config.json."""
    extra_args: list[str] = Field(default_factory=list, max_length=64)
    """More `vllm serve` arguments, appended after the operator's own (a later flag wins in vLLM)."""


def _gpu_in(resources: ResourceRequirements) -> bool:
    return GPU_RESOURCE in resources.requests or GPU_RESOURCE in resources.limits


class ServingSpec(ApiModel):
    """Serve the job's model behind an OpenAI-compatible HTTP API once the job succeeds."""

    rules = (
        Rule(
            "!has(self.engine) || self.engine != 'VLLM' || (has(self.resources)"
            " && ((has(self.resources.requests) && 'nvidia.com/gpu' in self.resources.requests)"
            " || (has(self.resources.limits) && 'nvidia.com/gpu' in self.resources.limits)))",
            lambda m: m.engine != ServingEngine.VLLM or _gpu_in(m.resources),
            "serving.engine VLLM needs GPUs: set serving.resources.limits nvidia.com/gpu",
            ".engine",
        ),
        Rule(
            "!has(self.vllm) || !has(self.engine) || self.engine == 'VLLM'",
            lambda m: m.vllm is None or m.engine in (None, ServingEngine.VLLM),
            "serving.vllm applies only with serving.engine VLLM or unset",
            ".vllm",
        ),
    )

    enabled: bool = False
    """Create the serving Deployment and Service."""
    source: ServingSource = ServingSource.SELECTED
    """Selected serves compression.selection's pick, or the trained model when nothing was picked."""
    replicas: int = Field(1, ge=0, le=100)
    """Serving pods."""
    port: int = Field(8000, ge=1024, le=65535)
    """HTTP port."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Concurrent requests batched into one forward pass."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Resources of each serving pod."""
    kserve: bool = False
    """Create a KServe InferenceService instead of a Deployment (needs the KServe CRDs)."""
    onnx_export: bool = False
    """Also export the served model to ONNX, verified with onnxruntime."""
    engine: ServingEngine | None = None
    """VLLM (vLLM's OpenAI server, needs GPUs) or Builtin (`llmtrain serve`); unset: VLLM when serving.resources ask for nvidia.com/gpu and vLLM loads the served model's layout, else Builtin."""
    vllm: VllmSettings | None = None
    """vLLM's settings (defaults when unset)."""

    def gpus_per_pod(self) -> int:
        """nvidia.com/gpu of each serving pod (limits, else requests; the kubelet uses the limit)."""
        value = self.resources.limits.get(GPU_RESOURCE, self.resources.requests.get(GPU_RESOURCE, 0))
        try:
            return max(int(str(value)), 0)
        except ValueError:
            return 0  # not a whole number: the apiserver refuses such a GPU quantity anyway
