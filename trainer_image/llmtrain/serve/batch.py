"""The model state of the sequences being generated: rows of token ids -> rows of next-token logits.

Rows join and leave between decode steps (continuous batching at the granularity of one token). Two
ways to hold the rows, chosen per model (``spliceable``), behind one interface:

Spliced (one KV cache for all rows, left-padded; every forward pass is one batch):

- ``add`` prefills new prompts as one left-padded forward pass and splices their caches into the
  running batch: the shorter of the two caches is left-padded with zeros (masked out) so every row's
  newest token sits in the last column.
- ``advance`` runs one decode step: one new token per row, ``position_ids`` from each row's own token
  count, so padding never shifts a row's positions (rotary or absolute).
- ``keep`` drops finished rows and then the leading columns that are padding in every remaining row.

This needs a model that takes ``position_ids`` (padding would otherwise shift them) and a cache that is
a ``DynamicCache`` of plain ``[rows, heads, columns, head_dim]`` key/value tensors per layer, so rows
and columns can be cut and joined. Sliding-window layers qualify: the cache keeps every column and the
window is applied by the attention mask, counted in columns, which are each row's own contiguous tokens.

Per row (any other causal LM: no ``position_ids`` such as Bloom's ALiBi, recurrent or chunked-attention
layers, or a cache of another shape): each row keeps its own unpadded cache and every step runs one
forward pass per row. Rows still join and leave between steps, so no request waits for another to
finish, but a step costs one pass per row instead of one for all: correct for every model, not fast.

Inputs go to the model's device; ``logits`` is float32 on the CPU whatever the model's device and
dtype, so sampling never depends on where the model runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Attention kinds whose cache layers are plain per-column keys and values (the mask does the rest).
_SPLICEABLE_LAYERS = frozenset({"full_attention", "sliding_attention"})


def _forward_takes(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def spliceable(model: nn.Module) -> bool:
    """Whether ``model`` can share one left-padded cache across rows (see the module docstring)."""
    if not _forward_takes(model, "position_ids") or getattr(model, "_is_stateful", False):
        return False
    config: Any = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None else None
    if getattr(text, "attention_chunk_size", None) is not None:
        return False
    layer_types = getattr(text, "layer_types", None)
    return layer_types is None or set(layer_types) <= _SPLICEABLE_LAYERS


def _plain_cache(cache: Any, rows: int, columns: int) -> bool:
    """A DynamicCache whose every layer holds [rows, heads, columns, head_dim] keys and values."""
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache) or not cache.layers:
        return False
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, Tensor) or not isinstance(values, Tensor) or keys.dim() != 4:
            return False
        if keys.shape[0] != rows or keys.shape[2] != columns or values.shape[:3] != keys.shape[:3]:
            return False
    return True


@dataclass
class _Row:
    """One row of the per-row path: its own cache, no padding."""

    cache: Any
    length: int


class RunningBatch:
    def __init__(self, model: nn.Module, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = model_device(model)
        self.spliced = spliceable(model)
        """True: one left-padded cache for all rows; False: one cache and one pass per row."""
        self._logits_to_keep = _forward_takes(model, "logits_to_keep")
        self._clear()

    def _clear(self) -> None:
        self.cache: Any = None
        """Spliced: transformers DynamicCache of every row; None when empty."""
        self._rows: list[_Row] = []
        """Per row: each row's own cache."""
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        """Spliced: [rows, columns], 1 where a column holds a real token of that row."""
        self.lengths = torch.zeros(0, dtype=torch.long)
        """Real tokens per row: the position of the row's next token (on the CPU)."""
        self.logits = torch.zeros(0, 0)
        """[rows, vocab] float32 on the CPU: logits of each row's next token, not yet sampled."""

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def columns(self) -> int:
        """Cache columns: the longest row (per row) or the padded width (spliced)."""
        if not self.spliced:
            return max((r.length for r in self._rows), default=0)
        return int(self.mask.shape[1])

    def _last_logits(self, out: Any) -> Tensor:
        last: Tensor = out.logits[:, -1]
        return last.float().cpu()

    @torch.inference_mode()
    def add(self, prompts: list[list[int]]) -> None:
        """Prefill ``prompts`` (each non-empty) and append them as the last rows."""
        lengths = torch.tensor([len(p) for p in prompts])
        if not self.spliced:
            each = [self._add_row(p) for p in prompts]
            self.lengths = torch.cat([self.lengths, lengths])
            self.logits = torch.cat([self.logits.reshape(-1, each[0].shape[-1]), *each])
            return
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        from transformers import DynamicCache

        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(),
            use_cache=True,
            **extra,
        )
        if self.rows == 0 and not _plain_cache(out.past_key_values, len(prompts), width):
            # The architecture filled the cache some other way: it cannot be spliced, so this batch
            # runs per row from now on (only possible at the first add: later caches match the first).
            self.spliced = False
            self._clear()
            self.add(prompts)
            return
        logits = self._last_logits(out)
        if self.rows == 0:
            self.cache, self.mask, self.lengths, self.logits = out.past_key_values, mask, lengths, logits
            return
        columns = max(self.columns, width)
        self.cache = _cat_caches(self.cache, out.past_key_values, columns)
        self.mask = torch.cat([_left_pad(self.mask, columns), _left_pad(mask, columns)])
        self.lengths = torch.cat([self.lengths, lengths])
        self.logits = torch.cat([self.logits, logits])

    def _add_row(self, prompt: list[int]) -> Tensor:
        ids = torch.tensor([prompt], device=self.device)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **extra)
        self._rows.append(_Row(out.past_key_values, len(prompt)))
        return self._last_logits(out)

    @torch.inference_mode()
    def advance(self, tokens: list[int]) -> None:
        """Feed one token per row (in row order) and compute the logits that follow it."""
        assert len(tokens) == self.rows, (len(tokens), self.rows)
        if not self.spliced:
            self.logits = torch.cat(
                [self._advance_row(row, t) for row, t in zip(self._rows, tokens, strict=True)]
            )
            self.lengths = self.lengths + 1
            return
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            attention_mask=self.mask,
            position_ids=self.lengths.to(self.device)[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.lengths = self.lengths + 1
        self.logits = self._last_logits(out)

    def _advance_row(self, row: _Row, token: int) -> Tensor:
        out = self.model(
            input_ids=torch.tensor([[token]], device=self.device),
            attention_mask=torch.ones(1, row.length + 1, dtype=torch.long, device=self.device),
            past_key_values=row.cache,
            use_cache=True,
        )
        row.cache, row.length = out.past_key_values, row.length + 1
        return self._last_logits(out)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (ascending), then drop columns that are padding in all of them."""
        if len(rows) == self.rows:
            return
        if not rows:
            self._clear()
            return
        index = torch.tensor(rows)
        self.lengths, self.logits = self.lengths[index], self.logits[index]
        if not self.spliced:
            self._rows = [self._rows[i] for i in rows]
            return
        on_device = index.to(self.device)
        self.mask = self.mask[on_device]
        # Rows are left-padded, so the columns every row still needs are the last max(lengths).
        start = self.columns - int(self.lengths.max())
        self.mask = self.mask[:, start:]
        self.cache = _slice_cache(self.cache, on_device, start)


def _left_pad(t: Tensor, columns: int, dim: int = -1) -> Tensor:
    """Zeros on the left of ``dim`` up to ``columns``; dim -1 is the mask's, -2 the cache's seq axis."""
    missing = columns - t.shape[dim]
    if missing == 0:
        return t
    pad = (missing, 0) if dim == -1 else (0, 0, missing, 0)
    return F.pad(t, pad)


def _layers(cache: Any) -> list[tuple[Tensor, Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cat_caches(a: Any, b: Any, columns: int) -> Any:
    from transformers import DynamicCache

    return DynamicCache(
        [
            (
                torch.cat([_left_pad(ka, columns, -2), _left_pad(kb, columns, -2)]),
                torch.cat([_left_pad(va, columns, -2), _left_pad(vb, columns, -2)]),
            )
            for (ka, va), (kb, vb) in zip(_layers(a), _layers(b), strict=True)
        ]
    )


def _slice_cache(cache: Any, rows: Tensor, start: int) -> Any:
    from transformers import DynamicCache

    return DynamicCache([(k[rows, :, start:], v[rows, :, start:]) for k, v in _layers(cache)])
