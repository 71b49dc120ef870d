"""Names, labels and manifests of a search's child LLMTrainingJobs. Pure; no API calls."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from llmop.naming import MANAGED_BY
from llmop_contract import remote as layout
from llmop_contract.api.v1alpha1.job import GROUP, KIND, VERSION
from llmop_contract.api.v1alpha1.search import KIND as SEARCH_KIND

SEARCH_LABEL = f"{GROUP}/search-name"
TRIAL_INDEX_LABEL = f"{GROUP}/trial-index"
SEARCH_ROLE_LABEL = f"{GROUP}/search-role"
PARAMETERS_ANNOTATION = f"{GROUP}/trial-parameters"
ROLE_TRIAL = "trial"
ROLE_BEST = "best"

Manifest = dict[str, Any]


def trial_name(search: str, index: int) -> str:
    # Deterministic: creating trial N twice (after a crash) hits 409, never a second trial.
    return f"{search}-{index:03d}"


def best_name(search: str) -> str:
    return f"{search}-best"


@dataclass(frozen=True)
class SearchRef:
    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> Manifest:
        # Deleting the search deletes its trials (and through them their pods and storage).
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": SEARCH_KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _job(
    ref: SearchRef, name: str, labels: dict[str, str], values: dict[str, Any], spec: Manifest
) -> Manifest:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": ref.namespace,
            "labels": {
                SEARCH_LABEL: ref.name,
                "app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/part-of": ref.name,
                **labels,
            },
            "annotations": {PARAMETERS_ANNOTATION: json.dumps(values, sort_keys=True)},
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": own_remote(spec, name),
    }


def own_remote(spec: Manifest, name: str) -> Manifest:
    """``spec`` with storage.remote.uri under a prefix of the job's own.

    Every trial (and the best job) comes from one template: with one remote URI they would upload
    their checkpoints over each other's, and a trial would resume from another's checkpoint.
    """
    remote = (spec.get("storage") or {}).get("remote")
    if not remote or not remote.get("uri"):
        return spec
    out = copy.deepcopy(spec)
    out["storage"]["remote"]["uri"] = layout.join(remote["uri"], name)
    return out


def build_trial(ref: SearchRef, index: int, values: dict[str, Any], spec: Manifest) -> Manifest:
    labels = {SEARCH_ROLE_LABEL: ROLE_TRIAL, TRIAL_INDEX_LABEL: str(index)}
    return _job(ref, trial_name(ref.name, index), labels, values, spec)


def build_best(ref: SearchRef, values: dict[str, Any], spec: Manifest) -> Manifest:
    return _job(ref, best_name(ref.name), {SEARCH_ROLE_LABEL: ROLE_BEST}, values, spec)
