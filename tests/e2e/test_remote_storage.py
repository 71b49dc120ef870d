"""Object storage end to end on the development runtime, against a real S3 server (SeaweedFS).

The user's side first, as on a real cluster: a bucket holding the base model and the conversations,
and a Secret holding the store's keys. Two identical LoRA jobs read both from the bucket through the
Secret and upload their checkpoints under their own storage.remote prefix. One runs undisturbed;
the other is suspended mid-run, loses every checkpoint on its volume, and is resumed: it must
restore from the bucket and continue the same loss curve. Its exported model is then loaded from the
bucket, and the Secret's values appear in no object, status, Event or log of either job.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop import naming
from llmtrain import testing_hf
from llmtrain.corpus import chat
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.e2e.conftest import claim_dir, trainer_log
from tests.e2e.test_finetune import EXAMPLE
from tests.e2e.test_local_runtime import apply, wait_state
from tests.kube import Cluster, wait_for
from tests.s3server import S3Server

pytestmark = pytest.mark.cluster
SECRET = "store-keys"
STEPS = 40
EVERY = 10


def upload_inputs(s3: S3Server, bucket: str, tmp: Path) -> None:
    testing_hf.checkpoint("qwen2", tmp / "base", seed=0)
    chat.write_jsonl(tmp / "chat.jsonl", 600)
    fs = s3.client()
    fs.put(str(tmp / "base") + "/", f"{bucket}/models/base/", recursive=True)
    fs.put(str(tmp / "chat.jsonl"), f"{bucket}/data/chat.jsonl")


def job(name: str, s3: S3Server, bucket: str, secret: str = SECRET) -> dict[str, Any]:
    manifest = copy.deepcopy(EXAMPLE)
    manifest["metadata"] = {"name": name}
    spec = manifest["spec"]
    spec["model"]["pretrained"]["uri"] = f"s3://{bucket}/models/base"
    spec["data"]["sources"] = [{"uri": f"s3://{bucket}/data/chat.jsonl", "format": "JSONL"}]
    training = spec["training"]
    training.update(maxSteps=STEPS, logIntervalSteps=1)
    training["lrSchedule"]["warmupSteps"] = 5
    training["checkpointing"] = {"intervalSteps": EVERY, "keepLast": 2}
    training["evaluation"]["intervalSteps"] = STEPS
    spec["storage"] = {
        "objectStore": {"endpoint": s3.endpoint, "addressingStyle": "Path", "credentialsSecret": secret},
        "remote": {"uri": f"s3://{bucket}/jobs/{name}"},
    }
    spec.pop("compression", None)
    spec.pop("serving", None)
    return manifest


def losses(log: str) -> dict[int, float]:
    """step -> loss of every progress line, later attempts overwriting earlier ones."""
    out: dict[int, float] = {}
    for line in log.splitlines():
        if " progress " not in f" {line} ":
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        out[int(fields["step"])] = float(fields["loss"])
    return out


def dump_everything(cluster: Cluster, namespace: str) -> str:
    """Every object in the namespace but the Secret itself, as YAML, plus the jobs with their status."""
    kinds = "all,configmaps,persistentvolumeclaims,serviceaccounts,events,jobs.batch,llmtrainingjobs"
    items = cluster.kubectl_json("get", kinds, "-n", namespace)["items"]
    return yaml.safe_dump([i for i in items if i.get("kind") != "Secret"])


def test_a_job_reads_from_and_checkpoints_to_s3_and_resumes_from_the_bucket(
    cluster: Cluster,
    namespace: str,
    jobs: Jobs,
    local_operator: OperatorProcess,
    s3: S3Server,
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    bucket = s3.make_bucket(f"e2e-{namespace}"[:63])
    upload_inputs(s3, bucket, tmp_path)
    apply(cluster, namespace, s3.credentials_secret(SECRET))
    apply(cluster, namespace, job("steady", s3, bucket))
    apply(cluster, namespace, job("moved", s3, bucket))

    # Once a checkpoint is complete in the bucket, stop the job and take every checkpoint off its volume.
    wait_for(
        lambda: ((jobs.status("moved").get("remote") or {}).get("checkpointStep") or 0) >= EVERY,
        timeout=900,
        interval=1,
        what="a checkpoint of 'moved' complete in the bucket",
    )
    jobs.patch_spec("moved", {"runPolicy": {"suspend": True}})
    wait_for(lambda: not jobs.pods("moved"), timeout=120, what="moved's pods gone while suspended")
    checkpoints = claim_dir(cluster, namespace, naming.claim_name("moved")) / "checkpoints"
    lost = sorted(p.name for p in checkpoints.iterdir())
    shutil.rmtree(checkpoints)
    remote_before = jobs.status("moved")["remote"]
    print(f"removed {lost} from the volume; bucket has {remote_before}")
    jobs.patch_spec("moved", {"runPolicy": {"suspend": False}})

    moved = wait_state(jobs, "moved", ("Succeeded",), timeout=900)
    steady = wait_state(jobs, "steady", ("Succeeded",), timeout=900)

    log = trainer_log(namespace, "moved-worker-0")
    starts = re.findall(r" start .*resumed_from=(\S+)", log)
    assert len(starts) == 2 and starts[0] == "None", starts
    assert int(starts[1].removeprefix("step-")) >= EVERY, starts
    reasons = {e["reason"] for e in jobs.events("moved")}
    assert "ResumedFromRemote" in reasons, reasons

    # The resumed run continues the undisturbed one's curve.
    a, b = losses(trainer_log(namespace, "steady-worker-0")), losses(log)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"loss curves over {STEPS} steps: max abs difference {diff:.3g}")
    assert diff < 1e-4

    # The exported model is in the bucket, complete, and loads from there.
    remote = moved["remote"]
    assert remote["modelUri"] == f"s3://{bucket}/jobs/moved/model", remote
    assert remote["checkpointStep"] == STEPS, remote
    fs = s3.client()
    assert fs.exists(f"{bucket}/jobs/moved/model/llmop-upload.json")
    fs.get(f"{bucket}/jobs/moved/model/", str(tmp_path / "from-bucket") + "/", recursive=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "from-bucket")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert {c["type"]: c["status"] for c in moved["conditions"]}.get("RemoteSynced") == "True"
    assert steady["remote"]["checkpointStep"] == STEPS

    # The keys went to the pods only by reference: no object, status, Event or log holds them.
    haystack = dump_everything(cluster, namespace)
    for pod in ("steady-prepare", "moved-prepare", "steady-worker-0", "steady-worker-1", "moved-worker-1"):
        haystack += trainer_log(namespace, pod)
    haystack += log
    assert SECRET in haystack  # the references are there
    for value in (s3.secret_key, s3.access_key):
        for form in (value, base64.b64encode(value.encode()).decode()):
            assert form not in haystack


def test_wrong_keys_fail_the_job_once_with_a_condition_naming_the_source(
    cluster: Cluster,
    namespace: str,
    jobs: Jobs,
    local_operator: OperatorProcess,
    s3: S3Server,
    tmp_path: Path,
) -> None:
    bucket = s3.make_bucket(f"e2e-{namespace}"[:63])
    upload_inputs(s3, bucket, tmp_path)
    wrong = s3.credentials_secret("wrong-keys")
    wrong["stringData"]["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-key"
    apply(cluster, namespace, wrong)
    apply(cluster, namespace, job("denied", s3, bucket, secret="wrong-keys"))

    status = wait_state(jobs, "denied", ("Failed",), timeout=300)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    print(f"Failed: {failed['reason']}: {failed['message']}")
    assert f"s3://{bucket}/" in failed["message"]
    assert "spec." in failed["message"]  # names the field
    assert "not-the-secret-key" not in failed["message"]
    prepare = next(s for s in status["stages"] if s["name"] == "prepare")
    assert prepare["state"] == "Failed" and not prepare.get("retries"), prepare
    # Nothing partial was taken for a model: the cache holds no completed copy.
    assert not fs_has_marker(s3, bucket)


def fs_has_marker(s3: S3Server, bucket: str) -> bool:
    return bool(s3.client().glob(f"{bucket}/jobs/denied/**/llmop-upload.json"))
