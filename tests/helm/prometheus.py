"""A real Prometheus on 127.0.0.1, configured from the chart's installed monitoring objects.

Where prometheus-operator would turn a ServiceMonitor or PodMonitor into a scrape job, `scrape_job`
does the same for the fields the chart uses (selector, port, path, interval, honorLabels, jobLabel,
relabelings), with the relabelling prometheus-operator generates; Prometheus applies it. The
PrometheusRule's groups become the rule file.

Debian builds Prometheus without Kubernetes service discovery, so `KubernetesDiscovery` stands in
for it through Prometheus' HTTP service discovery: it reads Pods and Services from
the apiserver and answers with the targets and `__meta_kubernetes_*` labels Prometheus' own
Kubernetes discovery attaches (roles `pod` and `endpointslice`, the labels the relabelling uses).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

Manifest = dict[str, Any]


def _label(name: str) -> str:
    """Kubernetes label name as a Prometheus meta label suffix (llmop.io/job-name -> llmop_io_job_name)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _relabel(rule: Manifest) -> Manifest:
    """prometheus-operator RelabelConfig (camelCase) -> Prometheus relabel_config (snake_case)."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    out = {keys.get(k, k): v for k, v in rule.items()}
    if "action" in out:
        out["action"] = out["action"].lower()
    return out


def scrape_job(monitor: Manifest, discovery: KubernetesDiscovery) -> Manifest:
    kind, meta, spec = monitor["kind"], monitor["metadata"], monitor["spec"]
    pod_monitor = kind == "PodMonitor"
    endpoint = (spec["podMetricsEndpoints"] if pod_monitor else spec["endpoints"])[0]
    selector = spec.get("namespaceSelector", {})
    namespaces = [] if selector.get("any") else (selector.get("matchNames") or [meta["namespace"]])
    sd = {
        "url": discovery.url("pod" if pod_monitor else "endpointslice", namespaces),
        "refresh_interval": "1s",
    }
    owner = "pod" if pod_monitor else "service"
    relabel: list[Manifest] = []
    for key, value in spec["selector"].get("matchLabels", {}).items():
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_{owner}_label_{_label(key)}",
                    f"__meta_kubernetes_{owner}_labelpresent_{_label(key)}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    port_label = (
        "__meta_kubernetes_pod_container_port_name"
        if pod_monitor
        else "__meta_kubernetes_endpointslice_port_name"
    )
    relabel += [
        {"action": "keep", "source_labels": [port_label], "regex": endpoint["port"]},
        # Finished pods are not scraped.
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
    ]
    if pod_monitor:
        relabel.append({"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"})
    else:
        relabel.append({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"})
        relabel.append({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"})
    if spec.get("jobLabel"):
        relabel.append(
            {
                "source_labels": [f"__meta_kubernetes_{owner}_label_{_label(spec['jobLabel'])}"],
                "target_label": "job",
                "regex": "(.+)",
                "replacement": "${1}",
            }
        )
    relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    relabel += [_relabel(r) for r in endpoint.get("relabelings", [])]
    job: Manifest = {
        "job_name": f"{kind[0].lower()}{kind[1:]}/{meta['namespace']}/{meta['name']}/0",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint.get("path", "/metrics"),
        "http_sd_configs": [sd],
        "relabel_configs": relabel,
    }
    if "interval" in endpoint:
        job["scrape_interval"] = endpoint["interval"]
    if endpoint.get("metricRelabelings"):
        job["metric_relabel_configs"] = [_relabel(r) for r in endpoint["metricRelabelings"]]
    return job


class KubernetesDiscovery:
    """Prometheus' Kubernetes discovery (roles pod and endpointslice), served as HTTP discovery."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.server: ThreadingHTTPServer | None = None

    def url(self, role: str, namespaces: list[str]) -> str:
        assert self.server is not None
        query = urllib.parse.urlencode({"role": role, "namespaces": ",".join(namespaces)})
        return f"http://127.0.0.1:{self.server.server_port}/sd?{query}"

    @staticmethod
    def _labels(prefix: str, labels: dict[str, str] | None) -> dict[str, str]:
        out = {}
        for key, value in (labels or {}).items():
            out[f"{prefix}_label_{_label(key)}"] = value
            out[f"{prefix}_labelpresent_{_label(key)}"] = "true"
        return out

    def _pod_labels(self, pod: Any) -> dict[str, str]:
        return {
            "__meta_kubernetes_namespace": pod.metadata.namespace,
            "__meta_kubernetes_pod_name": pod.metadata.name,
            "__meta_kubernetes_pod_ip": pod.status.pod_ip or "",
            "__meta_kubernetes_pod_phase": pod.status.phase or "",
            "__meta_kubernetes_pod_node_name": pod.spec.node_name or "",
            **self._labels("__meta_kubernetes_pod", pod.metadata.labels),
        }

    def _pods_in(self, namespaces: list[str]) -> list[Any]:
        if not namespaces:  # namespaceSelector any: true
            return list(self.core.list_pod_for_all_namespaces().items)
        return [p for ns in namespaces for p in self.core.list_namespaced_pod(ns).items]

    def pods(self, namespaces: list[str]) -> list[Manifest]:
        groups = []
        for pod in self._pods_in(namespaces):
            if not pod.status.pod_ip:
                continue
            for container in pod.spec.containers:
                for port in container.ports or []:
                    labels = {
                        **self._pod_labels(pod),
                        "__meta_kubernetes_pod_container_name": container.name,
                        "__meta_kubernetes_pod_container_port_name": port.name or "",
                        "__meta_kubernetes_pod_container_port_number": str(port.container_port),
                    }
                    groups.append(
                        {"targets": [f"{pod.status.pod_ip}:{port.container_port}"], "labels": labels}
                    )
        return groups

    def endpointslices(self, namespaces: list[str]) -> list[Manifest]:
        """Targets of role endpointslice, from Services and their ready pods.

        The EndpointSlice controller cannot write these pods' addresses here: the apiserver refuses
        loopback endpoint addresses, and every pod IP of this cluster is one (127.1.0.0/16). So the
        slices are derived the way that controller does it: the Service's selector picks the ready
        pods, each Service port's targetPort resolves against the pod's container ports.
        """
        groups = []
        services = (
            [s for ns in namespaces for s in self.core.list_namespaced_service(ns).items]
            if namespaces
            else list(self.core.list_service_for_all_namespaces().items)
        )
        for service in services:
            if not service.spec.selector:
                continue
            ns = service.metadata.namespace
            selector = ",".join(f"{k}={v}" for k, v in service.spec.selector.items())
            base = {
                "__meta_kubernetes_namespace": ns,
                "__meta_kubernetes_service_name": service.metadata.name,
                **self._labels("__meta_kubernetes_service", service.metadata.labels),
            }
            for pod in self.core.list_namespaced_pod(ns, label_selector=selector).items:
                ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
                if not (pod.status.pod_ip and ready):
                    continue
                for port in service.spec.ports or []:
                    for container in pod.spec.containers:
                        for cport in container.ports or []:
                            if port.target_port in (cport.name, cport.container_port):
                                labels = {
                                    **base,
                                    **self._pod_labels(pod),
                                    "__meta_kubernetes_endpointslice_port_name": port.name or "",
                                    "__meta_kubernetes_pod_container_name": container.name,
                                }
                                target = f"{pod.status.pod_ip}:{cport.container_port}"
                                groups.append({"targets": [target], "labels": labels})
        return groups

    def start(self) -> None:
        sd = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                namespaces = [n for n in query.get("namespaces", [""])[0].split(",") if n]
                role = query["role"][0]
                groups = sd.pods(namespaces) if role == "pod" else sd.endpointslices(namespaces)
                body = json.dumps(groups).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, scrape_jobs: list[Manifest], rule_groups: list[Manifest], interval: str) -> None:
        (self.workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(self.workdir / "rules.yaml")],
            "scrape_configs": scrape_jobs,
        }
        (self.workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
        log = (self.workdir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                f"--config.file={self.workdir / 'prometheus.yaml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",  # loopback only
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"prometheus not ready:\n{self.log()}")

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad expression answers 400 with the error in the body
            body = json.loads(e.read())
        return body

    def query(self, expr: str, **params: Any) -> list[Manifest]:
        body = self.api("query", query=expr, **params)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return list(body["data"]["result"])

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[Manifest]:
        body = self.api("query_range", query=expr, start=start, end=end, step=step)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return list(body["data"]["result"])

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
