"""A search over a fine-tune's adapter rank, alpha and learning rate: every trial is a valid LoRA job."""

from __future__ import annotations

from typing import Any

import pytest

from llmop.search import sampler, space
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.tunable import LEAVES
from tests.unit.search.helpers import LR, spec

RANK = {"name": "rank", "path": "training.lora.rank", "type": "Int", "min": 4, "max": 64, "scale": "Log"}
ALPHA = {"name": "alpha", "path": "training.lora.alpha", "type": "Float", "min": 8.0, "max": 128.0}


def finetune_template() -> dict[str, Any]:
    return {
        "model": {"pretrained": {"uri": "hf://acme/base"}},
        "data": {"sources": [{"uri": "chat.jsonl"}], "format": {"type": "Chat"}},
        "training": {"maxSteps": 100, "method": "LoRA", "evaluation": {"intervalSteps": 10}},
        "workers": {"gpusPerNode": 0},
    }


def test_adapter_settings_are_search_paths_with_the_api_bounds() -> None:
    assert (LEAVES["training.lora.rank"].kind, LEAVES["training.lora.rank"].lower) == ("int", 1.0)
    assert LEAVES["training.lora.alpha"].kind == "float" and LEAVES["training.lora.alpha"].lower_exclusive


@pytest.mark.parametrize("algorithm", ["Random", "TPE"])
def test_every_trial_of_a_lora_search_is_a_valid_lora_job(algorithm: str) -> None:
    s = spec(
        trialTemplate=finetune_template(),
        parameters=[RANK, ALPHA, LR],
        algorithm=algorithm,
        maxTrials=6,
    )
    seen = set()
    for index in range(6):
        values = sampler.suggest(s, [], index)
        assert values is not None
        trial = LLMTrainingJobSpec.model_validate(space.trial_spec(s, values))
        lora = trial.training.adapters
        assert lora is not None and lora.rank == values["rank"] and lora.alpha == values["alpha"]
        assert 4 <= lora.rank <= 64 and trial.training.optimizer.learning_rate == values["lr"]
        assert trial.model.pretrained is not None and trial.training.method == "LoRA"
        seen.add(lora.rank)
    assert len(seen) > 1, "the rank is sampled, not fixed"


def test_a_search_of_adapter_settings_on_a_full_fine_tune_is_refused() -> None:
    template = finetune_template()
    template["training"]["method"] = "Full"
    with pytest.raises(ValueError, match=r"training\.lora applies only to method LoRA or QLoRA"):
        spec(trialTemplate=template, parameters=[RANK], maxTrials=2)
