"""Distributed prepare (scan -> dedup -> cluster -> write -> commit) against the single pod.

The planted english-dups corpus is split over five files of three sources (a directory of JSONL
files, a Parquet file of several row groups, one large JSONL file that the slicing cuts into byte
ranges). 1 pod and 4 pods must keep the same documents, in the same order, as the single-pod
pipeline, with the same duplicate report, and write the same token stream per split (their shard
boundaries differ: every write pod cuts its own shards).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmop_contract.api.v1alpha1.data import DataSource, PreparePhase
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import Env, TerminationMessage
from llmtrain import corpus
from llmtrain.prepare import clean, pipeline, readers, shards, stages
from llmtrain.prepare.distributed import slices
from llmtrain.prepare.distributed.local import run_local, run_phase, write_config
from llmtrain.prepare.distributed.work import WORK_DIR
from tests.trainer.test_dedup import PRECISION_FLOOR, RECALL_FLOOR

REPO = Path(__file__).resolve().parents[2]
PODS = 4
# Where each source's documents start in the corpus: origin "<uri>#<j>" is record OFFSET[s] + j.
CUTS = (0, 600, 1100, None)


def _jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))


def _build(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    records = corpus.load("english-dups")
    a, b, c = CUTS[1], CUTS[2], len(records)
    (root / "dir").mkdir()
    for k, (lo, hi) in enumerate(((0, 150), (150, 400), (400, a))):
        _jsonl(root / "dir" / f"part-{k}.jsonl", records[lo:hi])
    pq.write_table(
        pa.table({"text": [r["text"] for r in records[a:b]]}), root / "mid.parquet", row_group_size=90
    )
    _jsonl(root / "big.jsonl", records[b:c])
    return records, [str(root / "dir"), str(root / "mid.parquet"), str(root / "big.jsonl")]


def _config(data_dir: Path, uris: list[str], pods: int | None) -> TrainerConfig:
    data: dict[str, Any] = {
        "sources": [{"uri": u} for u in uris],
        "numWorkers": 1,
        "sharding": {"tokensPerShard": 65536, "validationFraction": 0.05},
    }
    if pods is not None:
        data["distributed"] = {"pods": pods}
    return TrainerConfig.model_validate(
        {
            "paths": {"dataDir": str(data_dir)},
            "spec": {"model": {"vocabSize": 512}, "training": {"maxSteps": 1}, "data": data},
        }
    )


def _report(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data_dir / pipeline.REPORT).read_text().splitlines()]


def _stream(data_dir: Path, split: str) -> np.ndarray[Any, Any]:
    return np.concatenate([np.asarray(a) for a in shards.load_split(data_dir, split)])


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single pod, 1 pod and 4 pods over the same corpus; the 4-pod run is checked for reruns
    and crashed pods between its phases."""
    root = tmp_path_factory.mktemp("dist")
    records, uris = _build(root)
    single_cfg = _config(root / "single", uris, None)
    single_stats = pipeline.run(single_cfg)
    one = run_local(_config(root / "one", uris, 1), 1)
    cfg4 = _config(root / "four", uris, PODS)
    path = write_config(cfg4, PODS, root / "four.yaml")
    work = root / "four" / WORK_DIR
    out: dict[str, Any] = {"root": root, "records": records, "uris": uris, "cfg4": cfg4}
    for phase in (PreparePhase.SCAN, PreparePhase.DEDUP, PreparePhase.CLUSTER, PreparePhase.WRITE):
        out[phase.value] = run_phase(path, phase, PODS if phase.parallel else 1)
    out["per_pod"] = [
        json.loads((work / "scan" / f"{p}.done.json").read_text())["stats"]["per_source"] for p in range(PODS)
    ]
    # A finished pod is a no-op on rerun: it says so and touches nothing.
    marker = work / "scan" / "1.done.json"
    before = (marker.stat().st_mtime_ns, _digests(work / "scan" / "1"))
    rerun = run_phase(path, PreparePhase.SCAN, 2)[1]
    out["rerun"] = (
        json.loads(rerun.stdout),
        before,
        (marker.stat().st_mtime_ns, _digests(work / "scan" / "1")),
    )
    # A write pod that died halfway: no marker, a temporary left behind, a damaged output; its
    # rerun removes them and writes the same files.
    good = _digests(work / "write" / "2")
    (work / "write" / "2.done.json").unlink()
    (work / "write" / "2.tmp-999999").mkdir()
    (work / "write" / "2.tmp-999999" / "train-00002-00000.bin").write_bytes(b"partial")
    first = sorted((work / "write" / "2").glob("*.bin"))[0]
    first.write_bytes(first.read_bytes()[:10])
    run_phase(path, PreparePhase.WRITE, 3)
    out["crash"] = (good, _digests(work / "write" / "2"), sorted(p.name for p in (work / "write").iterdir()))
    four = run_phase(path, PreparePhase.COMMIT, 1)[0]
    out.update(single=(root / "single", single_stats), one=(root / "one", one))
    out["four"] = (root / "four", json.loads(four.stdout))
    # The single pod's kept documents, by origin, from its own stages.
    report = stages.Report({})
    docs = pipeline._filter(
        stages.read_sources(pipeline.preflight(single_cfg), report), single_cfg.spec.data, report
    )
    out["single_kept"] = docs.origins
    return out


def test_kept_documents_and_report_equal_the_single_pod(runs: dict[str, Any]) -> None:
    single_dir, single = runs["single"]
    for name in ("one", "four"):
        data_dir, stats = runs[name]
        assert shards.verify(data_dir) == []
        assert _report(data_dir) == _report(single_dir), name
        for key in ("documents_in", "sources", "reader", "input_bytes", "cleaning", "exact_duplicates"):
            assert stats[key] == single[key], (name, key)
        assert stats["near_duplicates"]["removed"] == single["near_duplicates"]["removed"]
        assert stats["near_duplicates"]["verified_pairs"] == single["near_duplicates"]["verified_pairs"]
        assert sum(stats["documents_out"].values()) == len(runs["single_kept"])
        assert not (data_dir / WORK_DIR).exists()
    # Kept = read - cleaned away - removed in the report: the report names every removal.
    removed = {o for e in _report(runs["four"][0]) for o in e["removed"]}
    assert not removed & set(runs["single_kept"])


def test_one_and_four_pods_write_the_same_token_streams(runs: dict[str, Any]) -> None:
    (one_dir, one), (four_dir, four) = runs["one"], runs["four"]
    assert one["documents_out"] == four["documents_out"] and one["documents_out"]["val"] > 0
    for split in shards.SPLITS:
        assert np.array_equal(_stream(one_dir, split), _stream(four_dir, split)), split
    assert (one_dir / "tokenizer.json").read_bytes() == (four_dir / "tokenizer.json").read_bytes()
    manifest = shards.read_manifest(four_dir)
    assert manifest is not None and manifest.config_hash != shards.read_manifest(one_dir).config_hash  # type: ignore[union-attr]
    assert {f.split("-")[1] for f in manifest.files("train")} == {f"{p:05d}" for p in range(PODS)}


def _origin_index(runs: dict[str, Any]) -> dict[str, int]:
    """origin -> record index, for the documents read (the corpus in source order)."""
    n = len(runs["records"])
    bounds = [CUTS[0], CUTS[1], CUTS[2], n]
    return {
        f"{u}#{j}": bounds[s] + j
        for s, u in enumerate(runs["uris"])
        for j in range(bounds[s + 1] - bounds[s])
    }


