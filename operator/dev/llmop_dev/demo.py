"""`make demo`: one LLMTrainingJob from `kubectl apply` to a trained model, on this machine.

Starts (or reuses) the local cluster, then the development runtime and the operator in the
background, applies examples/quickstart.yaml in namespace llmop-demo and follows it: the data
preparation Job, the training gang (DeepSpeed over gloo across two local pods), the compression Jobs
(int8 quantisation, magnitude pruning), the selection, and the serving Deployment until it is ready.
Ends with a summary (stages and their figures, losses, throughput, restarts, the chosen model, a
completion from the served endpoint on its pod IP, operator and trainer metrics) and stops the
processes it started; the cluster keeps running (`make cluster-down`).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from llmop_dev import cluster
from llmop_dev.runtime import volumes
from llmop_dev.runtime.api import Api
from llmop_dev.stack import Background, http_get, start_operator, start_runtime

NAMESPACE = "llmop-demo"
JOB = "quickstart"
EXAMPLE = cluster.REPO / "examples" / "quickstart.yaml"
TIMEOUT_SECONDS = 900
PROMPT = "The software is provided"


def say(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


class Demo:
    """Applies one example job in its namespace and follows it to its end; the fine-tune demo reuses it."""

    def __init__(
        self, kubeconfig: Path, namespace: str = NAMESPACE, job: str = JOB, example: Path = EXAMPLE
    ) -> None:
        self.namespace, self.job, self.example = namespace, job, example
        storage = yaml.safe_load(example.read_text())["spec"].get("storage") or {}
        # The job's own claim, or the one the user brought (spec.storage.claimName).
        self.claim = storage.get("claimName") or f"{job}-storage"
        self.prompt = PROMPT
        self.kubeconfig, self.bin_dir = kubeconfig, cluster.ensure_binaries()
        self.api = Api(kubeconfig)
        self.t0 = time.monotonic()
        self.trainer_metrics = ""

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return cluster.kubectl(self.bin_dir, self.kubeconfig, *args, input=input, check=check)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-n", self.namespace, *args, "-o", "json"))

    def fresh_start(self, before_apply: Callable[[Demo], None] | None = None) -> None:
        self.kubectl("create", "namespace", self.namespace, check=False)
        # A previous demo's job (and its pods and volume) go first: the operator removes its finalizer.
        self.kubectl(
            "delete", "llmtrainingjob", self.job, "-n", self.namespace, "--ignore-not-found", "--timeout=180s"
        )
        if before_apply is not None:  # e.g. files the job reads put on the user's volume first
            before_apply(self)
        self.kubectl("apply", "-n", self.namespace, "-f", str(self.example))
        say(self.t0, f"kubectl apply -n {self.namespace} -f {self.example.relative_to(cluster.REPO)}")

    def follow(self) -> dict[str, Any]:
        seen: dict[str, str] = {}
        last_step = -1
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            job = self.get("llmtrainingjob", self.job)
            status = job.get("status") or {}
            pods = self.get("pods")["items"]

            def note(key: str, value: str, msg: str) -> None:
                if seen.get(key) != value:
                    seen[key] = value
                    say(self.t0, msg)

            note("state", str(status.get("state")), f"job {self.job}: {status.get('state')}")
            for stage in status.get("stages") or []:
                note(f"stage/{stage['name']}", stage["state"], f"stage {stage['name']}: {stage['state']}")
            for pod in pods:
                name, phase = pod["metadata"]["name"], pod["status"].get("phase", "Pending")
                where = f"on {pod['spec'].get('nodeName', '-')}, IP {pod['status'].get('podIP', '-')}"
                note(f"pod/{pod['metadata']['uid']}", phase, f"pod {name}: {phase} ({where})")
            progress = status.get("progress") or {}
            if progress.get("step", 0) not in (last_step, 0) and progress.get("totalSteps"):
                last_step = progress["step"]
                val = progress.get("validationLoss")
                say(
                    self.t0,
                    f"train step {last_step}/{progress['totalSteps']} ({progress.get('percent', 0)}%)"
                    f"  loss {progress.get('loss', float('nan')):.3f}"
                    f"  val {val if val is None else round(val, 3)}"
                    f"  tokens/s {progress.get('tokensPerSecond', 0):.0f}  eta {progress.get('etaSeconds', '?')}s",
                )
                self.scrape_trainer(pods)
            serving = (job.get("spec", {}).get("serving") or {}).get("enabled", False)
            done = ("Serving", "Failed") if serving else ("Succeeded", "Failed")
            if status.get("state") in done:
                return dict(job)
            time.sleep(2)
        raise TimeoutError(f"{self.job} did not finish within {TIMEOUT_SECONDS} s")

    def scrape_trainer(self, pods: list[dict[str, Any]]) -> None:
        """The rank-0 trainer's /metrics, from worker 0's pod IP, while it still runs."""
        for pod in pods:
            if pod["metadata"]["name"] == f"{self.job}-worker-0" and pod["status"].get("phase") == "Running":
                env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}
                url = f"http://{pod['status']['podIP']}:{env.get('LLMOP_METRICS_PORT', '9400')}/metrics"
                self.trainer_metrics = http_get(url) or self.trainer_metrics

    def model_dir(self, path_in_pod: str) -> Path:
        """Where a path on the job's volume (/var/lib/llmop/...) lives on this machine."""
        source = volumes.claim_source(self.claim, self.namespace, self.api.get_optional)
        return source / Path(path_in_pod).relative_to("/var/lib/llmop")

    def complete(self, port: int) -> tuple[str, float]:
        """One completion from the serving pod, on its loopback pod IP."""
        pods = self.get("pods", "-l", f"llmop.io/job-name={self.job},llmop.io/role=serve")["items"]
        ip = next(p["status"]["podIP"] for p in pods if p["status"].get("phase") == "Running")
        body = json.dumps(
            {"model": self.job, "prompt": self.prompt, "max_tokens": 30, "temperature": 0}
        ).encode()
        request = urllib.request.Request(
            f"http://{ip}:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
        say(self.t0, f"POST http://{ip}:{port}/v1/completions -> {resp.status}")
        return self.prompt + answer["choices"][0]["text"], time.monotonic() - started


def seconds_between(start: str | None, end: str | None) -> str:
    if not start or not end:
        return "-"
    took = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(
        start.replace("Z", "+00:00")
    )
    return f"{took.total_seconds():.0f} s"


def sample(model_dir: Path) -> str:
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)  # transformers types generate() loosely
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0], skip_special_tokens=True))


