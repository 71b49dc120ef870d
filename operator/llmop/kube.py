"""The one small Kubernetes API layer: create-or-get, delete, patch, with idempotency built in.

Uses the official client's connection layer (``ApiClient``: configuration, auth, pooled urllib3)
synchronously in worker threads so Kopf's event loop never blocks. 404 on delete is success, and so
is 409 on create when the object there is ours (its controller owner reference carries the same UID):
every call may be repeated after a crash. An object of the same name owned by someone else is never
adopted (``Leftover``, ``ChildConflict``), and a failed call on a child says which object it was and
whether retrying can help (``ChildError``).

The requests are sent by ``_Api``, not by the generated API classes (``CoreV1Api``,
``CustomObjectsApi``, the dynamic client): importing those loads hundreds of generated model modules,
about 80 MB of a 180 MB operator at rest, for the dozen endpoints used here, and their answers would be
turned into typed objects nobody reads. Bodies go out and come back as plain JSON; a refusal is the
client's own ``ApiException`` (with status, reason and the apiserver's Status body) as before.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from llmop.observe import controller_of
from llmop_contract.api.v1alpha1.job import GROUP, KIND, PLURAL, VERSION

Manifest = dict[str, Any]

FIELD_MANAGER = "llmop"

# Retrying cannot fix these: the apiserver (or an admission webhook/policy) refused the object as
# written (422, 400), or this operator may not do it (403). Everything else (409 on update, 429, 5xx,
# timeouts) is transient.
PERMANENT_STATUSES = frozenset({400, 403, 422})
# The quota admission plugin's two refusals (k8s.io/apiserver/pkg/admission/plugin/resourcequota).
_QUOTA_REFUSALS = ("exceeded quota", "status unknown for quota")


def _api_message(e: ApiException) -> str:
    """The Status message the apiserver sent (what kubectl prints), else the HTTP reason."""
    try:
        body = json.loads(e.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{e.status} {e.reason or ''}".strip()


class ChildError(Exception):
    """An API call on one of a job's children failed."""

    def __init__(self, verb: str, kind: str, name: str, status: int | None, message: str) -> None:
        super().__init__(f"{verb} {kind} {name}: {message}")
        self.verb, self.kind, self.name, self.status, self.message = verb, kind, name, status, message

    @property
    def quota_refused(self) -> bool:
        """A ResourceQuota refused it (403 too), which clears by itself, so retrying helps: the quota
        is exhausted (capacity frees up as other objects go), or it was just created or changed and
        its controller has not counted usage yet ("status unknown for quota", seconds; longer for a
        custom resource the quota controller's discovery has not found yet)."""
        return self.status == 403 and any(m in self.message for m in _QUOTA_REFUSALS)

    @property
    def permanent(self) -> bool:
        return self.status in PERMANENT_STATUSES and not self.quota_refused

    @classmethod
    def of(cls, verb: str, kind: str, name: str, e: ApiException) -> ChildError:
        return cls(verb, kind, name, e.status, _api_message(e))


class Leftover(Exception):
    """The name is held by a child of an earlier job of the same name, which is being removed.

    Deleting a job and applying it again under its name (a GitOps re-sync, ``make demo`` run twice)
    races the garbage collector: adopting what is left would mount the old volume and resume the old
    run. The leftover is deleted (guarded by its UID) and the create is retried once it is gone.
    """

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(
            f"{kind} {name} is left over from an earlier job of the same name; removing it first"
        )
        self.kind, self.name = kind, name


class ChildConflict(Exception):
    """The name is held by an object that no job of this name owns (created by hand, or by another
    controller): the operator will not take it over, nor delete what it does not own."""

    def __init__(self, kind: str, name: str, owner: str) -> None:
        super().__init__(
            f"{kind} {name} already exists and is owned by {owner}, not by this job;"
            " delete it or choose another job name"
        )
        self.kind, self.name = kind, name


_JSON = "application/json"


def _base(api_version: str) -> str:
    """The root of a group version's paths: the core group under /api, every other under /apis."""
    return f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"


