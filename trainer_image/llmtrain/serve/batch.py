"""The model state of the sequences being generated: one KV cache for all rows, left-padded.

Rows join and leave between decode steps (continuous batching at the granularity of one token):

- ``add`` prefills new prompts as one left-padded forward pass and splices their caches into the
  running batch: the shorter of the two caches is left-padded with zeros (masked out) so every row's
  newest token sits in the last column.
- ``advance`` runs one decode step: one new token per row, ``position_ids`` from each row's own token
  count, so padding never shifts a row's rotary positions.
- ``keep`` drops finished rows and then the leading columns that are padding in every remaining row.

Nothing here knows about requests or text: it maps rows of token ids to rows of next-token logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RunningBatch:
    def __init__(self, model: nn.Module, pad_id: int) -> None:
        self.model = model
        self.pad_id = pad_id
        self._clear()

    def _clear(self) -> None:
        self.cache: Any = None
        """transformers DynamicCache of every row; None when empty."""
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        """[rows, columns]: 1 where a column holds a real token of that row."""
        self.lengths = torch.zeros(0, dtype=torch.long)
        """Real tokens per row: the position of the row's next token."""
        self.logits = torch.zeros(0, 0)
        """[rows, vocab]: logits of each row's next token, not yet sampled."""

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    @torch.inference_mode()
    def add(self, prompts: list[list[int]]) -> None:
        """Prefill ``prompts`` (each non-empty) and append them as the last rows."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=_new_cache(),
            use_cache=True,
            logits_to_keep=1,
        )
        lengths = torch.tensor([len(p) for p in prompts])
        logits = out.logits[:, -1].float()
        if self.rows == 0:
            self.cache, self.mask, self.lengths, self.logits = out.past_key_values, mask, lengths, logits
            return
        columns = max(self.columns, width)
        self.cache = _cat_caches(self.cache, out.past_key_values, columns)
        self.mask = torch.cat([_left_pad(self.mask, columns), _left_pad(mask, columns)])
        self.lengths = torch.cat([self.lengths, lengths])
        self.logits = torch.cat([self.logits, logits])

    @torch.inference_mode()
    def advance(self, tokens: list[int]) -> None:
        """Feed one token per row (in row order) and compute the logits that follow it."""
        assert len(tokens) == self.rows, (len(tokens), self.rows)
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=self.mask.dtype)], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens)[:, None],
            attention_mask=self.mask,
            position_ids=self.lengths[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.lengths = self.lengths + 1
        self.logits = out.logits[:, -1].float()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (ascending), then drop columns that are padding in all of them."""
        if len(rows) == self.rows:
            return
        if not rows:
            self._clear()
            return
        index = torch.tensor(rows)
        self.mask, self.lengths, self.logits = self.mask[index], self.lengths[index], self.logits[index]
        # Rows are left-padded, so the columns every row still needs are the last max(lengths).
        start = self.columns - int(self.lengths.max())
        self.mask = self.mask[:, start:]
        self.cache = _slice_cache(self.cache, index, start)


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


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
