"""Training components in isolation: schedules, sparsity, the shard loader, throughput arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmop_contract.api.v1alpha1.model import ModelSpec
from llmop_contract.api.v1alpha1.training import LearningRateSchedule, Sparsity, TrainingSpec
from llmtrain.adapt import llama_args
from llmtrain.config import DataError
from llmtrain.model import build_model
from llmtrain.testing import license_documents, write_shards
from llmtrain.train import sparsity
from llmtrain.train.data import (
    Position,
    TokenStream,
    TrainLoader,
    Windows,
    read_manifest,
    split_files,
    validation_batches,
)
from llmtrain.train.metrics import flops_per_token
from llmtrain.train.schedule import learning_rate, total_steps


@pytest.fixture(scope="module")
def windows(tmp_path_factory: pytest.TempPathFactory) -> Windows:
    # Small shards so windows straddle shard boundaries.
    root = write_shards(tmp_path_factory.mktemp("data"), license_documents()[:120], tokens_per_shard=5000)
    m = read_manifest(root)
    assert len(split_files(root, m, "train")) > 2
    return Windows(TokenStream(split_files(root, m, "train"), m.dtype), seq_len=32, seed=11)


def test_schedule_shapes() -> None:
    cos = LearningRateSchedule.model_validate(
        {"type": "Cosine", "warmupSteps": 10, "minLearningRateRatio": 0.1}
    )
    assert learning_rate(0, 100, 1.0, cos) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, cos) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, cos) == pytest.approx(0.55)  # half way: mean of peak and floor
    assert learning_rate(100, 100, 1.0, cos) == pytest.approx(0.1)
    lin = LearningRateSchedule.model_validate(
        {"type": "Linear", "warmupSteps": 0, "minLearningRateRatio": 0.0}
    )
    assert learning_rate(25, 100, 2.0, lin) == pytest.approx(1.5)
    const = LearningRateSchedule.model_validate({"type": "Constant", "warmupSteps": 4})
    assert learning_rate(1, 100, 1.0, const) == pytest.approx(0.5)
    assert learning_rate(90, 100, 1.0, const) == 1.0


def test_max_tokens_converts_to_steps() -> None:
    t = TrainingSpec(max_tokens=10_000, sequence_length=64, micro_batch_size=2, global_batch_size=8)
    assert total_steps(t) == 20  # ceil(10000 / (8 * 64))
    assert total_steps(TrainingSpec(max_steps=7)) == 7


def test_cubic_sparsity_schedule_and_masks() -> None:
    sp = Sparsity(enabled=True, target_sparsity=0.5, start_step=10, end_step=30, frequency=5)
    assert sparsity.target_sparsity(10, sp) == 0.0
    assert sparsity.target_sparsity(20, sp) == pytest.approx(0.5 * (1 - 0.5**3))
    assert sparsity.target_sparsity(40, sp) == 0.5
    assert [s for s in range(45) if sparsity.due(s, sp)] == [10, 15, 20, 25, 30]

    spec = ModelSpec(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96, vocab_size=512)
    model = build_model(llama_args(spec), seed=0, sparse=True)
    before = {id(m): m.weight.detach().clone() for m in sparsity.prunable(model)}
    sparsity.update_masks(model, 0.3, zero3=False)
    assert sparsity.measured_sparsity(model) == pytest.approx(0.3, abs=1e-3)
    for layer in sparsity.prunable(model):
        assert layer.mask is not None
        kept = before[id(layer)].abs()[layer.mask.bool()]
        dropped = before[id(layer)].abs()[~layer.mask.bool()]
        assert kept.min() >= dropped.max()  # magnitude pruning keeps the largest weights
    old_masks = [m.mask.clone() for m in sparsity.prunable(model) if m.mask is not None]
    sparsity.update_masks(model, 0.6, zero3=False)
    for old, layer in zip(old_masks, sparsity.prunable(model), strict=True):
        assert layer.mask is not None and bool((layer.mask <= old).all())  # pruned stays pruned


def collect(loader: TrainLoader, n: int) -> list[torch.Tensor]:
    try:
        return [loader.next()[0] for _ in range(n)]
    finally:
        loader.close()


def test_loader_windows_targets_and_rank_striding(windows: Windows) -> None:
    x, y = TrainLoader(windows, 4, 0, 1, Position()).next()
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    single = collect(TrainLoader(windows, 4, 0, 1, Position()), 6)
    ranks = [collect(TrainLoader(windows, 2, r, 2, Position()), 6) for r in (0, 1)]
    # World of two with micro-batch 2 sees the same global samples as one process with micro-batch 4.
    seen_single = {tuple(row.tolist()) for b in single for row in b}
    seen_ranks = {tuple(row.tolist()) for r in ranks for b in r for row in b}
    assert seen_single == seen_ranks
    assert not {tuple(row.tolist()) for b in ranks[0] for row in b} & {
        tuple(row.tolist()) for b in ranks[1] for row in b
    }


def test_loader_resumes_exactly_and_drops_the_ragged_tail(windows: Windows) -> None:
    loader = TrainLoader(windows, 3, 0, 1, Position())
    per_epoch = loader.per_epoch
    stream = collect(loader, per_epoch + 5)
    # Resume from every position of interest: the prefetch thread must not skip or repeat anything.
    for k in (1, 7, per_epoch - 1, per_epoch + 2):
        pos = Position(k // per_epoch, k % per_epoch)
        resumed = collect(TrainLoader(windows, 3, 0, 1, pos), 3)
        for a, b in zip(stream[k : k + 3], resumed, strict=True):
            assert torch.equal(a, b)
    # The ragged tail is dropped: an epoch of 3-window batches is distinct windows, all of them but
    # fewer than 3 ...
    first = rows(stream[:per_epoch])
    assert len(set(first)) == len(first) == 3 * per_epoch and windows.count - len(first) < 3
    assert set(first) <= set(all_windows(windows))
    # ... and the next batch starts the next epoch's order, the same order whatever the batch size.
    pairs = TrainLoader(windows, 2, 0, 1, Position())
    by_two = collect(pairs, 2 * pairs.per_epoch)
    assert rows(stream[per_epoch : per_epoch + 1])[0] == rows(by_two[pairs.per_epoch :])[0]


def rows(batches: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for batch in batches for row in batch]


def all_windows(windows: Windows) -> list[tuple[int, ...]]:
    """Every window's inputs in file order, read directly from the token stream."""
    return [
        tuple(windows.stream.read(i * windows.seq_len, windows.seq_len).tolist())
        for i in range(windows.count)
    ]


