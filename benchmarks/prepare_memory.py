"""Peak memory of distributed prepare's pods at 1x and 10x the corpus, against the single pod.

The corpus is benchmarks/prepare.py's ``build_corpus`` (english-dups, replicated with disjoint
vocabularies), written as 8 JSONL files. Every phase's pods run as ``python -m llmtrain.prepare
--phase P --index I`` subprocesses (``llmtrain.prepare.distributed.local.run_phase``); the figure is
each phase's largest peak RSS (VmHWM, reported by ``llmtrain.prepare.distributed.measured``). The
single pod runs the same config without ``distributed`` and ``--phase``, measured the same way.

Claimed bound per pod, beyond the interpreter and its libraries (C):

    scan:    C + batch (8 MB of text) + partition buffers (32 MB) + batch signatures
    dedup:   C + docs/N x (24 B + bands x 28 B) + candidate pairs x 16 B
             + the signature pages verification touches (memory-mapped, file-backed, evictable)
    cluster: C + duplicates x 16 B + docs/N x 25 B + tokenizer sample (<= 64 MB) and BPE state
    write:   C + docs/N x 25 B + one encode batch (1000 documents or 1 MB of text, ~36 B a token)
    commit:  C + shards listed

    python benchmarks/prepare_memory.py [--replicas 1 10] [--pods 4] [--skip-single]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("operator", "trainer_image")]

import yaml  # noqa: E402

from llmop_contract.api.v1alpha1.data import PreparePhase  # noqa: E402
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig  # noqa: E402
from llmtrain.prepare.distributed.local import run_phase, write_config  # noqa: E402
from llmtrain.prepare.distributed.measured import PEAK_PREFIX  # noqa: E402

_FILES = 8


def _build_corpus(replicas: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_prepare", Path(__file__).with_name("prepare.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts: list[str] = module.build_corpus(replicas)[0]
    return texts


def _config(root: Path, replicas: int, pods: int | None) -> TrainerConfig:
    src = root / "corpus"
    if not src.exists():
        src.mkdir()
        texts = _build_corpus(replicas)
        step = -(-len(texts) // _FILES)
        for k in range(_FILES):
            with open(src / f"part-{k:02d}.jsonl", "w") as fh:
                for t in texts[k * step : (k + 1) * step]:
                    fh.write(json.dumps({"text": t}) + "\n")
    data: dict[str, object] = {
        "sources": [{"uri": str(src)}],
        "numWorkers": 1,
        "sharding": {"tokensPerShard": 1 << 20, "validationFraction": 0.02},
    }
    if pods is not None:
        data["distributed"] = {"pods": pods}
    name = f"data-{pods}" if pods else "data-single"
    return TrainerConfig.model_validate(
        {
            "paths": {"dataDir": str(root / name)},
            "spec": {"model": {"vocabSize": 2048}, "training": {"maxSteps": 1}, "data": data},
        }
    )


def _single(root: Path, config: TrainerConfig) -> tuple[int, float]:
    path = root / "single.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "trainer_image")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.prepare.distributed.measured", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        check=True,
    )
    last = proc.stderr.rstrip("\n").rpartition("\n")[2]
    return int(last.removeprefix(PEAK_PREFIX)), time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--skip-single", action="store_true", help="only the distributed phases")
    args = ap.parse_args()
    mib = 1 << 20
    for replicas in args.replicas:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            config = _config(root, replicas, args.pods)
            size = sum(f.stat().st_size for f in (root / "corpus").iterdir())
            print(f"--- {replicas}x: {size / mib:.1f} MiB of JSONL, {args.pods} pods", flush=True)
            path = write_config(config, args.pods, root / "dist.yaml")
            total = 0.0
            for phase in PreparePhase:
                start = time.monotonic()
                pods = run_phase(path, phase, args.pods if phase.parallel else 1)
                seconds = time.monotonic() - start
                total += seconds
                peak = max(p.peak_rss_bytes for p in pods)
                print(
                    f"{replicas:>3}x {phase.value:<8} pods {len(pods)}  largest peak RSS {peak / mib:7.1f} MiB"
                    f"  ({seconds:.1f}s)",
                    flush=True,
                )
            print(f"{replicas:>3}x distributed total {total:.1f}s", flush=True)
            if args.skip_single:
                continue
            rss, seconds = _single(root, _config(root, replicas, None))
            print(
                f"{replicas:>3}x single pod           peak RSS {rss / mib:7.1f} MiB  ({seconds:.1f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
