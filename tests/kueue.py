"""A real Kueue controller for the cluster tests, started against the local cluster.

Kueue is built from its Go module like the cluster's binaries (hack/build-cluster-bins.sh, pinned in
hack/versions.env), and its CRDs and webhook configurations come from the same module source. Its own
certificate management is off (it would need a Service and Secret in kueue-system that route to a
pod): the fixture makes a CA and a serving certificate for 127.0.0.1, and registers the webhooks by
URL on loopback. Kueue manages only namespaces labelled ``llmop.io/kueue-test=true`` and its
namespaced webhooks are scoped to them, so the rest of the suite, which shares the cluster, never
meets it.
"""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.kube import Cluster, wait_for
from tests.s3server import _die_with_parent, free_ports

MANAGED_LABEL = "llmop.io/kueue-test"
LOOPBACK = "127.0.0.1"
# Kueue reads the metrics server's certificate from this fixed path whenever its internal
# certificate management is off (cmd/kueue/main.go); it exits at start when the files are missing.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
# Frameworks the operator's stages use: workers are a plain pod group, prepare and compression are
# batch Jobs, serving is a Deployment.
FRAMEWORKS = ["batch/job", "pod", "deployment"]


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(out: Path) -> bytes:
    """A CA and a serving certificate for 127.0.0.1 signed by it, as tls.crt/tls.key in ``out``.

    Returns the CA certificate (PEM): the apiserver's caBundle for the webhooks.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmop-test-kueue-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tls.crt").write_bytes(_pem_cert(cert))
    (out / "tls.key").write_bytes(_pem_key(key))
    return _pem_cert(ca)


def webhook_configurations(source: Path, port: int, ca: bytes, prefix: str) -> list[dict[str, Any]]:
    """Kueue's released webhook configurations, pointed at ``https://127.0.0.1:port`` by URL.

    Namespaced webhooks are narrowed to the labelled namespaces (the selector is ignored for
    cluster-scoped objects such as ClusterQueues, which Kueue always validates).
    """
    out = []
    for doc in yaml.safe_load_all(source.read_text()):
        if not doc:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": f"{prefix}-{doc['metadata']['name']}"}
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://{LOOPBACK}:{port}{path}",
                "caBundle": base64.b64encode(ca).decode(),
            }
            hook["namespaceSelector"] = {"matchLabels": {MANAGED_LABEL: "true"}}
            hook["timeoutSeconds"] = 10
        out.append(doc)
    return out


class Kueue:
    """Runs the ``kueue`` manager binary against the cluster until :meth:`stop`."""

    def __init__(self, cluster: Cluster, binary: Path, manifests: Path) -> None:
        self.cluster, self.binary, self.manifests = cluster, binary, manifests
        self.dir = Path(tempfile.mkdtemp(prefix="llmop-kueue-"))
        self.log_path = self.dir / "kueue.log"
        self.webhook_port, self.health_port, self.metrics_port = free_ports(3)
        self.prefix = f"llmop-test-kueue-{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._webhooks: list[dict[str, Any]] = []

    def config(self) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "health": {"healthProbeBindAddress": f"{LOOPBACK}:{self.health_port}"},
            "metrics": {"bindAddress": f"{LOOPBACK}:{self.metrics_port}"},
            "webhook": {"host": LOOPBACK, "port": self.webhook_port, "certDir": str(self.dir / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "managedJobsNamespaceSelector": {"matchLabels": {MANAGED_LABEL: "true"}},
            "integrations": {"frameworks": FRAMEWORKS},
        }

    def install_crds(self) -> None:
        crds = sorted((self.manifests / "crds").glob("*.yaml"))
        for crd in crds:
            self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        names = [f"crd/{yaml.safe_load(c.read_text())['metadata']['name']}" for c in crds]
        self.cluster.kubectl("wait", "--for=condition=Established", *names, "--timeout=60s")

    def start(self) -> Kueue:
        self.install_crds()
        ca = make_certs(self.dir / "certs")
        METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for f in ("tls.crt", "tls.key"):
            shutil.copy(self.dir / "certs" / f, METRICS_CERT_DIR / f)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(self.config()))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                f"--config={self.dir / 'config.yaml'}",
                # The on-demand visibility API is an aggregated apiserver: it would need an APIService
                # routed to this process, which nothing here uses.
                "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=2",
            ],
            env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)},
            stdout=log,
            stderr=log,
            preexec_fn=_die_with_parent,
        )
        wait_for(self.ready, timeout=120, what=f"kueue ready (log {self.log_path})")
        self._webhooks = webhook_configurations(
            self.manifests / "webhooks.yaml", self.webhook_port, ca, self.prefix
        )
        for hook in self._webhooks:
            self.cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(hook))
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"kueue exited with {self.proc.returncode}:\n{self.log()}")
        try:
            url = f"http://{LOOPBACK}:{self.health_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def errors(self) -> str:
        """Kueue's error lines (what a failed test most needs), the last few."""
        if not self.log_path.exists():
            return ""
        lines = [
            ln
            for ln in self.log_path.read_text(errors="replace").splitlines()
            if '"level":"error"' in ln or "ERROR" in ln
        ]
        return "\n".join(lines[-20:])

    def stop(self) -> None:
        for hook in self._webhooks:
            kind = hook["kind"].lower()
            self.cluster.kubectl("delete", kind, hook["metadata"]["name"], "--ignore-not-found", check=False)
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # The log stays (its path is in the test output); certificates and config go.
        for child in self.dir.iterdir():
            if child != self.log_path:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
