"""Pure functions from a typed job spec to Kubernetes manifests (plain dicts). No API calls here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmop_contract.api.v1alpha1.job import GROUP, KIND, VERSION, LLMTrainingJobSpec

Manifest = dict[str, Any]


@dataclass(frozen=True)
class JobRef:
    """Identity of the LLMTrainingJob the children belong to."""

    name: str
    namespace: str
    uid: str
    spec: LLMTrainingJobSpec

    def owner_reference(self) -> Manifest:
        # controller=true + blockOwnerDeletion: the garbage collector deletes every child with the
        # job, and `kubectl get ... -o wide` shows who owns what.
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(
        self, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None
    ) -> Manifest:
        meta: Manifest = {
            "name": name,
            "namespace": self.namespace,
            "labels": labels,
            "ownerReferences": [self.owner_reference()],
        }
        if annotations:
            meta["annotations"] = annotations
        return meta
