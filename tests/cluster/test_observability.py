"""Progress comes from the rank-0 trainer's endpoint on its loopback pod IP; the operator exports metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.conftest import Jobs, OperatorProcess, free_port
from tests.kube import wait_for

pytestmark = pytest.mark.cluster

TRAINER_METRICS = """\
# TYPE llmtrain_step gauge
llmtrain_step 420
# TYPE llmtrain_total_steps gauge
llmtrain_total_steps 1000
# TYPE llmtrain_loss gauge
llmtrain_loss 2.5
# TYPE llmtrain_validation_loss gauge
llmtrain_validation_loss 2.75
# TYPE llmtrain_tokens_per_second gauge
llmtrain_tokens_per_second 12345.6
# TYPE llmtrain_eta_seconds gauge
llmtrain_eta_seconds 300
"""


@contextmanager
def fake_trainer_metrics(ip: str, port: int) -> Iterator[list[str]]:
    """Plays the rank-0 trainer: serves /metrics on the pod's own loopback IP."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.client_address[0])
            body = TRAINER_METRICS.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((ip, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hits
    finally:
        server.shutdown()
        server.server_close()


def test_progress_read_from_rank0_pod_ip(jobs: Jobs, operator: OperatorProcess) -> None:
    port = free_port()
    jobs.create("prog", workers={"metricsPort": port})
    pods = jobs.wait_pods("prog", 4)
    rank0 = next(p for p in pods if p["metadata"]["name"] == "prog-worker-0")
    ip = rank0["status"]["podIP"]
    assert ip.startswith("127."), "pod IPs are loopback addresses"
    with fake_trainer_metrics(ip, port) as hits:
        progress = wait_for(
            lambda: jobs.status("prog").get("progress"), timeout=30, what="progress in status"
        )
    assert progress["step"] == 420 and progress["totalSteps"] == 1000 and progress["percent"] == 42
    assert progress["loss"] == 2.5 and progress["validationLoss"] == 2.75 and progress["etaSeconds"] == 300
    assert progress["summary"] == "420/1000 (42%)"
    assert hits, "the operator scraped the endpoint"
    printed = jobs.cluster.kubectl("get", "llmtrainingjob", "prog", "-n", jobs.ns).stdout
    assert "420/1000 (42%)" in printed and "Running" in printed


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_operator_metrics_scraped_and_cleaned_up(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("met")
    # Finish only once the operator has seen the whole gang Running (its time-to-Running is below).
    jobs.wait_condition("met", "Running")
    jobs.annotate_pods("met", {"llmop.io/kwok-exit-after": "1s"})
    jobs.wait_condition("met", "Succeeded")
    ns = jobs.ns

    def succeeded_counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        s = _samples(operator.metrics())
        return s if s.get(("llmop_jobs_succeeded_total", (("namespace", ns),))) == 1 else None

    samples = wait_for(succeeded_counted, what="succeeded counter")
    assert samples[("llmop_jobs_created_total", (("namespace", ns),))] == 1
    assert samples[("llmop_jobs", (("state", "Succeeded"),))] == 1
    assert samples[("llmop_gang_time_to_running_seconds_count", ())] >= 1
    assert samples[("llmop_reconcile_duration_seconds_count", ())] > 0
    assert any(name == "llmop_job_info" and dict(labels).get("job") == "met" for name, labels in samples)

    jobs.cluster.kubectl("delete", "llmtrainingjob", "met", "-n", ns, "--wait=true", "--timeout=60s")

    def info_gone() -> bool:
        s = _samples(operator.metrics())
        return (
            not any(dict(labels).get("job") == "met" for _, labels in s)
            and s[("llmop_jobs", (("state", "Succeeded"),))] == 0
        )

    wait_for(info_gone, what="per-job series removed after deletion")
