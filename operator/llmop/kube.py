"""The one small Kubernetes API layer: create-or-get, delete, patch, with idempotency built in.

Uses the official client (synchronous) in worker threads so Kopf's event loop never blocks. 409 on
create and 404 on delete are success: every call may be repeated after a crash.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from llmop_contract.api.v1alpha1.job import GROUP, PLURAL, VERSION

Manifest = dict[str, Any]


FIELD_MANAGER = "llmop"


class Kube:
    def __init__(self, api: client.ApiClient | None = None) -> None:
        if api is None:
            conf = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            # As many pooled connections as API worker threads (handlers.py), or each burst of
            # creates beyond the default 10 pays a fresh TLS handshake.
            conf.connection_pool_maxsize = 32
            api = client.ApiClient(conf)
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._dynamic: DynamicClient | None = None

    @property
    def dynamic(self) -> DynamicClient:
        if self._dynamic is None:
            self._dynamic = DynamicClient(self.api)  # type: ignore[no-untyped-call]
        return self._dynamic

    # Generic create/delete through the dynamic client: the builders return plain manifests of
    # several kinds (Pod, Service, Job, PodGroup, ...), and this keeps one code path for all.
    def _create(self, manifest: Manifest) -> bool:
        resource = self.dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        try:
            resource.create(body=manifest, namespace=manifest["metadata"].get("namespace"))
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    async def create(self, manifest: Manifest) -> bool:
        """Create; False when it already existed."""
        return await asyncio.to_thread(self._create, manifest)

    async def create_optional(self, manifest: Manifest) -> str | None:
        """Create a resource whose CRD may be absent (PodGroups); returns an error text when absent."""
        try:
            await self.create(manifest)
            return None
        except ResourceNotFoundError:
            return f"{manifest['apiVersion']} {manifest['kind']} is not installed in the cluster"

    def _apply(self, manifest: Manifest) -> None:
        resource = self.dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        meta = manifest["metadata"]
        # Server-side apply: creates or updates only the fields we own, leaving what others set
        # (HPA-managed replicas excepted: we own replicas) untouched.
        resource.server_side_apply(
            body=manifest,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )

    async def apply(self, manifest: Manifest) -> None:
        """Create or update to match the manifest (server-side apply)."""
        await asyncio.to_thread(self._apply, manifest)

    def _get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
        try:
            obj: Manifest = resource.get(name=name, namespace=namespace).to_dict()
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object, None when absent; raises ResourceNotFoundError when its API is not installed."""
        return await asyncio.to_thread(self._get, api_version, kind, namespace, name)

    def _delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
        try:
            # Background: a Job's pods (a Deployment's ReplicaSets) go with it, without waiting.
            resource.delete(name=name, namespace=namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete any namespaced object; already gone is success."""
        await asyncio.to_thread(self._delete, api_version, kind, namespace, name)

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        def call() -> None:
            try:
                self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds)
            except ApiException as e:
                if e.status != 404:
                    raise

        await asyncio.to_thread(call)

    async def remove_scheduling_gate(
        self, namespace: str, name: str, gate: str, known: tuple[str, ...] | None = None
    ) -> None:
        """Lift one scheduling gate, keeping any others (e.g. another controller's).

        ``known`` is the pod's gate list as last watched, which saves a GET; if it is stale the
        patch's test op fails and the pod is read fresh once.
        """

        def patch(gates: list[str]) -> None:
            # A JSON patch: a strategic merge of a shorter list would keep the gate. The test op makes
            # the patch fail rather than drop a gate another controller added meanwhile.
            ops = [
                {"op": "test", "path": "/spec/schedulingGates", "value": [{"name": g} for g in gates]},
                {
                    "op": "replace",
                    "path": "/spec/schedulingGates",
                    "value": [{"name": g} for g in gates if g != gate],
                },
            ]
            self.core.patch_namespaced_pod(name, namespace, ops)

        def call() -> None:
            if known is not None and gate in known:
                try:
                    patch(list(known))
                    return
                except ApiException as e:
                    if e.status == 404:
                        return
                    if e.status not in (409, 422):
                        raise
            try:
                pod = self.core.read_namespaced_pod(name, namespace)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            gates = [g.name for g in (pod.spec.scheduling_gates if pod.spec else None) or []]
            if gate in gates:
                patch(gates)

        await asyncio.to_thread(call)

    async def patch_job_status(self, namespace: str, name: str, status: Manifest) -> None:
        def call() -> None:
            try:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": status}
                )
            except ApiException as e:
                if e.status != 404:  # deleted meanwhile: nothing to report to
                    raise

        await asyncio.to_thread(call)

    async def delete_job(self, namespace: str, name: str) -> None:
        def call() -> None:
            try:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
                )
            except ApiException as e:
                if e.status != 404:
                    raise

        await asyncio.to_thread(call)
