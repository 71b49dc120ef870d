"""Supervised data: records validated and rendered, the loss only on answers, Packed and Padded batches.

Everything runs on a tiny local Hugging Face checkpoint (llmtrain.testing_hf) whose tokenizer has a
ChatML chat template; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import LOSS_FLAG, MANIFEST_FILE, RECORD_START_FLAG, DataManifest
from llmtrain import datacheck, testing_hf, testing_sft
from llmtrain.config import DataError
from llmtrain.prepare import run as prepare_run
from llmtrain.prepare import shards
from llmtrain.train.data import (
    IGNORE,
    Position,
    Records,
    TrainLoader,
    Windows,
    open_split,
    packed_batch,
    validation_batches,
)

REPO = Path(__file__).resolve().parents[2]
EOS = testing_hf.SPECIALS[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    tok = testing_hf.tokenizer(root / "tok")
    return testing_hf.checkpoint("llama", root / "llama", seed=0, tokenizer_dir=tok)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _config(
    tmp: Path, model_dir: Path, source: Path, fmt: dict[str, Any], seq: int = 64, **data: Any
) -> TrainerConfig:
    return TrainerConfig.model_validate(_raw(tmp, model_dir, source, fmt, seq, **data))


def _raw(
    tmp: Path, model_dir: Path, source: Path, fmt: dict[str, Any], seq: int = 64, **data: Any
) -> dict[str, Any]:
    data.setdefault("sharding", {"tokensPerShard": 1024, "validationFraction": 0.2})
    return {
        "paths": {"dataDir": str(tmp / "data")},
        "spec": {
            "model": {"pretrained": {"uri": str(model_dir)}},
            "training": {"maxSteps": 1, "sequenceLength": seq, "microBatchSize": 2, "globalBatchSize": 2},
            "data": {"sources": [{"uri": str(source)}], "format": fmt, "numWorkers": 1, **data},
        },
    }


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _records(data_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every record of both splits as (ids, flags), cut at the record-start flags."""
    m = DataManifest.model_validate_json((data_dir / MANIFEST_FILE).read_text())
    out = []
    for split in ("train", "val"):
        ids = np.concatenate(shards.load_split(data_dir, split)).astype(np.int64)
        flags = np.concatenate(
            [np.fromfile(data_dir / str(s.flags_file), dtype=np.uint8) for s in m.splits[split]]
        )
        assert len(flags) == len(ids)
        starts = [*list(np.flatnonzero(flags & RECORD_START_FLAG)), len(ids)]
        assert starts[0] == 0, "a split starts with a record"
        out += [(ids[a:b], flags[a:b]) for a, b in itertools.pairwise(starts)]
    return out


def _loss_text(tok: Any, ids: np.ndarray, flags: np.ndarray) -> str:
    return str(tok.decode(ids[(flags & LOSS_FLAG) != 0].tolist()))


def _prompt_completion_rows() -> tuple[list[Any], list[tuple[str, str]]]:
    good = [(f"Question {i}: what is {i} plus {i}?", f" It is {2 * i}.") for i in range(12)]
    rows: list[Any] = [{"prompt": p, "completion": c, "extra": i} for i, (p, c) in enumerate(good)]
    rows += [
        {"prompt": "no answer here"},  # completion missing
        {"prompt": "null answer", "completion": None},  # completion missing
        {"prompt": 7, "completion": " seven"},  # prompt not a string
        {"prompt": "list answer", "completion": ["a"]},  # completion not a string
        "[1, 2]",  # not an object
        "{not json",  # not JSON at all
        {"prompt": good[0][0], "completion": good[0][1]},  # exact duplicate of the first record
    ]
    return rows, good


