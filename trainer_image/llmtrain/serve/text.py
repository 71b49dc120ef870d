"""Generated token ids -> text deltas, with OpenAI stop sequences.

Byte-level BPE tokens can end in the middle of a UTF-8 character (decoded as U+FFFD until the rest
arrives), and a stop sequence can arrive split over several tokens. So a delta only releases text
that can no longer change: it holds back a trailing U+FFFD and the longest tail that could still
grow into a stop sequence. The final text is cut before the first stop sequence, which is never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmtrain.serve.logprobs import TokenLogprob

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Delta:
    """New text of one sequence; ``finish_reason`` ("stop" or "length") on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """Entries of the tokens sampled since the last delta (only when the request asked for logprobs)."""


class TextAssembler:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stop = stop
        self._ids: list[int] = []
        self._text = ""
        self.sent = 0
        """Characters of the text already released."""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; returns the text that became final. Sets ``stopped`` on a stop sequence."""
        assert not self.stopped, "no tokens after a stop sequence"
        self._ids.append(token_id)
        self._text = self._decode(self._ids)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            self._text = self._text[:cut]
            return self._release(cut)
        safe = len(self._text) - self._held_back()
        return self._release(safe)

    def flush(self) -> str:
        """The rest of the text, when generation ends for another reason (length, end of text)."""
        return self._release(len(self._text))

    @property
    def text(self) -> str:
        return self._text

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self._text[self.sent : upto]
        self.sent = upto
        return delta

    def _first_stop(self) -> int | None:
        # Released text never holds a stop's beginning (it was held back), so search only the rest.
        found = [i for i in (self._text.find(s, self.sent) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        tail = self._text[self.sent :]
        if tail.endswith(REPLACEMENT):
            return len(tail) - len(tail.rstrip(REPLACEMENT)) + self._stop_prefix(tail.rstrip(REPLACEMENT))
        return self._stop_prefix(tail)

    def _stop_prefix(self, tail: str) -> int:
        """Length of the longest suffix of ``tail`` that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:n]):
                    best = n
                    break
        return best
