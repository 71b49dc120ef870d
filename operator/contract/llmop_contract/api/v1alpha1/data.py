"""The data stage: where text comes from and how it is cleaned, deduplicated and sharded."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.api.v1alpha1.workload import ResourceRequirements


class SourceFormat(StrEnum):
    AUTO = "Auto"
    TEXT = "Text"
    JSONL = "JSONL"
    PARQUET = "Parquet"


class DataSource(ApiModel):
    """One input: a local file or directory, an fsspec URL, or a corpus bundled with the trainer."""

    uri: str = Field(min_length=1, max_length=2048)
    """Path, fsspec URL (s3://, gs://, file://, ...) or builtin://NAME for a bundled corpus."""
    format: SourceFormat = SourceFormat.AUTO
    """File format; Auto decides by extension (.txt, .jsonl/.json, .parquet)."""
    text_field: str = Field("text", min_length=1, max_length=256)
    """Field holding the document text in JSONL and Parquet records."""


class Normalization(StrEnum):
    NFC = "NFC"
    NFKC = "NFKC"
    NONE = "None"


class Cleaning(ApiModel):
    """Document filters in the style of the Gopher and C4 quality rules."""

    rules = (
        Rule(
            "self.minWords <= self.maxWords",
            lambda m: m.min_words <= m.max_words,
            "minWords must not exceed maxWords",
            ".minWords",
        ),
        Rule(
            "!self.enabled || self.minMeanWordLength <= self.maxMeanWordLength",
            lambda m: not m.enabled or m.min_mean_word_length <= m.max_mean_word_length,
            "minMeanWordLength must not exceed maxMeanWordLength (every document would be removed)",
            ".minMeanWordLength",
        ),
    )

    enabled: bool = True
    """Run the cleaning filters at all."""
    unicode_normalization: Normalization = Normalization.NFKC
    """Unicode normal form applied to every document."""
    strip_markup: bool = True
    """Remove HTML/XML tags and decode entities."""
    remove_boilerplate: bool = True
    """Drop lines such as cookie notices, 'all rights reserved', navigation crumbs."""
    min_words: int = Field(20, ge=0, le=1_000_000)
    """Documents with fewer words are removed."""
    max_words: int = Field(100_000, ge=1, le=10_000_000)
    """Documents with more words are removed."""
    min_mean_word_length: float = Field(3.0, ge=0, le=100)
    """Lower bound on mean word length (Gopher: 3)."""
    max_mean_word_length: float = Field(10.0, ge=1, le=100)
    """Upper bound on mean word length (Gopher: 10)."""
    max_symbol_word_ratio: float = Field(0.1, ge=0, le=1)
    """Maximum ratio of '#' and '...' symbols to words (Gopher: 0.1)."""
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1)
    """Minimum fraction of words containing a letter (Gopher: 0.8)."""
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1)
    """Maximum fraction of lines that repeat within a document (Gopher: 0.3)."""
    redact_pii: bool = False
    """Replace email addresses, phone numbers and IP addresses with placeholders."""


