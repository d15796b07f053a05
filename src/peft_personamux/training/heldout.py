"""Held-out loss of personas (mean token loss of their responses), as both stages and the CLI report it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from ..collator import PersonaMuxCollator
from ..loss import PrefixCache, response_nll
from ..prompting import DEFAULT_INSTRUCTION


@torch.no_grad()
def evaluate_loss(
    model,
    tokenizer,
    dataset,
    persona_names: Sequence[str] | None = None,
    bias_scale: float = 1.0,
    batch_size: int = 16,
    text_personas: Mapping[str, str] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = 256,
    max_response_tokens: int | None = 128,
) -> dict[str, float]:
    """Mean token loss on the responses of each persona (token-weighted over its rows), without gradients.

    ``persona_names=None`` evaluates every persona in ``dataset``; each must be registered in ``model``.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    column = list(dataset["persona"])
    wanted = set(column) if persona_names is None else set(persona_names)
    missing = sorted(wanted - set(column))
    if missing:
        raise ValueError(f"Personas {missing[:5]} have no rows in the evaluation dataset.")
    indices = [i for i, name in enumerate(column) if name in wanted]
    cache = PrefixCache()
    collator = PersonaMuxCollator.for_model(
        model,
        tokenizer,
        text_personas=text_personas,
        instruction=instruction,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )
    device = next(p.device for p in model.parameters())
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            rows = [dataset[i] for i in indices[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            nll, tokens = response_nll(model, batch, bias_scale=bias_scale, prefix_cache=cache)  # (rows,), (rows,)
            for feature, row_nll, row_tokens in zip(rows, nll.tolist(), tokens.tolist()):
                sums[feature["persona"]] += row_nll
                counts[feature["persona"]] += row_tokens
    finally:
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in sorted(sums) if counts[name]}
