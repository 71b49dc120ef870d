"""The few apiserver calls the runtime makes, on plain dicts (the JSON the apiserver sends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]


class Api:
    def __init__(self, kubeconfig: Path) -> None:
        self.client = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(self.client)
        self.coordination = client.CoordinationV1Api(self.client)

    @staticmethod
    def _json(response: Any) -> Obj:
        # _preload_content=False returns the raw response: plain JSON, no model objects to convert.
        data: Obj = json.loads(response.data)
        return data

    def pods_on_node(self, node: str) -> list[Obj]:
        r = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node}", _preload_content=False
        )
        return list(self._json(r)["items"])

    def pods_in_namespace(self, namespace: str) -> list[Obj]:
        return list(self._json(self.core.list_namespaced_pod(namespace, _preload_content=False))["items"])

    def get_optional(self, kind: str, name: str, namespace: str = "") -> Obj | None:
        readers = {
            "configmap": lambda: self.core.read_namespaced_config_map(
                name, namespace, _preload_content=False
            ),
            "secret": lambda: self.core.read_namespaced_secret(name, namespace, _preload_content=False),
            "pvc": lambda: self.core.read_namespaced_persistent_volume_claim(
                name, namespace, _preload_content=False
            ),
            "pv": lambda: self.core.read_persistent_volume(name, _preload_content=False),
            "node": lambda: self.core.read_node(name, _preload_content=False),
            "lease": lambda: self.coordination.read_namespaced_lease(name, namespace, _preload_content=False),
        }
        try:
            return self._json(readers[kind]())  # type: ignore[no-untyped-call]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_pod_status(self, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        # The uid makes the patch conditional: a pod's name is reused by the next attempt of a job,
        # whose pod must not get this one's status (the apiserver refuses a changed uid with 422).
        body = {"metadata": {"uid": meta["uid"]}, "status": status}
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], body)
        except ApiException as exc:
            # Deleted meanwhile, or replaced by a pod of the same name: nothing left to report on.
            if exc.status != 404 and not (exc.status == 422 and "metadata.uid" in str(exc.body)):
                raise

    def delete_pod_now(self, pod: Obj) -> None:
        """The kubelet's last word: the containers are gone, remove the object (grace 0, same uid)."""
        meta = pod["metadata"]
        body = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body)
        except ApiException as exc:
            if exc.status not in (404, 409):  # already gone, or a new pod of the same name
                raise

    def create_node(self, node: Obj) -> None:
        try:
            self.core.create_node(node)  # type: ignore[arg-type]  # the client accepts plain dicts
        except ApiException as exc:
            if exc.status != 409:
                raise

    def patch_node(self, name: str, body: Obj) -> None:
        self.core.patch_node(name, body)

    def patch_node_status(self, name: str, status: Obj) -> None:
        self.core.patch_node_status(name, {"status": status})

    def put_lease(self, namespace: str, lease: Obj) -> None:
        name = lease["metadata"]["name"]
        try:
            self.coordination.patch_namespaced_lease(name, namespace, {"spec": lease["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(namespace, lease)  # type: ignore[arg-type]
