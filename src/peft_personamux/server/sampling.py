"""Per-row decoding: each row of a batch has its own temperature, top-p, top-k, repetition penalty, seed and stops.

`pick_token` turns one row's logits into a token; `TextTracker` decodes a row's tokens incrementally and decides
what text may be sent to the client (never past a stop string, never half a UTF-8 character).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0  # end-of-turn tokens are held off until this many (benchmarks: equal lengths)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the prompt or the answer
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def pick_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    seen: torch.Tensor | None = None,
    banned: Sequence[int] = (),
) -> int:
    """One token from ``logits`` (vocab,): greedy at temperature 0, else sampled with top-k/top-p.

    ``seen`` are the ids the repetition penalty applies to (the CTRL paper's rule, as in transformers).
    """
    logits = logits.float().clone()  # (vocab,)
    if banned:
        logits[list(banned)] = float("-inf")
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits[logits < threshold] = float("-inf")
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        outside = probs.cumsum(-1) - probs > params.top_p  # the most likely token always stays
        logits[order[outside]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextTracker:
    """The text of a row's tokens so far, cut at the first stop string; ``take()`` returns the new sendable part."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            text, self.stopped = text[: min(hits)], True
        self.text = text

    def take(self, final: bool = False) -> str:
        """New text safe to send: at the end everything; before it, not what may start a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end = max(self.sent, end - self._hold)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # an unfinished multi-byte character
                end -= 1
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece
