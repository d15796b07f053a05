"""Training order: persona-grouped and length-grouped batches for stage 1.

In stage 1 each mixture row gets gradient only from its own persona's lines (paper, "Training"). With batches of
random lines a row is touched about once per ``num_personas / batch_size`` steps; grouping a few personas per
batch gives each touched row several lines per step. Grouping lines of similar length cuts padding, which the
2-core CPU otherwise spends on tokens that carry no loss.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PersonaBatchSampler(Sampler[int]):
    """Indices in an order whose consecutive runs of ``batch_size`` form the batches.

    ``personas_per_batch``: each batch holds lines of this many personas (``batch_size // personas_per_batch``
    lines each); None mixes personas at random. ``lengths``: when given, lines of similar length are batched
    together (blocks sorted by length within windows of ``window`` batches). Batch order is shuffled with
    ``seed + epoch``; ``set_epoch`` (called by the Trainer) makes a resumed run replay the same order.
    """

    def __init__(
        self,
        personas: Sequence[str],
        batch_size: int,
        personas_per_batch: int | None = None,
        lengths: Sequence[int] | None = None,
        seed: int = 0,
        window: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if personas_per_batch is not None and not 1 <= personas_per_batch <= batch_size:
            raise ValueError(
                f"`personas_per_batch` must be between 1 and the batch size {batch_size}, got {personas_per_batch!r}."
            )
        if lengths is not None and len(lengths) != len(personas):
            raise ValueError(f"Got {len(lengths)} lengths for {len(personas)} rows.")
        self.personas = list(personas)
        self.batch_size = batch_size
        self.personas_per_batch = personas_per_batch
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.seed = seed
        self.window = window
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.personas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _blocks(self, rng: np.random.Generator) -> list[list[int]]:
        """Runs of indices that go into one batch together (one persona's lines, or single lines)."""
        if self.personas_per_batch is None:
            return [[int(i)] for i in rng.permutation(len(self.personas))]
        per_block = max(1, self.batch_size // self.personas_per_batch)
        by_persona: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(self.personas):
            by_persona[name].append(index)
        blocks = []
        for name in sorted(by_persona):
            indices = np.array(by_persona[name])[rng.permutation(len(by_persona[name]))]
            if self.lengths is not None:
                indices = indices[np.argsort(self.lengths[indices], kind="stable")]
            blocks += [indices[i : i + per_block].tolist() for i in range(0, len(indices), per_block)]
        return [blocks[i] for i in rng.permutation(len(blocks))]

    def _batches(self, rng: np.random.Generator) -> list[list[int]]:
        blocks = self._blocks(rng)
        if self.lengths is not None:  # sort blocks by length within windows, so batches are of similar length
            span = self.window * max(1, self.personas_per_batch or self.batch_size)
            windows = [blocks[i : i + span] for i in range(0, len(blocks), span)]
            blocks = [b for w in windows for b in sorted(w, key=lambda b: float(self.lengths[b].mean()))]
        batches, current = [], []
        for block in blocks:
            for index in block:
                current.append(index)
                if len(current) == self.batch_size:
                    batches.append(current)
                    current = []
        if current:
            batches.append(current)
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for batch in self._batches(rng):
            yield from batch


def row_lengths(dataset) -> list[int]:
    """A cheap length of each row (characters of prompt and response), for length grouping."""
    return [len(p or "") + len(r or "") for p, r in zip(dataset["prompt"], dataset["response"])]