def test_each_epoch_visits_every_window_once_in_a_new_order(windows: Windows) -> None:
    assert len(set(all_windows(windows))) == windows.count, "the fixture's windows are all different"
    loader = TrainLoader(windows, 2, 0, 1, Position())
    per_epoch = loader.per_epoch
    assert per_epoch * 2 == windows.count, "batches of 2 cover every window of the fixture"
    stream = collect(loader, 3 * per_epoch)
    epochs = [rows(stream[e * per_epoch : (e + 1) * per_epoch]) for e in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(all_windows(windows))  # a permutation of all the windows
    assert epochs[0] != all_windows(windows), "shuffled, not file order"
    assert len({tuple(order) for order in epochs}) == 3, "every epoch has its own order"
    # The order is a function of the seed: the same seed gives it again, another seed another one.
    again = rows(collect(TrainLoader(windows, 2, 0, 1, Position()), per_epoch))
    assert again == epochs[0], "the same seed, the same order"
    reseeded = Windows(windows.stream, windows.seq_len, seed=windows.seed + 100)
    other = rows(collect(TrainLoader(reseeded, 2, 0, 1, Position()), per_epoch))
    assert other != epochs[0], "another seed, another order"


def test_loader_position_tracks_consumed_batches(windows: Windows) -> None:
    loader = TrainLoader(windows, 2, 0, 1, Position(), prefetch=4)
    for _ in range(3):
        loader.next()
    assert loader.state() == {"epoch": 0, "batch": 3}
    loader.close()


def test_validation_batches_fixed_and_wrap(windows: Windows) -> None:
    # File order, rank-strided: global batch b of 2 ranks x 2 is windows 4b..4b+3, rank r takes 4b+r, 4b+2+r.
    every = all_windows(windows)
    for rank in (0, 1):
        got = validation_batches(windows, 2, rank, 2, max_batches=3)
        assert rows([x for x, _ in got]) == [every[4 * b + k * 2 + rank] for b in range(3) for k in range(2)]
        assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in got)
    # A split smaller than one global batch wraps around, so both ranks still get a full batch.
    huge = validation_batches(windows, windows.count, 1, 2, max_batches=5)
    assert len(huge) == 1
    assert rows([huge[0][0]]) == [every[(2 * k + 1) % windows.count] for k in range(windows.count)]


def test_palm_flops_per_token() -> None:
    spec = ModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, vocab_size=512)
    assert flops_per_token(llama_args(spec), 32) == 6 * spec.num_parameters() + 12 * 2 * 4 * 16 * 32


def test_manifest_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="llmtrain prepare"):
        read_manifest(tmp_path)
