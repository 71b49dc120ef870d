"""Test-side handle on the local cluster: kubectl as a user runs it, plus a typed API client."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config


@dataclass
class Cluster:
    kubeconfig: Path
    bin_dir: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def api(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def server_version(self) -> str:
        return str(self.kubectl_json("version")["serverVersion"]["gitVersion"])

    def set_quota(self, namespace: str, name: str, hard: dict[str, str]) -> None:
        """Create or change a ResourceQuota and wait until admission enforces exactly ``hard``.

        Admission checks a quota's status (its hard limits and counted use), which the quota
        controller fills in after the change; until then the old limits, or none, apply. A custom
        resource is counted only once the controller's discovery (every 30 s) has found its CRD,
        and a quota it could not count is not counted again before its next full resync (5 min):
        in a cluster just created such a quota is made anew until it is counted.
        """
        manifest = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}}
        status: dict[str, Any] = {}

        def enforced() -> bool:
            nonlocal status
            status = self.kubectl_json("get", "resourcequota", name, "-n", namespace).get("status") or {}
            return bool(status.get("hard") == hard and set(hard) <= set(status.get("used") or {}))

        deadline = time.monotonic() + 120
        while True:
            body = json.dumps({**manifest, "spec": {"hard": hard}})
            self.kubectl("apply", "-n", namespace, "-f", "-", input=body)
            try:
                wait_for(enforced, timeout=10, what=f"quota {name} {hard} enforced in {namespace}")
                return
            except AssertionError as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{e}; its status: {status}") from None
            self.kubectl("delete", "resourcequota", name, "-n", namespace, "--wait=true")

    def new_namespace(self) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.kubectl("create", "namespace", name)
        return name


def wait_for(
    predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.5, what: str = "condition"
) -> Any:
    """Poll until predicate returns something truthy; return it or fail with what we waited for."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
