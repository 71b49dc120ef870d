"""A job or search name the CRDs admit gives child names that are valid for their kinds."""

from __future__ import annotations

import re

import pytest

from llmop.naming import (
    claim_name,
    compress_job_name,
    config_map_name,
    pod_group_name,
    prepare_job_name,
    prepare_phase_job_name,
    service_account_name,
    service_name,
    serving_name,
    worker_name,
)
from llmop.search.builders import best_name, trial_name
from llmop_contract.api import crdgen
from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.job import MAX_NAME_LENGTH, NAME_RULE, name_problem
from llmop_contract.api.v1alpha1.search import (
    MAX_SEARCH_NAME_LENGTH,
    MAX_TRIALS,
    SEARCH_NAME_RULE,
    search_name_problem,
)

# What the apiserver demands of each kind of child (apimachinery's validation).
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # Service names
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # pod hostnames
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _label(pattern: re.Pattern[str], value: str) -> bool:
    return len(value) <= 63 and pattern.fullmatch(value) is not None


def children_problems(job: str) -> list[str]:
    """Every derived child the apiserver would refuse, for a job called ``job``."""
    problems = []
    for service in (service_name(job), serving_name(job)):
        if not _label(DNS_1035, service):
            problems.append(f"Service {service}")
    if not _label(DNS_1123_LABEL, worker_name(job, 1023)):
        problems.append(f"hostname {worker_name(job, 1023)}")
    if not _label(LABEL_VALUE, job):
        problems.append(f"label value {job}")
    for phase in PreparePhase:
        # A Job's name is its pods' job-name label, and an Indexed Job's pods are called <job>-<index>.
        indexed = prepare_phase_job_name(job, phase.value)
        if not _label(LABEL_VALUE, indexed) or not _label(DNS_1123_LABEL, f"{indexed}-255"):
            problems.append(f"Indexed Job {indexed}")
    objects = (
        config_map_name(job),
        claim_name(job),
        prepare_job_name(job),
        compress_job_name(job, "quantize-7"),
        pod_group_name(job),
        service_account_name(job),
    )
    problems += [o for o in objects if len(o) > 253 or not DNS_1123_SUBDOMAIN.fullmatch(o)]
    return problems


# Valid object names (DNS-1123 subdomains) and not: the CRD sees only the first kind, the apiserver
# refuses the second before any rule of ours.
NAMES = [
    "a",
    "job",
    "my-job-2",
    "x" * MAX_NAME_LENGTH,
    "x" * (MAX_NAME_LENGTH + 1),
    "my.job",
    "1job",
    "9",
    "job-",
    "-job",
    "My-job",
    "my_job",
    "a--b",
]


@pytest.mark.parametrize("name", NAMES)
def test_a_job_name_is_admitted_exactly_when_every_child_name_is_valid(name: str) -> None:
    problems = children_problems(name)
    if len(name) > MAX_NAME_LENGTH:
        # The length limit keeps a margin for children to come (and "<search>-best").
        assert name_problem(name) == name_problem("x" * (MAX_NAME_LENGTH + 1)) is not None
        return
    admitted = name_problem(name) is None
    assert admitted == (problems == []), f"{name!r}: name_problem={name_problem(name)!r}, children={problems}"


@pytest.mark.parametrize("name", NAMES)
def test_a_search_name_is_admitted_only_when_every_trial_is_an_admissible_job(name: str) -> None:
    if search_name_problem(name) is not None:
        return
    assert len(name) <= MAX_SEARCH_NAME_LENGTH
    for trial in [trial_name(name, i) for i in range(MAX_TRIALS + 1)] + [best_name(name)]:
        assert name_problem(trial) is None, f"search {name!r} admits trial {trial!r}: {name_problem(trial)}"


def test_the_search_rejects_what_its_trials_would() -> None:
    assert search_name_problem("lr-search") is None
    dotted = search_name_problem("lr.search")
    assert dotted is not None and "<name>-NNN" in dotted
    too_long = search_name_problem("s" * (MAX_SEARCH_NAME_LENGTH + 1))
    assert too_long is not None and f"at most {MAX_SEARCH_NAME_LENGTH}" in too_long


def test_the_crds_carry_the_same_rule_at_the_root() -> None:
    for crd, rule, limit in (
        (crdgen.llmtrainingjob_crd(), NAME_RULE, MAX_NAME_LENGTH),
        (crdgen.llmhyperparametersearch_crd(), SEARCH_NAME_RULE, MAX_SEARCH_NAME_LENGTH),
    ):
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert rule.schema() in root["x-kubernetes-validations"]
        assert root["properties"]["metadata"]["properties"]["name"]["maxLength"] == limit