def test_near_duplicates_precision_recall_across_pods(runs: dict[str, Any]) -> None:
    records, index = runs["records"], _origin_index(runs)
    cleaning = runs["cfg4"].spec.data.cleaning
    survives = [clean.clean(str(r["text"]), cleaning)[0] is not None for r in records]
    # Predicted: documents joined by any reported cluster (exact first, then near, as the stage does).
    parent = list(range(len(records)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for entry in _report(runs["four"][0]):
        k = index[entry["kept"]]
        for o in entry["removed"]:
            parent[find(index[o])] = find(k)
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(find(i), []).append(i)
    pred = {p for g in groups.values() for p in itertools.combinations(sorted(g), 2)}
    by: dict[object, list[int]] = {}
    for i, r in enumerate(records):
        if survives[i]:
            by.setdefault(r["cluster"], []).append(i)
    true = {p for g in by.values() for p in itertools.combinations(sorted(g), 2)}
    tp = len(true & pred)
    precision, recall = tp / max(len(pred), 1), tp / max(len(true), 1)
    # Which scan pod read each record: per-source document counts of the pods, in order.
    pod_of = np.zeros(len(records), dtype=int)
    starts = [CUTS[0], CUTS[1], CUTS[2]]
    for s in range(3):
        at = starts[s]
        for p, per_source in enumerate(runs["per_pod"]):
            c = per_source.get(str(s), 0)
            pod_of[at : at + c] = p
            at += c
    cross = {(a, b) for a, b in true if pod_of[a] != pod_of[b]}
    found_cross = cross & pred
    print(
        f"pairs: true {len(true)} predicted {len(pred)} precision {precision:.3f} recall {recall:.3f}; "
        f"cross-pod true {len(cross)} found {len(found_cross)}"
    )
    assert len(set(pod_of.tolist())) == PODS
    assert len(cross) >= 50, "the corpus must plant duplicates whose copies are read by different pods"
    assert precision >= PRECISION_FLOOR and recall >= RECALL_FLOOR
    assert len(found_cross) / len(cross) >= RECALL_FLOOR


def test_rerun_of_a_finished_pod_is_a_no_op(runs: dict[str, Any]) -> None:
    stats, before, after = runs["rerun"]
    assert stats["skipped"] is True and before == after


def test_pod_that_died_halfway_reruns_to_the_same_result(runs: dict[str, Any]) -> None:
    good, redone, listing = runs["crash"]
    assert redone == good
    assert not [name for name in listing if ".tmp-" in name]


def test_finished_stage_makes_every_phase_a_no_op(
    runs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(runs["cfg4"], PODS, tmp_path / "c.yaml")
    manifest = (runs["four"][0] / "manifest.json").read_bytes()
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(Env.TERMINATION_LOG, str(termination))
    for phase in PreparePhase:
        pod = run_phase(path, phase, 1)[0]
        assert json.loads(pod.stdout)["skipped"] is True, phase
        message = TerminationMessage.decode(termination.read_text())
        assert message.extra == {"stage": "prepare", "phase": phase.value, "index": 0}
        assert message.results["documentsRead"] == len(runs["records"])
    assert (runs["four"][0] / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("entry", [["llmtrain.prepare"], ["llmtrain.cli", "prepare"]])
def test_unreadable_source_exits_2_naming_the_field(tmp_path: Path, entry: list[str]) -> None:
    good = tmp_path / "ok.jsonl"
    _jsonl(good, corpus.load("english")[:20])
    cfg = _config(tmp_path / "data", [str(good), str(tmp_path / "gone.jsonl")], 2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True, exclude_none=True)))
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer_image"), "JOB_COMPLETION_INDEX": "1"}
    for phase in ("scan", "write"):
        result = subprocess.run(
            [sys.executable, "-m", *entry, str(path), "--phase", phase],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert "spec.data.sources[1].uri" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


# --- slicing ---------------------------------------------------------------------------------------

_TEXT = (
    "first para\nline two\n\n\n  \nsecond para\r\n\r\nthird  \n\nfourth\n \n \nfifth\n\t\nsixth\n"
    "no blank after\nstill the same\n\n" + "".join(f"para {i} words here\n\n" for i in range(60)) + "last"
)


def _resolved(path: Path, **kw: Any) -> list[readers.ResolvedSource]:
    return [readers.resolve(0, DataSource(uri=str(path), **kw))]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_slices_read_exactly_what_readers_read(
    tmp_path: Path, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny blocks, so pieces and cut searches span many reads.
    monkeypatch.setattr(slices, "_BLOCK", 16)
    monkeypatch.setattr(slices, "_TAIL", 8)
    (tmp_path / "a.txt").write_bytes(_TEXT.encode())
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(40)] + ["not json", '{"other": 1}', ""]
    (tmp_path / "b.jsonl").write_bytes(("\r\n".join(lines[:20]) + "\n" + "\n".join(lines[20:])).encode())
    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(50)]}), tmp_path / "c.parquet", row_group_size=7
    )
    sources = _resolved(tmp_path)
    expected_counts: Counter[str] = Counter()
    expected = list(readers.read(sources[0], expected_counts))
    plan = slices.plan(sources, n)
    counts: Counter[str] = Counter()
    got = [d for pieces in plan for p in pieces for d in slices.read_piece(sources, p, counts)]
    assert got == expected and counts == expected_counts
    assert len(plan) == n
    if n > 1:
        assert sum(1 for pieces in plan if pieces) > 1


@pytest.mark.parametrize("name", ["a.txt", "b.jsonl"])
def test_a_cut_at_any_offset_loses_and_duplicates_nothing(tmp_path: Path, name: str) -> None:
    weird = "x\n \n \ny\r\n\r\nz \n\t\n\n\nw\n" * 5
    records = [json.dumps({"text": f"d{i}"}) for i in range(30)]
    body = (
        (weird + _TEXT + weird) if name.endswith(".txt") else "\r\n".join(records) + "\nbad\n\n" + records[0]
    )
    path = tmp_path / name
    path.write_bytes(body.encode())
    sources = _resolved(path)
    whole = list(readers.read(sources[0], Counter()))
    f, size = sources[0].files[0], len(body.encode())
    for offset in range(1, size):
        cut = slices._next_cut(f, offset, size)
        if cut is None:
            continue
        assert cut >= offset
        pieces = [slices.Piece(0, 0, 0, cut), slices.Piece(0, 0, cut, size)]
        assert [d for p in pieces for d in slices.read_piece(sources, p, Counter())] == whole, offset


def test_builtin_corpus_is_cut_between_records() -> None:
    sources = [readers.resolve(0, DataSource(uri="builtin://english-dups"))]
    whole = list(readers.read(sources[0], Counter()))
    plan = slices.plan(sources, 4)
    assert all(len(pieces) == 1 for pieces in plan)
    assert [d for pieces in plan for p in pieces for d in slices.read_piece(sources, p, Counter())] == whole
