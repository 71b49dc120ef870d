"""Near-duplicate detection: llmtrain.prepare vs datasketch MinHash-LSH vs datatrove MinHash dedup.

All three see the same documents and the same shingles (5-word shingles from
``llmtrain.prepare.shingles``), the same number of hashes and the same threshold. The corpus is
``builtin://english-dups`` replicated ``--replicas`` times; each replica suffixes every word with a
replica tag, so replicas share no shingle and the planted ground truth (cluster labels) stays exact.

Quality is pair-level precision and recall over the final clusters (every pair of documents in a
predicted cluster vs every pair in a planted cluster). Timings cover shingling, hashing, banding and
clustering, i.e. everything from texts to duplicate clusters.

    python benchmarks/prepare.py [--replicas 10] [--workers 0] [--no-bytecode-cache]

Every process imports from compiled bytecode, as in the trainer image (pip compiles it at install).
Where ``PYTHONDONTWRITEBYTECODE`` is set and no ``.pyc`` exists (this development machine), each pod
process would otherwise compile every module it imports from source, about 0.4 CPU-s a pod that no
deployed pod pays; so the script first fills a temporary bytecode cache (``PYTHONPYCACHEPREFIX``) by
running both pipelines once on a small corpus, untimed. ``--no-bytecode-cache`` measures without it.

Throughput is given per wall second and per CPU-second (user + system time of every process a side
ran: its pool workers, datatrove's tasks), so the per-core figure does not favour the side that used
more processes. The last line is ``prepare per-core speedup vs datatrove: X`` (datatrove's CPU seconds
over ours for the same documents and settings; the issue's goal is X >= 2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("operator", "trainer_image")]

from llmop_contract.api.v1alpha1.data import NearDuplicates, PreparePhase  # noqa: E402
from llmtrain import corpus  # noqa: E402
from llmtrain.config import load_config  # noqa: E402
from llmtrain.prepare import dedup, lsh, parallel  # noqa: E402
from llmtrain.prepare import tokenizer as tok  # noqa: E402
from llmtrain.prepare.distributed import local  # noqa: E402
from llmtrain.prepare.shingles import shingle_strings  # noqa: E402
from llmtrain.testing import debug_config  # noqa: E402

Clusters = list[list[int]]


def build_corpus(replicas: int) -> tuple[list[str], list[tuple[int, Any]]]:
    records = corpus.load("english-dups")
    texts: list[str] = []
    labels: list[tuple[int, Any]] = []
    for r in range(replicas):
        tag = "" if r == 0 else "q" + "".join(chr(97 + int(d)) for d in str(r))
        for rec in records:
            text = str(rec["text"])
            texts.append(re.sub(r"\w+", lambda m, t=tag: m.group(0) + t, text) if tag else text)
            labels.append((r, rec["cluster"]))
    return texts, labels


def pair_set(clusters: Clusters) -> set[tuple[int, int]]:
    return {p for c in clusters for p in itertools.combinations(sorted(c), 2)}


def quality(pred: Clusters, truth: Clusters) -> tuple[float, float]:
    p, t = pair_set(pred), pair_set(truth)
    tp = len(p & t)
    return tp / max(len(p), 1), tp / max(len(t), 1)


def clusters_from_pairs(n: int, pairs: Iterator[tuple[int, int]]) -> Clusters:
    uf = lsh.UnionFind(n)
    for a, b in pairs:
        uf.union(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def run_ours(texts: list[str], cfg: NearDuplicates, workers: int) -> Clusters:
    return dedup.near_duplicates(texts, cfg, num_workers=workers).clusters


def run_datasketch(texts: list[str], cfg: NearDuplicates) -> Clusters:
    from datasketch import MinHash, MinHashLSH

    # bulk() is datasketch's fastest path: one vectorised update per document.
    shingles = [[s.encode() for s in shingle_strings(t, cfg.shingle_size)] for t in texts]
    mhs = MinHash.bulk(shingles, num_perm=cfg.num_permutations)
    index = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_permutations)
    with index.insertion_session() as session:
        for i, m in enumerate(mhs):
            session.insert(i, m)
    pairs = ((i, j) for i, m in enumerate(mhs) for j in index.query(m) if j != i)
    return clusters_from_pairs(len(texts), pairs)


def run_datatrove(texts: list[str], cfg: NearDuplicates, workers: int, bands: int, rows: int) -> Clusters:
    os.environ["TQDM_DISABLE"] = "1"  # its progress bars, on stderr between the figures
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import minhash as dt_minhash
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from loguru import logger

    # datatrove logs every task's pipeline and stats to stderr through loguru; keep the figures readable.
    logger.remove()
    logger.add = lambda *_a, **_k: 0  # its executor re-adds a stderr sink per task
    # The signature step loads a spaCy word tokenizer in __init__ even though get_shingles below
    # never uses it; spaCy is not installed here, so hand it nothing.
    dt_minhash.load_word_tokenizer = lambda *_a, **_k: None

    class SameShingles(MinhashDedupSignature):  # type: ignore[misc]
        # datatrove's English word tokenizer needs spaCy; feeding it our shingles also makes the
        # comparison about the dedup machinery, not about tokenisation.
        def get_shingles(self, text: str) -> np.ndarray[Any, Any]:
            sh = shingle_strings(text, cfg.shingle_size)
            return np.fromiter(
                (self._hash_func(s.encode()) for s in sh), dtype=np.uint64, count=len(sh)
            ).reshape((-1, 1))

    tasks = max(workers, 1)
    bounds = np.linspace(0, len(texts), tasks + 1).astype(int)

    def reader(_: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for i in range(bounds[rank], bounds[rank + 1]):
            yield Document(text=texts[i], id=str(i))

    mh = MinhashConfig(n_grams=cfg.shingle_size, num_buckets=bands, hashes_per_bucket=rows)
    with tempfile.TemporaryDirectory() as tmp:
        logs = f"{tmp}/logs"

        def execute(pipeline: list[Any], n: int, name: str) -> None:
            LocalPipelineExecutor(
                pipeline=pipeline,
                tasks=n,
                workers=min(n, tasks),
                logging_dir=f"{logs}/{name}",
                start_method="fork",
            ).run()

        execute([reader, SameShingles(output_folder=f"{tmp}/sigs", config=mh)], tasks, "sigs")
        execute(
            [MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets", config=mh)],
            bands,
            "buckets",
        )
        execute(
            [
                MinhashDedupCluster(
                    input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/ids", config=mh, save_cluster_id=True
                )
            ],
            1,
            "cluster",
        )
        groups: dict[int, list[int]] = {}
        for rank in range(tasks):
            path = Path(tmp, "ids", f"{rank:06d}.clusters")
            if not path.exists():
                continue
            raw = path.read_bytes()
            for doc, cid in struct.iter_unpack("<II", raw):
                groups.setdefault(cid, []).append(int(bounds[rank]) + doc)
    return [g for g in groups.values() if len(g) > 1]


CPU: dict[str, float] = {}  # name -> CPU seconds (this process and its waited-for children)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


DEDUP_PHASES = (PreparePhase.SCAN, PreparePhase.DEDUP, PreparePhase.CLUSTER)


class Distributed:
    """The distributed prepare stage's deduplicating phases (scan, dedup, cluster) with ``pods``
    pods each, as the operator's Indexed Jobs run them (one process per pod): what datatrove's
    signature, bucket and cluster stages do, on the same documents.

    Cleaning and exact dedup are off (datatrove's pipeline does neither) and the tokenizer is given,
    so the cluster phase does not train one. ``run`` is what is timed; ``clusters`` then runs write
    and commit (tokenisation), untimed, only to read the committed duplicate report.
    """

    def __init__(self, texts: list[str], cfg: NearDuplicates, pods: int, work: Path) -> None:
        source = work / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tokenizer = work / "tokenizer"
        tokenizer.mkdir(parents=True, exist_ok=True)
        tok.save(tok.train(texts[:2000], 512), tokenizer, 64)
        spec = {
            "data": {
                "sources": [{"uri": str(source), "format": "JSONL"}],
                "cleaning": {"enabled": False},
                "deduplication": {"exact": False, "near": cfg.to_wire()},
                "tokenizer": {"path": str(tokenizer / "tokenizer.json")},
                "distributed": {"pods": pods},
            }
        }
        self.config = load_config(debug_config(work / "run", work / "data", spec))
        self.pods, self.work = pods, work
        self.phase_cpu: dict[str, float] = {}

    def run(self) -> Clusters:
        """``local.run_local`` over the deduplicating phases, with each phase's CPU seconds."""
        path = local.write_config(self.config, self.pods, self.work / "prepare-config.yaml")
        for phase in DEDUP_PHASES:
            cpu = cpu_seconds()
            local.run_phase(path, phase, self.pods if phase.parallel else 1)
            self.phase_cpu[phase.value] = cpu_seconds() - cpu
        return []

    def clusters(self) -> Clusters:
        local.run_local(
            self.config, self.pods, (PreparePhase.WRITE, PreparePhase.COMMIT), config_dir=self.work
        )
        found = []
        for line in (self.work / "data" / "dedup_clusters.jsonl").read_text().splitlines():
            entry = json.loads(line)
            found.append([int(origin.rsplit("#", 1)[1]) for origin in (entry["kept"], *entry["removed"])])
        return found


def timed(fn: Callable[[], Clusters], name: str = "") -> tuple[Clusters, float]:
    """``fn``'s result and wall seconds; its CPU seconds (every process it ran) go in CPU[name]."""
    start, cpu = time.perf_counter(), cpu_seconds()
    out = fn()
    CPU[name] = cpu_seconds() - cpu
    return out, time.perf_counter() - start


def warm(workers: int) -> None:
    """Both pipelines once on a small corpus, for their bytecode (``--warm``, in a subprocess)."""
    cfg = NearDuplicates()
    texts = build_corpus(1)[0][:1000]
    run_ours(texts, cfg, workers)
    with tempfile.TemporaryDirectory() as tmp:
        distributed = Distributed(texts, cfg, workers, Path(tmp))
        distributed.run()
        distributed.clusters()
    run_datasketch(texts, cfg)
    run_datatrove(texts, cfg, workers, *lsh.optimal_bands(cfg.threshold, cfg.num_permutations))


def bytecode_cache(workers: int) -> str:
    """Where imports read compiled bytecode from (see the module docstring)."""
    if not (sys.flags.dont_write_bytecode or os.environ.get("PYTHONDONTWRITEBYTECODE")):
        return "bytecode as installed"
    cache = tempfile.mkdtemp(prefix="prepare-bench-pyc-")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = cache  # the pods and their children
    sys.pycache_prefix, sys.dont_write_bytecode = cache, False  # datatrove, imported in this process
    subprocess.run([sys.executable, __file__, "--warm", "--workers", str(workers)], check=True)
    return "bytecode cached by an untimed warm-up run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--workers", type=int, default=0, help="processes for ours and datatrove; 0 = every core")
    ap.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="leave PYTHONDONTWRITEBYTECODE as it is: every process compiles what it imports",
    )
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workers = parallel.workers(args.workers)
    if args.warm:
        warm(workers)
        return
    imports = "bytecode as the environment has it" if args.no_bytecode_cache else bytecode_cache(workers)
    try:
        run(args.replicas, workers, imports)
    finally:
        if sys.pycache_prefix and Path(sys.pycache_prefix).name.startswith("prepare-bench-pyc-"):
            shutil.rmtree(sys.pycache_prefix, ignore_errors=True)