def metric_lines(text: str, prefix: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(prefix) and "_bucket" not in line and "_created" not in line
    ]


def summary(demo: Demo, job: dict[str, Any], operator_metrics: str, wall: float) -> None:
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    print("\n==> summary")
    print(f"  result            {status.get('state')} in {wall:.0f} s (apply -> {status.get('state')})")
    for stage in status.get("stages") or []:
        took = seconds_between(stage.get("startTime"), stage.get("completionTime"))
        detail = f"  {stage['method']}: {stage.get('message', '')}" if stage.get("method") else ""
        print(f"  stage {stage['name']:<11} {stage['state']:<10} {took:>6}{detail}")
    print(f"  steps             {progress.get('step')}/{progress.get('totalSteps')}")
    print(f"  training loss     {progress.get('loss', float('nan')):.3f}")
    print(f"  validation loss   {progress.get('validationLoss', float('nan')):.3f}")
    print(f"  tokens/s          {progress.get('tokensPerSecond', 0):.0f} (2 pods x 1 process, gloo)")
    print(f"  restarts          {status.get('restartCount', 0)}")
    trained = next((s.get("outputPath") for s in status.get("stages", []) if s["name"] == "train"), None)
    if trained:
        print(f"  trained model     {demo.model_dir(trained)} (PVC {demo.claim})")
    if status.get("outputModelPath"):
        chosen = status.get("selectedStage") or "the trained model"
        print(f"  output model      {status['outputModelPath']} ({chosen})")
    serving = status.get("serving") or {}
    if serving.get("ready"):
        port = job["spec"]["serving"].get("port", 8000)
        text, seconds = demo.complete(port)
        print(f"  serving           {serving['url']} ({serving['kind']}, {serving['readyReplicas']} ready)")
        print(f"  completion        {text!r} ({seconds:.2f} s)")
    elif status.get("state") == "Succeeded" and trained:
        print(f"  sample            {sample(demo.model_dir(trained))!r}")
    print("\n==> operator metrics (llmop_*)")
    print("\n".join(f"  {line}" for line in metric_lines(operator_metrics, "llmop_")))
    print("\n==> trainer metrics (rank 0, last scrape while running)")
    print("\n".join(f"  {line}" for line in metric_lines(demo.trainer_metrics, "llmtrain_")))
    print(f"\nlogs: .venv/bin/llmop logs {demo.job} -n {demo.namespace}")
    print(f"      export KUBECONFIG={demo.kubeconfig}; kubectl get llmjob,pods -n {demo.namespace}")


def run(demo: Demo, before_apply: Callable[[Demo], None] | None = None) -> int:
    """Runtime and operator in the background, the example applied and followed, a summary; 0 on success."""
    t0 = time.monotonic()
    logs = cluster.cache_dir() / demo.namespace
    say(demo.t0, f"cluster up ({demo.kubeconfig}); runtime and operator logs in {logs}")
    started: list[Background] = []
    ok = False
    try:
        started.append(start_runtime(demo.kubeconfig, logs / "runtime.log"))
        say(demo.t0, "development runtime serving nodes local-0, local-1")
        operator, metrics_port = start_operator(demo.kubeconfig, demo.namespace, logs / "operator.log")
        started.append(operator)
        say(demo.t0, f"operator watching namespace {demo.namespace}")
        demo.fresh_start(before_apply)
        applied = time.monotonic()
        job = demo.follow()
        wall = time.monotonic() - applied
        operator_metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics") or ""
        summary(demo, job, operator_metrics, wall)
        ok = (job.get("status") or {}).get("state") in ("Succeeded", "Serving")
    finally:
        for proc in reversed(started):
            proc.stop()
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s; the runtime and the operator are stopped")
    return 0 if ok else 1


def main() -> int:
    return run(Demo(cluster.up()))


if __name__ == "__main__":
    sys.exit(main())