class NearDuplicates(ApiModel):
    """MinHash locality-sensitive hashing over word shingles."""

    enabled: bool = True
    """Remove near-duplicates (keeps one document per cluster)."""
    shingle_size: int = Field(5, ge=1, le=32)
    """Words per shingle."""
    num_permutations: int = Field(128, ge=16, le=1024)
    """MinHash signature length."""
    threshold: float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity above which two documents are duplicates."""


class Deduplication(ApiModel):
    """Exact and near-duplicate removal."""

    exact: bool = True
    """Remove documents whose normalised text is identical."""
    near: NearDuplicates = Field(default_factory=NearDuplicates)
    """Near-duplicate removal."""


class Augmentation(ApiModel):
    """Noise added to copies of documents to stretch a small corpus."""

    enabled: bool = False
    """Add augmented copies."""
    copies: int = Field(1, ge=1, le=16)
    """Augmented copies per document."""
    word_dropout: float = Field(0.05, ge=0, le=0.5)
    """Probability of dropping each word."""
    word_swap: float = Field(0.05, ge=0, le=0.5)
    """Probability of swapping each word with its neighbour."""
    char_noise: float = Field(0.0, ge=0, le=0.2)
    """Probability of a character-level typo per word."""
    synonym_replacement: float = Field(0.0, ge=0, le=0.5)
    """Probability of replacing a word by a synonym from thesaurusPath."""
    thesaurus_path: str | None = Field(None, max_length=2048)
    """Local file: one line per entry, 'word<TAB>synonym,synonym'."""
    seed: int = Field(0, ge=0)
    """Random seed, so a re-run produces the same copies."""

    rules = (
        Rule(
            "self.synonymReplacement == 0.0 || has(self.thesaurusPath)",
            lambda m: m.synonym_replacement == 0 or bool(m.thesaurus_path),
            "synonymReplacement needs thesaurusPath",
            ".thesaurusPath",
        ),
    )


class RecordFormat(StrEnum):
    TEXT = "Text"
    PROMPT_COMPLETION = "PromptCompletion"
    CHAT = "Chat"
    TEMPLATE = "Template"


class Packing(StrEnum):
    PACKED = "Packed"
    PADDED = "Padded"


_TEMPLATE_FIELD = r"\{([A-Za-z_][A-Za-z0-9_]*)\}"


class DataFormat(ApiModel):
    """What a record is: plain text for language modelling, or a supervised example with the loss on its answer."""

    rules = (
        Rule(
            "(self.type == 'Template') == has(self.promptTemplate)",
            lambda m: (m.type == RecordFormat.TEMPLATE) == (m.prompt_template is not None),
            "promptTemplate is required with type Template and applies only to it",
            ".promptTemplate",
        ),
        Rule(
            "self.type == 'Template' || !has(self.completionTemplate)",
            lambda m: m.type == RecordFormat.TEMPLATE or m.completion_template is None,
            "completionTemplate applies only to type Template",
            ".completionTemplate",
        ),
        Rule(
            "!has(self.promptTemplate) || self.promptTemplate.matches('[{][A-Za-z_][A-Za-z0-9_]*[}]')",
            lambda m: m.prompt_template is None or re.search(_TEMPLATE_FIELD, m.prompt_template) is not None,
            "promptTemplate must name at least one record field in braces, e.g. 'Review: {text}\\nLabel:'",
            ".promptTemplate",
        ),
        Rule(
            "self.type != 'Text' || self.packing == 'Packed'",
            lambda m: m.type != RecordFormat.TEXT or m.packing == Packing.PACKED,
            "packing Padded applies only to supervised formats (plain text is always packed)",
            ".packing",
        ),
    )

    type: RecordFormat = RecordFormat.TEXT
    """Text (sources[].textField, loss on every token), PromptCompletion (promptField + completionField), Chat (messagesField: a list of {role, content} rendered with the model's chat template, loss on assistant turns) or Template (promptTemplate over a labelled record, completionTemplate the answer)."""
    prompt_field: str = Field("prompt", min_length=1, max_length=256)
    """PromptCompletion: the field holding the prompt."""
    completion_field: str = Field("completion", min_length=1, max_length=256)
    """PromptCompletion: the field holding the completion (the only tokens with a loss); Template: the answer's field when completionTemplate is unset."""
    messages_field: str = Field("messages", min_length=1, max_length=256)
    """Chat: the field holding the conversation."""
    prompt_template: str | None = Field(None, min_length=1, max_length=8192)
    """Template: the prompt, with {field} replaced by the record's fields (e.g. 'Text: {text}\nTopic:')."""
    completion_template: str | None = Field(None, min_length=1, max_length=8192)
    """Template: the answer (e.g. ' {label}'); unset is ' {<completionField>}'."""
    packing: Packing = Packing.PACKED
    """Packed: records are concatenated into full sequences, each attending only to itself (positions restart per record); Padded: one record per sequence, padded (longer ones are cut)."""

    @property
    def supervised(self) -> bool:
        return self.type != RecordFormat.TEXT

    def template_fields(self) -> list[str]:
        """The record fields the templates name, in order of first use."""
        text = (self.prompt_template or "") + (self.completion_template or "")
        return list(dict.fromkeys(re.findall(_TEMPLATE_FIELD, text)))


class Tokenizer(ApiModel):
    """Tokenizer: trained locally on the cleaned corpus, or loaded from a file."""

    path: str | None = Field(None, max_length=2048)
    """A tokenizer.json to load; unset trains a byte-level BPE with model.vocabSize tokens."""


class Sharding(ApiModel):
    """Tokenised output layout."""

    tokens_per_shard: int = Field(1_048_576, ge=1024, le=1 << 32)
    """Tokens in each binary shard (the last shard may be shorter)."""
    validation_fraction: float = Field(0.02, gt=0, lt=0.5)
    """Fraction of documents held out for validation."""
    seed: int = Field(1234, ge=0)
    """Seed for the train/validation split."""


class PreparePhase(StrEnum):
    """The distributed prepare stage's phases, in order; each is one Indexed Job."""

    SCAN = "scan"  # N pods: read a slice, clean, exact keys and MinHash signatures, partitioned by hash
    DEDUP = "dedup"  # N pods: one hash partition each: exact groups, LSH buckets, verified pairs
    CLUSTER = "cluster"  # 1 pod: connected components over every pair, removal lists, the tokenizer
    WRITE = "write"  # N pods: each tokenises its slice's kept documents into its own shards
    COMMIT = "commit"  # 1 pod: one manifest over every pod's shards

    @property
    def parallel(self) -> bool:
        return self in (PreparePhase.SCAN, PreparePhase.DEDUP, PreparePhase.WRITE)


class Distribution(ApiModel):
    """The prepare stage across pods: each phase an Indexed Job, each pod streaming its own slice of the
    inputs (whole files, Parquet row groups, line-aligned byte ranges of large files) with memory
    bounded per pod whatever the corpus size."""

    pods: int = Field(1, ge=1, le=256)
    """Pods of each parallel phase (scan, dedup, write); the kept documents and shards are the same for any count."""
    resources: ResourceRequirements | None = None
    """Each pod's CPU and memory; unset: the workers' node requests without GPUs."""
    backoff_limit_per_index: int = Field(3, ge=0, le=100)
    """Retries of one failed pod (its index alone is rerun; finished indexes are kept)."""

    def count(self, phase: PreparePhase) -> int:
        return self.pods if phase.parallel else 1


class DataSpec(ApiModel):
    """Data preparation: read, clean, deduplicate, augment, tokenise and shard."""

    prepare: bool = True
    """Run the preparation Job before training; false expects shards already in storage."""
    sources: list[DataSource] = Field(default_factory=list, max_length=64)
    """Inputs; required when prepare is true."""
    format: DataFormat = Field(default_factory=DataFormat)
    """Record format: plain text, or supervised examples (prompt/completion, chat, templated labels)."""
    cleaning: Cleaning = Field(default_factory=Cleaning)
    """Quality filters."""
    deduplication: Deduplication = Field(default_factory=Deduplication)
    """Duplicate removal."""
    augmentation: Augmentation = Field(default_factory=Augmentation)
    """Augmentation."""
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    """Tokenizer."""
    sharding: Sharding = Field(default_factory=Sharding)
    """Shard layout."""
    num_workers: int = Field(0, ge=0, le=1024)
    """Processes for preparation; 0 uses every core."""
    distributed: Distribution | None = None
    """Run preparation as phases of Indexed Jobs across pods (plain text only); unset: one pod holds the corpus in memory."""

    rules = (
        Rule(
            "!self.prepare || size(self.sources) > 0",
            lambda m: not m.prepare or bool(m.sources),
            "sources must list at least one input when prepare is true",
            ".sources",
        ),
        Rule(
            "!has(self.distributed) || self.format.type == 'Text'",
            lambda m: m.distributed is None or m.format.type == RecordFormat.TEXT,
            "distributed preparation is for plain-text corpora; supervised records are prepared by one pod",
            ".distributed",
        ),
    )