def test_prompt_completion_loss_is_on_completions_only(tmp_path: Path, model_dir: Path, tok: Any) -> None:
    rows, good = _prompt_completion_rows()
    cfg = _config(
        tmp_path, model_dir, _jsonl(tmp_path / "pc.jsonl", rows), {"type": "PromptCompletion"}, seq=16
    )
    stats = prepare_run(cfg)
    assert stats["invalid_records"] == {
        "completion": {"missing": 2, "not_a_string": 1},
        "prompt": {"not_a_string": 1},
        "<record>": {"not_an_object": 1, "not_json": 1},
    }
    assert stats["records"] == {
        "read": 19,
        "usable": 12,
        "invalid": 6,
        "duplicates": 1,
        "train": 10,
        "val": 2,
    }
    recs = _records(Path(cfg.paths.data_dir))
    assert sorted(_loss_text(tok, ids, fl) for ids, fl in recs) == sorted(c + EOS for _, c in good)
    # The whole record is prompt + completion + EOS, and nothing else has a loss.
    assert sorted(tok.decode(ids.tolist()) for ids, _ in recs) == sorted(p + c + EOS for p, c in good)
    m = datacheck.read_manifest(cfg.paths.data_dir)
    assert (m.record_format, m.packing, m.records("train"), m.records("val")) == (
        "PromptCompletion",
        "Packed",
        10,
        2,
    )
    assert shards.verify(Path(cfg.paths.data_dir)) == []


def test_template_renders_fields_and_labels(tmp_path: Path, model_dir: Path, tok: Any) -> None:
    rows: list[Any] = [{"text": f"passage number {i} about cats", "label": i % 3, "id": i} for i in range(10)]
    rows += [{"text": "no label"}, {"label": 1}, {"text": {"nested": 1}, "label": 2}]
    fmt = {"type": "Template", "promptTemplate": "Text: {text}\nClass:", "completionField": "label"}
    cfg = _config(tmp_path, model_dir, _jsonl(tmp_path / "t.jsonl", rows), fmt, seq=16)
    stats = prepare_run(cfg)
    assert stats["invalid_records"] == {"label": {"missing": 1}, "text": {"missing": 1, "not_a_scalar": 1}}
    recs = _records(Path(cfg.paths.data_dir))
    assert len(recs) == 10
    assert Counter(_loss_text(tok, ids, fl) for ids, fl in recs) == Counter(
        f" {i % 3}{EOS}" for i in range(10)
    )
    assert sorted(tok.decode(ids.tolist()) for ids, _ in recs) == sorted(
        f"Text: passage number {i} about cats\nClass: {i % 3}{EOS}" for i in range(10)
    )


def _chat(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Name {i}?"},
        {"role": "assistant", "content": f"Item {i}."},
        {"role": "user", "content": "And twice?"},
        {"role": "assistant", "content": f"Item {2 * i}, twice."},
    ]


def test_chat_loss_is_on_assistant_turns_only(tmp_path: Path, model_dir: Path, tok: Any) -> None:
    rows: list[Any] = [{"messages": _chat(i)} for i in range(8)]
    rows += [
        {"messages": [{"role": "user", "content": "hello?"}]},  # nothing to learn
        {"messages": "hello"},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"conversation": _chat(99)},
    ]
    cfg = _config(tmp_path, model_dir, _jsonl(tmp_path / "c.jsonl", rows), {"type": "Chat"}, seq=32)
    stats = prepare_run(cfg)
    assert stats["invalid_records"] == {
        "messages": {
            "message_without_role_and_content": 1,
            "missing": 1,
            "no_assistant_turn": 1,
            "not_a_list_of_messages": 1,
        }
    }
    recs = _records(Path(cfg.paths.data_dir))
    # Each reply as the template renders it after its generation prompt, then the record's EOS.
    expected = [f"Item {i}.<|im_end|>\nItem {2 * i}, twice.<|im_end|>\n{EOS}" for i in range(8)]
    assert sorted(_loss_text(tok, ids, fl) for ids, fl in recs) == sorted(expected)
    full = [tok.apply_chat_template(_chat(i), tokenize=False) + EOS for i in range(8)]
    assert sorted(tok.decode(ids.tolist()) for ids, _ in recs) == sorted(full)


def test_all_malformed_exits_2_naming_the_field(tmp_path: Path, model_dir: Path) -> None:
    rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(5)]
    cfg = _config(tmp_path, model_dir, _jsonl(tmp_path / "bad.jsonl", rows), {"type": "PromptCompletion"})
    with pytest.raises(
        DataError,
        match=r"spec\.data\.format\.completionField: no usable record among 5: "
        r"field 'completion' missing in 5",
    ):
        prepare_run(cfg)
    assert not (Path(cfg.paths.data_dir) / MANIFEST_FILE).exists()
    # The command line: exit 2 and one line that says the same.
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        json.dumps(_raw(tmp_path, model_dir, tmp_path / "bad.jsonl", {"type": "PromptCompletion"}))
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")])}
    done = subprocess.run(
        [sys.executable, "-m", "llmtrain.prepare", str(config_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "spec.data.format.completionField" in done.stderr and "'completion' missing in 5" in done.stderr


def test_pretrained_tokenizer_prepares_text_and_loads(tmp_path: Path, model_dir: Path, tok: Any) -> None:
    from transformers import AutoTokenizer

    docs = [f"Document {i} says something about the licence and its terms, number {i}." for i in range(20)]
    src = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    cleaning = {"minWords": 1}
    cfg = _config(
        tmp_path,
        model_dir,
        src,
        {"type": "Text"},
        seq=16,
        cleaning=cleaning,
        deduplication={"near": {"enabled": False}},
    )
    prepare_run(cfg)
    data_dir = Path(cfg.paths.data_dir)
    m = datacheck.read_manifest(data_dir)
    loaded = AutoTokenizer.from_pretrained(data_dir)
    assert (m.vocab_size, m.eos_id, m.pad_id, m.dtype) == (
        len(tok),
        tok.eos_token_id,
        tok.pad_token_id,
        "uint16",
    )
    assert loaded.get_vocab() == tok.get_vocab() and loaded.chat_template == tok.chat_template
    ids = np.concatenate(shards.load_split(data_dir, "train") + shards.load_split(data_dir, "val")).tolist()
    texts = tok.decode(ids).split(EOS)[:-1]
    assert sorted(texts) == sorted(docs), "documents tokenised with the model's tokenizer, each ended by EOS"
    assert m.record_format == "Text" and all(s.flags_file is None for s in m.splits["train"])
    # The tokenizer is part of the config hash: a different one rebuilds, the same one does not.
    assert prepare_run(cfg)["skipped"] is True
    other = testing_hf.tokenizer(tmp_path / "other", vocab_size=400)
    cfg2 = cfg.model_copy(deep=True)
    assert cfg2.spec.model.pretrained is not None
    cfg2.spec.model.pretrained.tokenizer = str(other)
    assert prepare_run(cfg2)["skipped"] is False
    assert datacheck.read_manifest(data_dir).vocab_size == 400


@pytest.fixture(scope="module")
def pc_data(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[TrainerConfig, DataManifest]:
    tmp = tmp_path_factory.mktemp("pc")
    rows, _ = _prompt_completion_rows()
    cfg = _config(tmp, model_dir, _jsonl(tmp / "pc.jsonl", rows), {"type": "PromptCompletion"}, seq=16)
    prepare_run(cfg)
    return cfg, datacheck.read_manifest(cfg.paths.data_dir)


def test_packed_batches_mask_prompts_and_record_boundaries(
    pc_data: tuple[TrainerConfig, DataManifest],
) -> None:
    cfg, m = pc_data
    windows = open_split(cfg.paths.data_dir, m, "train", 16, seed=3)
    assert isinstance(windows, Windows) and windows.flags is not None
    b = windows.batch(list(range(windows.count)))
    assert b.positions is not None
    flags = np.stack([windows.flags.read(w * 16, 17) for w in range(windows.count)])
    rows = np.stack([windows.sample(w) for w in range(windows.count)])
    target_flags = flags[:, 1:]
    has_loss = b.targets.numpy() != IGNORE
    # A loss exactly on completion/EOS targets, never on a target that starts a record.
    assert np.array_equal(
        has_loss, ((target_flags & LOSS_FLAG) != 0) & ((target_flags & RECORD_START_FLAG) == 0)
    )
    assert np.array_equal(b.targets.numpy()[has_loss], rows[:, 1:][has_loss])
    assert np.array_equal(b.inputs.numpy(), rows[:, :-1])
    # Positions restart at every record start and count up in between.
    starts = (flags[:, :-1] & RECORD_START_FLAG) != 0
    pos = b.positions.numpy()
    assert np.all(pos[starts] == 0)
    assert np.all(pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1)
    assert starts[:, 1:].any(), "the fixture packs several records into a window"


def test_padded_batches_are_one_record_per_row(pc_data: tuple[TrainerConfig, DataManifest], tok: Any) -> None:
    cfg, m = pc_data
    padded = m.model_copy(update={"packing": "Padded"})
    recs = open_split(cfg.paths.data_dir, padded, "train", 48, seed=3)  # long enough for any record
    assert isinstance(recs, Records) and recs.count == m.records("train") == 10
    b = recs.batch(list(range(recs.count)))
    assert b.positions is None
    for row in range(recs.count):
        start, end = int(recs.bounds[row]), int(recs.bounds[row + 1])
        ids = recs.stream.read(start, end - start)
        assert len(ids) <= 49
        n = len(ids) - 1
        assert b.inputs[row, :n].tolist() == ids[:-1].tolist()
        assert (b.inputs[row, n:] == m.pad_id).all() and (b.targets[row, n:] == IGNORE).all()
        loss = b.targets[row][b.targets[row] != IGNORE].tolist()
        assert tok.decode(loss).startswith(" It is") and tok.decode(ids.tolist()).startswith("Question")
        assert tok.decode(loss).endswith(EOS)
    # A record longer than sequenceLength + 1 is cut: rows of 8 hold 9 tokens at most.
    short = Records(recs.stream, recs.flags, 8, 3, m.pad_id).batch([0, 1])
    assert short.inputs.shape == (2, 8)
    # Padded counts records for the minimum-data checks.
    datacheck.require_records("train", padded.records("train"), 10, "test")
    with pytest.raises(DataError, match="11 that"):
        datacheck.require_records("train", padded.records("train"), 11, "test")


def test_supervised_loader_resumes_exactly(pc_data: tuple[TrainerConfig, DataManifest]) -> None:
    cfg, m = pc_data
    for packing in ("Packed", "Padded"):
        samples = open_split(
            cfg.paths.data_dir, m.model_copy(update={"packing": packing}), "train", 16, seed=5
        )
        loader = TrainLoader(samples, 1, 0, 1, Position())
        first = [loader.next() for _ in range(samples.count + 3)]  # into the second epoch
        state = loader.state()
        later = [loader.next() for _ in range(3)]
        loader.close()
        resumed = TrainLoader(samples, 1, 0, 1, Position(**state))
        again = [resumed.next() for _ in range(3)]
        resumed.close()
        for a, b in zip(later, again, strict=True):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert (a.positions is None) == (b.positions is None)
        assert len(validation_batches(samples, 2, 0, 1, 4)) >= 1
        assert first


def _loss(model: Any, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None) -> float:
    logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits.float()
    return float(
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
    )


def test_loss_ignores_prompt_labels_and_counts_completion_labels(
    pc_data: tuple[TrainerConfig, DataManifest], model_dir: Path, tok: Any
) -> None:
    from transformers import AutoModelForCausalLM

    cfg, m = pc_data
    windows = open_split(cfg.paths.data_dir, m, "train", 16, seed=3)
    assert isinstance(windows, Windows) and windows.flags is not None
    ids = [0, 1]
    rows = np.stack([windows.sample(w) for w in ids])
    flags = np.stack([windows.flags.read(w * 16, 17) for w in ids])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = packed_batch(rows, flags)
    with torch.no_grad():
        ref = _loss(model, base.inputs, base.targets, base.positions)
        # A label is the token at position t+1 seen as a target; the input stays as it was.
        prompt_t = next((r, t) for r in range(2) for t in range(16) if base.targets[r, t] == IGNORE)
        answer_t = next((r, t) for r in range(2) for t in range(16) if base.targets[r, t] != IGNORE)
        changed = {}
        for name, (r, t) in (("prompt", prompt_t), ("completion", answer_t)):
            labels = rows.copy()
            labels[r, t + 1] = (labels[r, t + 1] + 7) % len(tok)
            targets = packed_batch(labels, flags).targets
            changed[name] = _loss(model, base.inputs, targets, base.positions)
    print(
        f"masking proof: loss {ref:.6f}, prompt label changed {changed['prompt']:.6f}, "
        f"completion label changed {changed['completion']:.6f}"
    )
    assert changed["prompt"] == ref
    assert abs(changed["completion"] - ref) > 1e-4


def test_packed_record_loss_equals_record_alone(
    pc_data: tuple[TrainerConfig, DataManifest], model_dir: Path
) -> None:
    """Positions restarting per record make transformers attend within each record: a record's
    logits inside a packed window equal those of the record run on its own. Only without a KV cache
    (use_cache=False): with one, transformers ignores the packing and attends across records."""
    from transformers import AutoModelForCausalLM

    cfg, m = pc_data
    windows = open_split(cfg.paths.data_dir, m, "train", 96, seed=3)
    assert isinstance(windows, Windows) and windows.flags is not None
    rows, flags = windows.sample(0)[None], windows.flags.read(0, 97)[None]
    b = packed_batch(rows, flags)
    assert b.positions is not None
    starts = np.flatnonzero(b.positions[0].numpy() == 0)
    assert len(starts) >= 3
    a, e = int(starts[1]), int(starts[2])  # a whole record inside the window
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        packed = model(input_ids=b.inputs, position_ids=b.positions, use_cache=False).logits[0, a:e]
        alone = model(input_ids=b.inputs[:, a:e], use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5), float((packed - alone).abs().max())
    with torch.no_grad():
        leaky = model(input_ids=b.inputs, position_ids=b.positions).logits[0, a:e]
    assert not torch.allclose(leaky, alone, atol=1e-3), "the cache case differs (the test can fail)"


def test_classification_set_prepares_as_template(tmp_path: Path, model_dir: Path, tok: Any) -> None:
    train, test = testing_sft.write_classification(tmp_path / "cls", per_class=30)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert Counter(r["label"] for r in train_rows) == dict.fromkeys(testing_sft.LABELS.values(), 24)
    assert Counter(r["label"] for r in test_rows) == dict.fromkeys(testing_sft.LABELS.values(), 6)
    assert not {r["text"] for r in train_rows} & {r["text"] for r in test_rows}
    cfg = _config(tmp_path, model_dir, train, testing_sft.data_format(), seq=64)
    stats = prepare_run(cfg)
    assert stats["records"]["usable"] == len(train_rows) and stats["invalid_records"] == {}
    answers = Counter(_loss_text(tok, ids, fl) for ids, fl in _records(Path(cfg.paths.data_dir)))
    assert answers == {f" {label}{EOS}": 24 for label in testing_sft.LABELS.values()}
    # The scorer: the first word of the answer is compared with the label.
    assert testing_sft.accuracy(test_rows, lambda p: " library.") == pytest.approx(1 / 3)
    assert testing_sft.accuracy(test_rows, lambda p: "") == 0.0