class _Api:
    """The endpoints the operator calls, sent through ``ApiClient`` (configuration, auth, TLS, pool).

    The methods named like the generated client's take the same arguments and send the same requests;
    they answer with plain JSON (a dict) where they answer at all.
    """

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        # (apiVersion, kind) -> (resource name, namespaced), from each group version's discovery
        # document, read once; a kind not found is looked up afresh each time (its CRD may come).
        self._resources: dict[tuple[str, str], tuple[str, bool]] = {}
        self._discovery = threading.Lock()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, Any]] | None = None,
        content_type: str = _JSON,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """Send one request; the answer's body, or ApiException (its subclass by status) when not 2xx."""
        # Content-Type always: an apiserver reached directly guesses JSON without one, one behind a
        # proxy that labels the bytes answers 415.
        header_params = {"Accept": _JSON, "Content-Type": content_type, **(headers or {})}
        method, url, header_params, body, post_params = self.api.param_serialize(
            method, path, query_params=query, header_params=header_params, body=body,
            auth_settings=["BearerToken"],
        )  # fmt: skip
        response = self.api.call_api(method, url, header_params, body, post_params)
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(
                http_resp=response, body=data.decode("utf-8", "replace"), data=None
            )
        return data

    def read(self, path: str) -> Manifest:
        obj: Manifest = json.loads(self.request("GET", path))
        return obj

    # -- any kind, by apiVersion and kind -------------------------------------------------------
    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(resource name, namespaced); ResourceNotFoundError when the cluster does not serve it."""
        key = (api_version, kind)
        if (found := self._resources.get(key)) is not None:
            return found
        with self._discovery:  # one discovery read for a burst of first calls, not one each
            if (found := self._resources.get(key)) is not None:
                return found
            try:
                listing = self.read(_base(api_version))
            except ApiException as e:
                if e.status != 404:
                    raise
                listing = {}
            for r in listing.get("resources") or []:
                if "/" not in r["name"]:  # subresources (pods/status) share their kind
                    self._resources[(api_version, r["kind"])] = (r["name"], bool(r.get("namespaced")))
        if (found := self._resources.get(key)) is None:
            raise ResourceNotFoundError(
                f"No matches found for {{'api_version': '{api_version}', 'kind': '{kind}'}}"
            )
        return found

    def path(self, api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
        plural, namespaced = self.resource(api_version, kind)
        path = _base(api_version)
        if namespaced:
            if not namespace:
                raise ValueError(f"Namespace is required for {api_version}.{kind}")
            path += f"/namespaces/{quote(namespace, safe='')}"
        path += f"/{plural}"
        return f"{path}/{quote(name, safe='')}" if name else path

    # -- named like the generated client's methods (search.controller and tests call them) -------
    def create_namespaced_event(
        self, namespace: str, body: Manifest, _headers: dict[str, str] | None = None
    ) -> None:
        self.request("POST", f"/api/v1/namespaces/{quote(namespace, safe='')}/events", body, headers=_headers)

    def read_namespaced_pod(self, name: str, namespace: str) -> Manifest:
        return self.read(f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}")

    def patch_namespaced_pod(self, name: str, namespace: str, body: list[Manifest]) -> None:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        self.request("PATCH", path, body, content_type="application/json-patch+json")

    def delete_namespaced_pod(
        self, name: str, namespace: str, grace_period_seconds: int | None = None
    ) -> None:
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        query = None if grace_period_seconds is None else [("gracePeriodSeconds", grace_period_seconds)]
        self.request("DELETE", path, query=query)

    def _custom_path(self, group: str, version: str, namespace: str, plural: str, name: str) -> str:
        return (
            f"/apis/{group}/{version}/namespaces/{quote(namespace, safe='')}/{plural}/{quote(name, safe='')}"
        )

    def patch_namespaced_custom_object_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: Manifest
    ) -> None:
        path = self._custom_path(group, version, namespace, plural, name) + "/status"
        self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str,
        propagation_policy: str | None = None,
    ) -> None:  # fmt: skip
        query = None if propagation_policy is None else [("propagationPolicy", propagation_policy)]
        self.request("DELETE", self._custom_path(group, version, namespace, plural, name), query=query)


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
        # One sender under the two names the generated classes had (search.controller uses custom).
        self.core = self.custom = _Api(api)

    # Generic create/get/delete by apiVersion and kind: the builders return plain manifests of
    # several kinds (Pod, Service, Job, PodGroup, ...), and this keeps one code path for all.
    def _create(self, manifest: Manifest) -> bool:
        kind, meta = manifest["kind"], manifest["metadata"]
        path = self.core.path(manifest["apiVersion"], kind, meta.get("namespace"))
        try:
            # The created object comes back in full; nothing here needs it, so it is not parsed.
            self.core.request("POST", path, manifest)
            return True
        except ApiException as e:
            if e.status != 409:
                raise ChildError.of("creating", kind, meta["name"], e) from e
        try:
            existing = self.core.read(f"{path}/{quote(meta['name'], safe='')}")
        except ApiException as e:
            if e.status == 404:  # gone meanwhile: the next pass creates it
                raise Leftover(kind, meta["name"]) from e
            raise ChildError.of("reading", kind, meta["name"], e) from e
        self._check_owner(manifest, existing)
        return False

    def _check_owner(self, desired: Manifest, existing: Manifest) -> None:
        """Return when ``existing`` is ours; otherwise remove a leftover of an earlier job of the
        same name (raising ``Leftover``) or refuse anything else (``ChildConflict``)."""
        want = controller_of(desired)
        if want is None:
            return  # nothing to compare against (not a job's child)
        have = controller_of(existing)
        if have is not None and have.get("uid") == want.get("uid"):
            return
        kind, meta = existing["kind"], existing["metadata"]
        same_name = have is not None and (have.get("kind"), have.get("name")) == (want["kind"], want["name"])
        if not same_name:
            owner = f"{have.get('kind')} {have.get('name')}" if have else "no controller"
            raise ChildConflict(kind, meta["name"], owner)
        if not meta.get("deletionTimestamp"):
            self._delete(
                existing["apiVersion"], kind, meta.get("namespace", ""), meta["name"], uid=meta.get("uid")
            )
        raise Leftover(kind, meta["name"])

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
        kind, meta = manifest["kind"], manifest["metadata"]
        path = self.core.path(manifest["apiVersion"], kind, meta.get("namespace"), meta["name"])
        # Server-side apply would silently take over an object of the same name: look first.
        if (
            existing := self._get(manifest["apiVersion"], kind, meta.get("namespace", ""), meta["name"])
        ) is not None:
            self._check_owner(manifest, existing)
        try:
            # Server-side apply: creates or updates only the fields we own, leaving what others set
            # (HPA-managed replicas excepted: we own replicas) untouched.
            self.core.request(
                "PATCH",
                path,
                manifest,
                query=[("fieldManager", FIELD_MANAGER), ("force", True)],
                content_type="application/apply-patch+yaml",
            )
        except ApiException as e:
            raise ChildError.of("applying", kind, meta["name"], e) from e

    async def apply(self, manifest: Manifest) -> None:
        """Create or update to match the manifest (server-side apply)."""
        await asyncio.to_thread(self._apply, manifest)

    def _get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        path = self.core.path(api_version, kind, namespace, name)
        try:
            return self.core.read(path)
        except ApiException as e:
            if e.status == 404:
                return None
            raise ChildError.of("reading", kind, name, e) from e

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object, None when absent; raises ResourceNotFoundError when its API is not installed."""
        return await asyncio.to_thread(self._get, api_version, kind, namespace, name)

    def _delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        path = self.core.path(api_version, kind, namespace, name)
        body: Manifest = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            # Only that object: never a namesake created meanwhile (409 then: nothing to do).
            body["preconditions"] = {"uid": uid}
        try:
            # Background: a Job's pods (a Deployment's ReplicaSets) go with it, without waiting.
            self.core.request("DELETE", path, body)
        except ApiException as e:
            if e.status == 404 or (uid and e.status == 409):
                return
            raise ChildError.of("deleting", kind, name, e) from e

    async def delete(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None
    ) -> None:
        """Delete any namespaced object (only the one with ``uid`` when given); already gone is success."""
        await asyncio.to_thread(self._delete, api_version, kind, namespace, name, uid)

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        def call() -> None:
            try:
                self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds)
            except ApiException as e:
                if e.status != 404:
                    raise ChildError.of("deleting", "Pod", name, e) from e

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
            gates = [g["name"] for g in (pod.get("spec") or {}).get("schedulingGates") or []]
            if gate in gates:
                try:
                    patch(gates)
                except ApiException as e:
                    if e.status == 404:
                        return
                    # A failed test op is a race with another writer, not a bad request: retry.
                    raise ChildError(
                        "ungating", "Pod", name, None if e.status == 422 else e.status, _api_message(e)
                    ) from e

        try:
            await asyncio.to_thread(call)
        except ApiException as e:
            raise ChildError.of("ungating", "Pod", name, e) from e

    async def create_event(self, event: Manifest) -> None:
        """Create a core/v1 Event; 409 means a named Event was posted by an earlier pass."""

        def call() -> None:
            try:
                # The Content-Type said outright: an apiserver reached directly guesses JSON
                # without one, one behind a proxy that labels the bytes answers 415.
                self.core.create_namespaced_event(
                    event["metadata"]["namespace"], event, _headers={"Content-Type": "application/json"}
                )
            except ApiException as e:
                if e.status != 409:
                    raise

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
                    raise ChildError.of("deleting", KIND, name, e) from e

        await asyncio.to_thread(call)
