"""`make finetune`: examples/finetune.yaml, LoRA on chat records, from `kubectl apply` to a served model.

The job fine-tunes an existing Hugging Face model that lies on the user's own volume, as a platform
team's would: a PersistentVolumeClaim (``finetune-volume``) made first and filled with a checkpoint
and a JSONL file of conversations. Nothing can be downloaded here, so the checkpoint is a small
Qwen2-architecture model made with transformers' own config class (``llmtrain.testing_hf``) and the
conversations come from the bundled corpus (``llmtrain.corpus.chat``). On a cluster with internet,
``model.pretrained.uri: hf://Qwen/Qwen2.5-0.5B-Instruct`` (or s3://...) replaces the first part.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from llmop_dev import cluster
from llmop_dev.demo import Demo, run, say
from llmop_dev.runtime import volumes

NAMESPACE = "llmop-finetune"
EXAMPLE = cluster.REPO / "examples" / "finetune.yaml"
CLAIM = "finetune-volume"
MODEL_DIR = "models/base"  # model.pretrained.uri in the example: relative to the volume
CHAT_FILE = "sources/chat.jsonl"  # the example's data source, at /var/lib/llmop/sources/chat.jsonl
CONVERSATIONS = 3000


def claim_manifest(name: str = CLAIM, size: str = "1Gi") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}},
        }
    )


def volume_dir(demo: Demo, claim: str = CLAIM, timeout: float = 120) -> Path:
    """The claim's directory on this machine, once the development provisioner has bound it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pvc = demo.api.get_optional("pvc", claim, demo.namespace)
        if pvc and pvc.get("status", {}).get("phase") == "Bound":
            return volumes.claim_source(claim, demo.namespace, demo.api.get_optional)
        time.sleep(1)
    raise TimeoutError(f"claim {claim} was not bound within {timeout:.0f} s")


def seed_volume(demo: Demo) -> None:
    """The user's side: a claim holding the base model and the conversations."""
    from llmtrain import testing_hf
    from llmtrain.corpus import chat

    demo.kubectl("apply", "-n", demo.namespace, "-f", "-", input=claim_manifest())
    root = volume_dir(demo)
    if not (root / MODEL_DIR / "config.json").is_file():
        testing_hf.checkpoint("qwen2", root / MODEL_DIR, seed=0)
    chat.write_jsonl(root / CHAT_FILE, CONVERSATIONS)
    say(demo.t0, f"claim {CLAIM}: base model {MODEL_DIR}, {CONVERSATIONS} conversations in {CHAT_FILE}")


def main() -> int:
    from llmtrain.corpus import chat

    demo = Demo(cluster.up(), NAMESPACE, "finetune", EXAMPLE)
    question = chat.records(1, seed=99)[0]["messages"][:2]
    # The built-in server completes text: the prompt is the conversation in the model's chat format.
    demo.prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in question)
    demo.prompt += "<|im_start|>assistant\n"
    return run(demo, seed_volume)


if __name__ == "__main__":
    sys.exit(main())
