"""Fine-tuning on the development runtime: examples/finetune.yaml from kubectl apply to a served model.

The user's side comes first, as on a real cluster: a claim holding the base model (a Qwen2-family
checkpoint made locally, nothing can be downloaded) and the chat records. Then the operator runs
prepare (the model's tokenizer and chat template, loss on assistant turns), the LoRA gang on two
pods, int8 quantisation, selection and serving; the served model answers through the openai client.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop_dev import finetune
from llmtrain import testing_hf
from llmtrain.corpus import chat
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.e2e.conftest import claim_dir
from tests.e2e.test_local_runtime import apply, wait_state
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
EXAMPLE = yaml.safe_load(finetune.EXAMPLE.read_text())


def seeded_claim(cluster: Cluster, namespace: str) -> Path:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=finetune.claim_manifest())
    wait_for(
        lambda: (
            cluster.kubectl_json("get", "pvc", finetune.CLAIM, "-n", namespace)["status"].get("phase")
            == "Bound"
        ),
        timeout=60,
        what="claim bound",
    )
    root = claim_dir(cluster, namespace, finetune.CLAIM)
    testing_hf.checkpoint("qwen2", root / finetune.MODEL_DIR, seed=0)
    chat.write_jsonl(root / finetune.CHAT_FILE, 600)
    return root


def example(max_steps: int) -> dict[str, Any]:
    manifest = copy.deepcopy(EXAMPLE)
    training = manifest["spec"]["training"]
    training.update(maxSteps=max_steps, logIntervalSteps=10)
    training["lrSchedule"]["warmupSteps"] = min(training["lrSchedule"]["warmupSteps"], max_steps)
    training["checkpointing"]["intervalSteps"] = max_steps
    training["evaluation"]["intervalSteps"] = max_steps
    return manifest


def test_the_finetune_example_is_trained_compressed_and_served(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    import openai
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = seeded_claim(cluster, namespace)
    apply(cluster, namespace, example(max_steps=30))
    status = wait_state(jobs, "finetune", ("Serving",), timeout=900)
    stages = {s["name"]: s for s in status["stages"]}
    assert list(stages) == ["prepare", "train", "quantize-0"], stages
    assert all(s["state"] == "Succeeded" for s in stages.values()), stages
    progress = status["progress"]
    print(f"train: {progress}; quantize-0: {stages['quantize-0']['message']}")

    # Both exports are on the user's claim: the merged model in HF layout and the adapter alone.
    merged = AutoModelForCausalLM.from_pretrained(root / "output" / "model")
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    base = AutoModelForCausalLM.from_pretrained(root / finetune.MODEL_DIR)
    adapted = PeftModel.from_pretrained(base, root / "output" / "adapter")
    assert adapted.peft_config["default"].r == EXAMPLE["spec"]["training"]["lora"]["rank"]

    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "llmop.io/role=serve")["items"]
    (pod,) = [p for p in pods if p["status"].get("phase") == "Running"]
    client = openai.OpenAI(base_url=f"http://{pod['status']['podIP']}:8000/v1", api_key="unused")
    question = chat.records(1, seed=99)[0]["messages"][:2]
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in question)
    answer = client.completions.create(
        model="finetune", prompt=prompt + "<|im_start|>assistant\n", max_tokens=8, temperature=0
    )
    print(f"served answer: {answer.choices[0].text!r} ({answer.choices[0].finish_reason}, {answer.usage})")
    # A 30-step LoRA on a random base may well answer with its end-of-turn at once: what is checked is
    # that the fine-tuned model is what serves, through the client users call it with.
    assert answer.model == "finetune" and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.prompt_tokens == len(
        AutoTokenizer.from_pretrained(root / "output" / "model")(prompt + "<|im_start|>assistant\n").input_ids
    )


def test_a_source_that_does_not_exist_fails_the_job_once_with_a_condition(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    seeded_claim(cluster, namespace)
    manifest = example(max_steps=5)
    manifest["spec"]["model"]["pretrained"]["uri"] = "models/not-there"
    manifest["spec"].pop("compression")
    manifest["spec"].pop("serving")
    apply(cluster, namespace, manifest)
    status = wait_state(jobs, "finetune", ("Failed",), timeout=300)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    print(f"Failed condition: {failed}")
    assert "spec.model.pretrained.uri" in failed["message"] and "does not exist" in failed["message"]
    # Exit 2 is never retried (podFailurePolicy FailJob): one prepare pod ran, no worker was started.
    prepare = cluster.kubectl_json("get", "job", "finetune-prepare", "-n", namespace)
    assert prepare["status"].get("failed") == 1, prepare["status"]
    assert jobs.pods("finetune") == [], "no worker pod"
