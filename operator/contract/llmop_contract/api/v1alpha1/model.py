"""The network being trained: a shape built from scratch, or an existing Hugging Face causal LM."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.sources import SOURCE_DESCRIPTION, source_problem


class Architecture(StrEnum):
    LLAMA = "Llama"


class InitScheme(StrEnum):
    NORMAL = "Normal"
    XAVIER = "Xavier"
    HE = "He"


class Initialization(ApiModel):
    """How weights are initialised before the first step (ignored when resuming)."""

    scheme: InitScheme = InitScheme.NORMAL
    """Normal (std below, residual projections scaled by 1/sqrt(2*numLayers)), Xavier (Glorot uniform) or He (Kaiming normal)."""
    std: float = Field(0.02, gt=0, le=1)
    """Standard deviation for the Normal scheme."""


def _shape_rules(eff: dict[str, str]) -> tuple[Rule, ...]:
    """The shape's rules, over CEL expressions for each field (a literal default where unset)."""
    hidden, heads, kv = eff["hiddenSize"], eff["numHeads"], eff["numKeyValueHeads"]
    return (
        Rule(
            f"{hidden} % {heads} == 0",
            lambda m: m.eff("hidden_size") % m.eff("num_heads") == 0,
            "hiddenSize must be divisible by numHeads",
            ".hiddenSize",
        ),
        Rule(
            f"!has(self.numKeyValueHeads) || {heads} % {kv} == 0",
            lambda m: not m.num_key_value_heads or m.eff("num_heads") % m.num_key_value_heads == 0,
            "numHeads must be divisible by numKeyValueHeads",
            ".numKeyValueHeads",
        ),
        Rule(
            # Rotary positions rotate pairs of dimensions; the guard leaves a width that heads do
            # not divide to the first rule.
            f"{hidden} % {heads} != 0 || ({hidden} / {heads}) % 2 == 0",
            lambda m: (
                m.eff("hidden_size") % m.eff("num_heads") != 0
                or (m.eff("hidden_size") // m.eff("num_heads")) % 2 == 0
            ),
            "hiddenSize / numHeads (the head dimension) must be even: rotary positions rotate pairs of dimensions",
            ".hiddenSize",
        ),
    )


class TransformerShape(ApiModel):
    """Width and depth of a decoder-only transformer."""

    rules = _shape_rules(
        {
            "hiddenSize": "self.hiddenSize",
            "numHeads": "self.numHeads",
            "numKeyValueHeads": "self.numKeyValueHeads",
        }
    )

    hidden_size: int = Field(256, ge=16, le=32768)
    """Model width (embedding dimension)."""
    num_layers: int = Field(4, ge=1, le=256)
    """Number of transformer blocks."""
    num_heads: int = Field(4, ge=1, le=256)
    """Attention heads per block."""
    num_key_value_heads: int | None = Field(None, ge=1, le=256)
    """Key/value heads for grouped-query attention; unset means equal to numHeads."""
    intermediate_size: int = Field(688, ge=16, le=131072)
    """Hidden width of the SwiGLU feed-forward block."""

    def eff(self, name: str) -> int:
        return int(getattr(self, name))


class ScratchModel(TransformerShape):
    """A from-scratch model with every field resolved (what ``ModelSpec.scratch()`` returns)."""

    architecture: Architecture = Architecture.LLAMA
    vocab_size: int = Field(8192, ge=258, le=262144)
    context_length: int = Field(256, ge=16, le=131072)
    initialization: Initialization = Field(default_factory=Initialization)
    tie_embeddings: bool = True

    def num_parameters(self) -> int:
        """Parameter count, embeddings counted once when tied."""
        kv = self.num_key_value_heads or self.num_heads
        head_dim = self.hidden_size // self.num_heads
        attn = 2 * self.hidden_size**2 + 2 * self.hidden_size * kv * head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        block = attn + mlp + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + emb + self.hidden_size


_SCRATCH_DEFAULTS = ScratchModel()
DEFAULT_CONTEXT_LENGTH = _SCRATCH_DEFAULTS.context_length


class SecretKeySelector(ApiModel):
    """A key of a Secret in the job's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    """Secret name."""
    key: str = Field("token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key within the Secret."""


class HubSettings(ApiModel):
    """How hf:// sources are resolved: the Hugging Face hub client with its cache, a mirror and a token."""

    endpoint: str | None = Field(None, max_length=2048, pattern=r"^https?://")
    """A hub mirror (HF_ENDPOINT); unset uses huggingface.co."""
    cache_dir: str = Field("hf-cache", min_length=1, max_length=2048)
    """The hub cache (HF_HUB_CACHE layout); a relative path is on the job's volume, where every stage finds what the first download put there."""
    offline: bool = False
    """Resolve from cacheDir only (HF_HUB_OFFLINE): for air-gapped clusters with a pre-filled cache."""
    token_secret: SecretKeySelector | None = None
    """Secret key holding a hub token (HF_TOKEN), for gated and private models."""


class PretrainedModel(ApiModel):
    """An existing causal language model in Hugging Face layout, fine-tuned instead of built from scratch."""

    rules = (
        Rule(
            "!has(self.revision) || self.uri.startsWith('hf://')",
            lambda m: m.revision is None or m.uri.startswith("hf://"),
            "revision applies only to a hub source (hf://ORG/NAME)",
            ".revision",
        ),
        Rule(
            "self.uri.matches('^[a-z][a-z0-9+.-]*://') ? self.uri.matches('^(hf|s3|gs|gcs|az|abfs|file)://.+')"
            " : !self.uri.startsWith('-')",
            lambda m: source_problem(m.uri) is None,
            "uri must be hf://ORG/NAME, s3://, gs://, az://, file:// or a path",
            ".uri",
        ),
    )

    uri: str = Field(
        min_length=1, max_length=2048, description="Where the checkpoint is: " + SOURCE_DESCRIPTION
    )
    revision: str | None = Field(None, min_length=1, max_length=256)
    """Hub revision (branch, tag or commit) of an hf:// source; unset is main."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint (transformers trust_remote_code); off, only architectures the installed transformers knows load."""
    tokenizer: str | None = Field(None, min_length=1, max_length=2048)
    """The tokenizer's source, of the same kinds as uri; unset uses the model's own."""
    hub: HubSettings = Field(default_factory=HubSettings)
    """Hub client settings for hf:// sources."""


_SCRATCH_FIELDS = (
    "architecture",
    "hiddenSize",
    "numLayers",
    "numHeads",
    "numKeyValueHeads",
    "intermediateSize",
    "vocabSize",
    "contextLength",
    "initialization",
    "tieEmbeddings",
)


def _cel_eff(field: str) -> str:
    default = getattr(_SCRATCH_DEFAULTS, _snake(field))
    return f"(has(self.{field}) ? self.{field} : {default})"


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


class ModelSpec(ApiModel):
    """The model to train: an existing checkpoint (pretrained), or a shape the trainer builds from scratch.

    The shape's fields are left unset with a pretrained source (its config.json gives them); for a
    model from scratch, each unset field takes the default its description gives.
    """

    rules = (
        *_shape_rules(
            {
                "hiddenSize": _cel_eff("hiddenSize"),
                "numHeads": _cel_eff("numHeads"),
                "numKeyValueHeads": "self.numKeyValueHeads",
            }
        ),
        Rule(
            "!has(self.pretrained) || !(" + " || ".join(f"has(self.{f})" for f in _SCRATCH_FIELDS) + ")",
            lambda m: m.pretrained is None or not m.scratch_fields_set(),
            "model.pretrained and the from-scratch shape (architecture, hiddenSize, numLayers, numHeads,"
            " numKeyValueHeads, intermediateSize, vocabSize, contextLength, initialization, tieEmbeddings)"
            " are exclusive: a pretrained model's shape comes from its config.json",
            ".pretrained",
        ),
    )

    pretrained: PretrainedModel | None = None
    """Fine-tune this existing model instead of building one from scratch."""
    architecture: Architecture | None = None
    """Block layout of a model from scratch (default Llama: RMSNorm, rotary positions, SwiGLU; exports as LlamaForCausalLM)."""
    hidden_size: int | None = Field(None, ge=16, le=32768)
    """Model width (embedding dimension); default 256."""
    num_layers: int | None = Field(None, ge=1, le=256)
    """Number of transformer blocks; default 4."""
    num_heads: int | None = Field(None, ge=1, le=256)
    """Attention heads per block; default 4."""
    num_key_value_heads: int | None = Field(None, ge=1, le=256)
    """Key/value heads for grouped-query attention; unset means equal to numHeads."""
    intermediate_size: int | None = Field(None, ge=16, le=131072)
    """Hidden width of the SwiGLU feed-forward block; default 688."""
    vocab_size: int | None = Field(None, ge=258, le=262144)
    """Vocabulary size (default 8192); a tokenizer trained by the data stage gets exactly this many tokens (at least the 256 bytes plus end-of-text and padding)."""
    context_length: int | None = Field(None, ge=16, le=131072)
    """Longest sequence the model supports (rotary table size); default 256."""
    initialization: Initialization | None = None
    """Weight initialisation (default Normal, std 0.02)."""
    tie_embeddings: bool | None = None
    """Share the input embedding and output projection weights (default true)."""

    def eff(self, name: str) -> int:
        value = getattr(self, name)
        return int(getattr(_SCRATCH_DEFAULTS, name) if value is None else value)

    def scratch_fields_set(self) -> list[str]:
        return [f for f in _SCRATCH_FIELDS if getattr(self, _snake(f)) is not None]

    def scratch(self) -> ScratchModel:
        """The from-scratch model with every unset field at its default."""
        wire = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"pretrained"})
        return ScratchModel.model_validate(wire)

    def num_parameters(self) -> int:
        """Parameter count of the model from scratch, embeddings counted once when tied."""
        return self.scratch().num_parameters()
