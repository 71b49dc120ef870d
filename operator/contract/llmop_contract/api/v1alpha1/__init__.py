"""llmop.io/v1alpha1."""

from llmop_contract.api.v1alpha1.job import GROUP, KIND, PLURAL, VERSION, LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus

__all__ = ["GROUP", "KIND", "PLURAL", "VERSION", "LLMTrainingJobSpec", "LLMTrainingJobStatus"]
