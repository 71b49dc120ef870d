"""Every section of a job's spec is either applied to a started job or refused as a change."""

from __future__ import annotations

from llmop_contract.api import crdgen
from llmop_contract.api.v1alpha1.job import IMMUTABLE_SECTIONS, MUTABLE_SECTIONS, LLMTrainingJobSpec


def test_every_spec_section_is_classified_once() -> None:
    # A new section must be decided: can the operator apply a change to a running job?
    sections = [info.alias or name for name, info in LLMTrainingJobSpec.model_fields.items()]
    assert sorted(IMMUTABLE_SECTIONS + MUTABLE_SECTIONS) == sorted(sections)


def test_the_job_crd_refuses_a_change_to_each_immutable_section_only() -> None:
    spec = crdgen.llmtrainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"
    ]
    transitions = {r["fieldPath"]: r for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]}
    assert sorted(transitions) == sorted(f".{s}" for s in IMMUTABLE_SECTIONS)
    for section in IMMUTABLE_SECTIONS:
        assert transitions[f".{section}"]["message"] == f"spec.{section} is immutable: create a new job"


def test_a_search_template_has_only_the_search_transition_rule() -> None:
    # The trialTemplate embeds the job spec; the search's own rule covers it with its own message.
    crd = crdgen.llmhyperparametersearch_crd()
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    template = spec["properties"]["trialTemplate"]
    assert not [r for r in template.get("x-kubernetes-validations", []) if "oldSelf" in r["rule"]]
    assert [r for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
