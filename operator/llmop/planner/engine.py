"""Which engine serves a job's model: vLLM or the built-in `llmtrain serve`.

vLLM loads plain Hugging Face checkpoints only; what each post-training stage writes is fixed by the
trainer (``llmtrain.compress.layout``): the trained export, pruning and distillation write a plain
LlamaForCausalLM (layout "hf"), quantisation writes the project's own quantised buffers (layout
"quantized"), which only ``llmtrain.compress.load`` reads. docs/serving-engines.md has the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmop_contract.api.v1alpha1.lifecycle import ServingEngine, ServingSource, ServingSpec
from llmop_contract.protocol import ModelLayout, StageName

VLLM_LAYOUTS = frozenset({ModelLayout.HF})


@dataclass(frozen=True)
class Choice:
    """The resolved engine, or why the asked-for one cannot serve the model (engine is then None)."""

    engine: ServingEngine | None
    layout: ModelLayout
    problem: str | None = None


def layout_of(stage: str | None) -> ModelLayout:
    """The layout the stage named ``stage`` writes (None or "train": the trained export)."""
    if stage is None or stage == "train":
        return ModelLayout.written_by(None)
    try:
        kind = StageName.parse(stage).kind
    except ValueError:
        return ModelLayout.written_by(None)  # not a compression stage: the trained export
    return ModelLayout.written_by(kind)


def served_stage(spec: ServingSpec, selected_stage: str | None) -> str | None:
    """The stage whose output is served: the selected one unless serving.source is Trained."""
    return None if spec.source == ServingSource.TRAINED else selected_stage


def resolve(spec: ServingSpec, stage: str | None) -> Choice:
    layout = layout_of(stage)
    vllm_loads = layout in VLLM_LAYOUTS
    if spec.engine == ServingEngine.BUILTIN:
        return Choice(ServingEngine.BUILTIN, layout)
    if spec.engine == ServingEngine.VLLM:
        if vllm_loads:
            return Choice(ServingEngine.VLLM, layout)
        problem = (
            f"serving.engine is VLLM but the served model ({stage}) has the {layout.value!r} layout, which "
            "vLLM cannot load: set serving.engine Builtin, serving.source Trained, or select a "
            "pruned or distilled model"
        )
        return Choice(None, layout, problem)
    if spec.gpus_per_pod() > 0 and vllm_loads:
        return Choice(ServingEngine.VLLM, layout)
    return Choice(ServingEngine.BUILTIN, layout)