def run(replicas: int, workers: int, imports: str) -> None:
    cfg = NearDuplicates()
    texts, labels = build_corpus(replicas)
    by_label: dict[tuple[int, Any], list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    truth = [c for c in by_label.values() if len(c) > 1]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(
        f"corpus: english-dups x{replicas} = {len(texts)} docs, {mb:.1f} MB, {len(truth)} planted clusters; "
        f"shingles {cfg.shingle_size} words, {cfg.num_permutations} hashes, threshold {cfg.threshold}; "
        f"{workers} worker(s) on {os.cpu_count()} cores; {imports}"
    )
    ds_bands, ds_rows = lsh.optimal_bands(cfg.threshold, cfg.num_permutations)

    results: list[tuple[str, float, float, float]] = []

    def report(name: str, clusters: Clusters, seconds: float, cpu: float) -> None:
        precision, recall = quality(clusters, truth)
        results.append((name, seconds, precision, recall))
        print(
            f"{name:<28} {seconds:8.2f} s {len(texts) / seconds:9.0f} docs/s "
            f"{len(texts) / cpu:9.0f} docs/CPU-s {mb / seconds:7.2f} MB/s "
            f"precision {precision:.4f} recall {recall:.4f} clusters {len(clusters)}",
            flush=True,
        )

    ours, t_ours = timed(lambda: run_ours(texts, cfg, workers), "ours")
    report(f"llmtrain ({workers} workers)", ours, t_ours, CPU["ours"])
    if workers > 1:
        one, t_one = timed(lambda: run_ours(texts, cfg, 1), "one")
        report("llmtrain (1 worker)", one, t_one, CPU["one"])
    with tempfile.TemporaryDirectory() as tmp:
        distributed = Distributed(texts, cfg, workers, Path(tmp))
        _, t_dist = timed(distributed.run, "distributed")
        report(f"llmtrain distributed ({workers} pods)", distributed.clusters(), t_dist, CPU["distributed"])
        phases = ", ".join(f"{name} {cpu:.2f}" for name, cpu in distributed.phase_cpu.items())
        print(f"  distributed CPU-s per phase (every pod, startup included): {phases}", flush=True)
    ds, t_ds = timed(lambda: run_datasketch(texts, cfg), "datasketch")
    report("datasketch MinHashLSH", ds, t_ds, CPU["datasketch"])
    # datatrove is a dev dependency (pyproject.toml): never skipped.
    dt, t_dt = timed(lambda: run_datatrove(texts, cfg, workers, ds_bands, ds_rows), "datatrove")
    report(f"datatrove ({workers} tasks)", dt, t_dt, CPU["datatrove"])
    print(f"prepare speedup vs datasketch: {t_ds / t_ours:.2f}")
    print(f"prepare speedup vs datatrove: {t_dt / t_ours:.2f}")
    # Per core: documents per CPU-second over every process each side ran, so neither side looks
    # faster for using more cores (or slower for leaving one idle).
    print(f"in-memory per-core speedup vs datatrove: {CPU['datatrove'] / CPU['ours']:.2f}")
    # The like-for-like comparison: both multi-task pipelines, one process per task, through files.
    print(f"prepare per-core speedup vs datatrove: {CPU['datatrove'] / CPU['distributed']:.2f}")


if __name__ == "__main__":
    main()
