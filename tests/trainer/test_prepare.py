"""The prepare stage: readers, cleaning rules, PII, augmentation, tokenizer and the shard contract."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmop_contract.api.v1alpha1.data import Augmentation, Cleaning, DataSource, Normalization, SourceFormat
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain import corpus
from llmtrain.prepare import ConfigError, augment, clean, pii, pipeline, readers, shards
from llmtrain.prepare import run as prepare_run
from llmtrain.prepare import tokenizer as tok

REPO = Path(__file__).resolve().parents[2]
PROSE = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
    "fence near the river, thinking about the harvest that will come later in the autumn season."
)


def _read(uri: str, **kw: Any) -> list[str]:
    counts: Counter[str] = Counter()
    return list(readers.read(readers.resolve(0, DataSource(uri=uri, **kw)), counts))


def _config(tmp: Path, sources: list[dict[str, Any]], **data: Any) -> TrainerConfig:
    data.setdefault("sharding", {"tokensPerShard": 4096, "validationFraction": 0.05})
    data.setdefault("numWorkers", 1)
    return TrainerConfig.model_validate(
        {
            "paths": {"dataDir": str(tmp / "data")},
            "spec": {
                "model": {"vocabSize": 512},
                "training": {"maxSteps": 1},
                "data": {"sources": sources, **data},
            },
        }
    )


# --- readers ---------------------------------------------------------------------------------


def test_text_reader_splits_on_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\n  \nsecond para\n\nthird\n")
    assert _read(str(tmp_path / "a.txt")) == ["first para\nline two", "second para", "third"]


def test_jsonl_reader_counts_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\nnot json\n{"body": "x"}\n\n{"body": "two", "text": "three"}\n')
    counts: Counter[str] = Counter()
    src = readers.resolve(0, DataSource(uri=str(path)))
    assert list(readers.read(src, counts)) == ["one", "three"]
    assert counts == {"malformed_record": 1, "missing_text_field": 1}
    assert _read(str(path), text_field="body") == ["x", "two"]


def test_parquet_reader_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a doc", "b doc", None]}), path)
    assert _read(str(path), text_field="content") == ["a doc", "b doc"]
    with pytest.raises(ConfigError, match=r"sources\[0\]\.textField"):
        _read(str(path))


def test_directory_gzip_and_file_url(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    (tmp_path / "a.txt").write_text("plain")
    (tmp_path / "notes.bin").write_bytes(b"\x00")  # unknown format: skipped in a directory
    assert _read(str(tmp_path)) == ["plain", "zipped"]
    assert _read(f"file://{tmp_path}") == ["plain", "zipped"]
    assert _read(f"file://{tmp_path}/a.txt", format=SourceFormat.JSONL) == []  # explicit format wins


def test_memory_url() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/prep-test/x.jsonl", b'{"text": "from memory"}\n')
    fs.pipe("/prep-test/y.txt", b"para one\n\npara two")
    try:
        assert _read("memory://prep-test") == ["from memory", "para one", "para two"]
    finally:
        fs.rm("/prep-test", recursive=True)


def test_builtin_corpora() -> None:
    english = _read("builtin://english")
    dups = corpus.load("english-dups")
    assert len(english) >= 2000 and sum(len(t) for t in english) >= 1_500_000
    assert {r["kind"] for r in dups} == {"original", "exact", "near", "far"}
    assert corpus.load("english-dups") == dups  # deterministic
    with pytest.raises(ConfigError, match=r"sources\[0\]\.uri"):
        readers.resolve(0, DataSource(uri="builtin://klingon"))


def test_missing_source_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spec\.data\.sources\[3\]\.uri"):
        readers.resolve(3, DataSource(uri=str(tmp_path / "nope.jsonl")))


# --- cleaning ----------------------------------------------------------------------------------


def _clean(text: str, **kw: Any) -> tuple[str | None, Counter[str]]:
    return clean.clean(text, Cleaning(min_words=kw.pop("min_words", 5), **kw))


def test_unicode_normalisation_and_controls() -> None:
    out, ev = _clean("The ﬁne ｆｕｌｌｗｉｄｔｈ text\u200b is\x07 here today")
    assert out == "The fine fullwidth text is here today" and ev["control_chars"] == 1
    out, _ = _clean("The ﬁne text stays as it is", unicode_normalization=Normalization.NONE)
    assert out is not None and "ﬁ" in out


def test_markup_is_stripped() -> None:
    html = (
        "<html><script>var x = 1;</script><p>Fish &amp; chips are <b>very</b> good food</p><!-- c --></html>"
    )
    out, ev = _clean(html)
    assert out == "Fish & chips are very good food" and ev["markup"] == 1
    maths = "Whenever value < limit holds, remember that limit > value holds equally well."
    assert _clean(maths)[0] == maths


def test_boilerplate_lines_are_removed() -> None:
    text = "\n".join(
        [
            "Home > Products > Widgets",
            PROSE,
            "We use cookies to improve your experience.",
            "All rights reserved.",
        ]
    )
    out, ev = _clean(text)
    assert out == PROSE and ev["boilerplate_lines"] == 3
    out, _ = _clean(text, remove_boilerplate=False)
    assert out is not None and "cookies" in out


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("too few words here", "min_words"),
        (" ".join(["word"] * 50), "max_words"),
        ("a an to of in it is be as at so we he by or on do if me my up", "min_mean_word_length"),
        ("incomprehensibilities " * 6, "max_mean_word_length"),
        ("# heading # more # hash # tags # everywhere here", "max_symbol_word_ratio"),
        ("1234 5678 9012 3456 7890 1234 5678 words", "min_alpha_word_fraction"),
        ("the same line again\n" * 4 + "and one different line", "max_duplicate_line_fraction"),
    ],
)
def test_quality_rules(text: str, rule: str) -> None:
    out, ev = _clean(text, max_words=40)
    assert out is None and ev == {f"removed:{rule}": 1}


def test_cleaning_disabled_keeps_text() -> None:
    assert _clean("<b>x</b>", enabled=False)[0] == "<b>x</b>"


# --- PII -----------------------------------------------------------------------------------------


def test_pii_redaction() -> None:
    text = (
        "Mail jane.doe@example.co.uk or call +1 (555) 123-4567 or 020 7946 0958; "
        "server 192.168.0.17 and 2001:db8::8a2e:370:7334 are down."
    )
    out, counts = pii.redact(text)
    assert out == ("Mail <EMAIL> or call <PHONE> or <PHONE>; server <IP_ADDRESS> and <IP_ADDRESS> are down.")
    assert counts == {"pii_email": 1, "pii_phone": 2, "pii_ip_address": 2}


def test_pii_leaves_numbers_that_are_not_personal() -> None:
    text = (
        "In 2023 version 3.11.7 shipped on 2023-10-02 15:30:50; 999.1.1.1 is not an address, nor is "
        "12:30, and the slices x[::2] or x[1::2] stay too."
    )
    assert pii.redact(text) == (text, Counter())


def test_pii_runs_only_when_enabled() -> None:
    text = PROSE + " Write to a@b.org today."
    assert "<EMAIL>" not in (_clean(text)[0] or "")
    assert "<EMAIL>" in (_clean(text, redact_pii=True)[0] or "")


# --- augmentation --------------------------------------------------------------------------------


def test_augmentation_is_seeded_and_deterministic(tmp_path: Path) -> None:
    thesaurus_file = tmp_path / "thes.tsv"
    thesaurus_file.write_text("quick\tfast,speedy\nlazy\tidle\n")
    cfg = Augmentation(
        enabled=True,
        word_dropout=0.1,
        word_swap=0.1,
        char_noise=0.1,
        synonym_replacement=0.5,
        thesaurus_path=str(thesaurus_file),
        seed=7,
    )
    thesaurus = augment.load_thesaurus(str(thesaurus_file))
    a = [augment.augment(PROSE, cfg, thesaurus, c) for c in range(3)]
    assert a == [augment.augment(PROSE, cfg, thesaurus, c) for c in range(3)]
    assert len(set(a)) == 3 and PROSE not in a
    other = augment.augment(PROSE, cfg.model_copy(update={"seed": 8}), thesaurus, 0)
    assert other != a[0]
    syn = cfg.model_copy(
        update={"word_dropout": 0, "word_swap": 0, "char_noise": 0, "synonym_replacement": 0.5}
    )
    out = augment.augment("quick lazy " * 20, syn, thesaurus, 0).split()
    assert set(out) <= {"quick", "fast", "speedy", "lazy", "idle"} and {"fast", "speedy", "idle"} & set(out)


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_has_exactly_vocab_size_tokens() -> None:
    texts = [str(r["text"]) for r in corpus.load("english")[:150]]
    info = tok.train(texts, 700)
    assert info.vocab_size == 700 and (info.eos_id, info.pad_id) == (0, 1)
    tiny = tok.train(["ab ab ab"], 400)  # runs out of merges: padded with reserved tokens
    assert tiny.vocab_size == 400
    with pytest.raises(ConfigError, match="vocabSize"):
        tok.train(texts, 257)


# --- end to end: shard contract, idempotency, atomicity ----------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainerConfig, dict[str, Any], Path]:
    tmp = tmp_path_factory.mktemp("prep")
    records = corpus.load("english-dups")[:500]
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
    cfg = _config(tmp, [{"uri": str(src)}])
    stats = prepare_run(cfg)
    return cfg, stats, Path(cfg.paths.data_dir)


def test_shard_contract(prepared: tuple[TrainerConfig, dict[str, Any], Path]) -> None:
    cfg, stats, data_dir = prepared
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["format"] == "llmop-shards-v1" and manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == 512 and manifest["tokenizer"] == "tokenizer.json"
    meta = json.loads((data_dir / "tokenizer_meta.json").read_text())
    assert (meta["eos_id"], meta["pad_id"]) == (manifest["eos_id"], manifest["pad_id"])
    per_shard = cfg.spec.data.sharding.tokens_per_shard
    assert shards.verify(data_dir) == []
    for split in ("train", "val"):
        listed = manifest["splits"][split]
        assert listed, f"{split} split is empty"
        assert [s["file"] for s in listed] == [f"{split}-{i:05d}.bin" for i in range(len(listed))]
        assert all(s["tokens"] == per_shard for s in listed[:-1]) and 0 < listed[-1]["tokens"] <= per_shard
        ids = np.concatenate([np.fromfile(data_dir / s["file"], dtype="<u2") for s in listed])
        for s in listed:
            assert hashlib.sha256((data_dir / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert ids.size == stats["tokens"][split] == sum(s["tokens"] for s in listed)
        assert ids.max() < 512 and ids[-1] == manifest["eos_id"]
        # Documents are EOS-separated: one EOS per document, and no empty document.
        eos_at = np.flatnonzero(ids == manifest["eos_id"])
        assert eos_at.size == stats["documents_out"][split]
        assert (np.diff(eos_at) > 1).all()
    assert manifest["stats"] == stats and stats["skipped"] is False
    assert stats["documents_in"] == 500
    assert stats["removed_by_rule"]["exact_duplicate"] > 0 and stats["near_duplicates"]["clusters"] > 0
    report = [json.loads(line) for line in (data_dir / "dedup_clusters.jsonl").read_text().splitlines()]
    removed: Counter[str] = Counter()
    for entry in report:
        removed[entry["kind"]] += len(entry["removed"])
    assert removed == {"exact": stats["exact_duplicates"], "near": stats["near_duplicates"]["removed"]}


def test_transformers_can_load_the_tokenizer(prepared: tuple[TrainerConfig, dict[str, Any], Path]) -> None:
    import transformers  # a trainer dependency: missing it fails, never skips

    _, _, data_dir = prepared
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(data_dir / "tokenizer.json"))
    ids = fast("Hello world, this is a test.")["input_ids"]
    assert fast.decode(ids) == "Hello world, this is a test."
    loaded = transformers.AutoTokenizer.from_pretrained(str(data_dir))
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token_id == 1


def test_rerun_is_a_no_op(prepared: tuple[TrainerConfig, dict[str, Any], Path]) -> None:
    cfg, _, data_dir = prepared
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    again = prepare_run(cfg.model_copy(update={"spec": cfg.spec.model_copy(deep=True)}))
    assert again["skipped"] is True
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before


def test_changed_config_rebuilds_and_crash_keeps_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in corpus.load("english")[:120]))
    cfg = _config(tmp_path, [{"uri": str(src)}])
    first = prepare_run(cfg)
    data_dir = Path(cfg.paths.data_dir)
    old_manifest = (data_dir / "manifest.json").read_text()

    changed = _config(tmp_path, [{"uri": str(src)}], cleaning={"minWords": 60})

    def boom(*_: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_run(changed)
    assert (data_dir / "manifest.json").read_text() == old_manifest and shards.verify(data_dir) == []
    monkeypatch.undo()

    second = prepare_run(changed)
    assert second["skipped"] is False and second["documents_out"] != first["documents_out"]
    assert shards.verify(data_dir) == [] and not list(data_dir.glob(".prepare-tmp-*"))
    src.write_text(src.read_text() + json.dumps({"text": PROSE * 3}) + "\n")  # input changed
    assert prepare_run(changed)["skipped"] is False


def test_split_never_leaves_validation_empty() -> None:
    for n in (2, 3, 10, 1000):
        train, val = pipeline.split_indices(n, 0.001, 1)
        assert val and train and sorted(train + val) == list(range(n))
    assert pipeline.split_indices(1, 0.1, 1) == ([0], [])


def test_large_vocab_uses_uint32() -> None:
    assert shards.dtype_for(65535).name == "uint16" and shards.dtype_for(65536).name == "uint32"


# --- configuration errors fail before any work ----------------------------------------------------------


# The two ways to run the stage: the pod's `llmtrain prepare` and the standalone module.
ENTRY_POINTS = {
    "llmtrain prepare": ["llmtrain.cli", "prepare"],
    "python -m llmtrain.prepare": ["llmtrain.prepare"],
}


def _cli(
    tmp: Path, config: dict[str, Any], entry: str = "python -m llmtrain.prepare"
) -> subprocess.CompletedProcess[str]:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])}
    return subprocess.run(
        [sys.executable, "-m", *ENTRY_POINTS[entry], str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            {"sources": [{"uri": "builtin://english"}], "cleaning": {"minWordz": 3}},
            "spec.data.cleaning.minWordz",
        ),
        ({"sources": [{"uri": "/does/not/exist.jsonl"}]}, "spec.data.sources[0].uri"),
        (
            {
                "sources": [{"uri": "builtin://english"}],
                "augmentation": {"enabled": True, "synonymReplacement": 0.2, "thesaurusPath": "/nope.tsv"},
            },
            "spec.data.augmentation.thesaurusPath",
        ),
    ],
)
def test_bad_config_fails_naming_the_field(tmp_path: Path, data: dict[str, Any], field: str) -> None:
    data_dir = tmp_path / "data"
    config = {"paths": {"dataDir": str(data_dir)}, "spec": {"training": {"maxSteps": 1}, "data": data}}
    result = _cli(tmp_path, config)
    assert result.returncode == 2, result.stderr
    assert field in result.stderr
    assert not data_dir.exists()


def test_small_vocab_fails_before_work(tmp_path: Path) -> None:
    cfg = _config(tmp_path, [{"uri": "builtin://english"}])
    cfg.spec.model.vocab_size = 256
    with pytest.raises(ConfigError, match=r"spec\.model\.vocabSize"):
        prepare_run(cfg)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "data",
    [
        {"sources": [{"uri": "builtin://english"}], "cleaning": {"minWordz": 3}},  # fails validation
        {"sources": [{"uri": "/does/not/exist.jsonl"}]},  # validates, fails the stage's preflight
    ],
)
def test_both_entry_points_exit_2_with_the_same_message(tmp_path: Path, data: dict[str, Any]) -> None:
    config = {
        "paths": {"dataDir": str(tmp_path / "data")},
        "spec": {"training": {"maxSteps": 1}, "data": data},
    }
    results = {entry: _cli(tmp_path, config, entry) for entry in ENTRY_POINTS}
    for entry, result in results.items():
        assert result.returncode == 2, (entry, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == "", entry
    first, second = (r.stderr for r in results.values())
    assert first == second and first.startswith("llmtrain prepare: ")
    assert not (tmp_path / "data").exists()


def test_both_entry_points_prepare_a_valid_config(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    records = corpus.load("english")[:80]
    src.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
    config = _config(tmp_path, [{"uri": str(src)}]).model_dump(mode="json", by_alias=True, exclude_none=True)
    first = _cli(tmp_path, config, "llmtrain prepare")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["skipped"] is False
    assert shards.verify(tmp_path / "data") == []
    second = _cli(tmp_path, config, "python -m llmtrain.prepare")  # the same output: nothing to redo
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout) == {**json.loads(first.stdout), "skipped": True}
