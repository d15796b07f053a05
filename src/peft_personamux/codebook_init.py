"""A data-driven codebook start: the principal directions in which personas pull the soft prompt.

At the zero mixture (after the bias warm-up) every persona's lines have a gradient with respect to the 8 mixed
tokens, ``g_i`` (tokens_per_code x hidden). A codebook spanned by random noise captures about
``num_codes / (tokens_per_code * hidden)`` of that gradient's energy (1.4% for SmolLM2); the top principal
directions of the centred ``g_i`` capture as much as the data allows, so the very first joint steps already move
each persona's mixture along directions that matter to it. The codes come out orthogonal and of equal norm
(normalised codes), scaled to the norm of the codebook they replace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .contrast import CODE_SCALES
from .loss import FAST, LossOptions
from .prompt_gradients import persona_prompt_gradients
from .tuner.model import as_tuner

logger = logging.getLogger(__name__)

GRADIENT_CODEBOOKS = ("pca", "contrast")  # principal directions here, or `contrast.contrast_codebook`


@dataclass
class GradientInit:
    """What `init_codebook_from_gradients` did: explained energy of the kept directions and passes spent."""

    personas: int
    example_passes: int
    explained: float  # share of the centred gradients' energy in the kept directions
    explained_random: float  # the same share for a random codebook of the same size (expected)


@torch.no_grad()
def codebook_from_gradients(
    gradients: Mapping[int, torch.Tensor],
    num_codes: int,
    code_norm: float,
    seed: int | None = None,
    scale: str = "equal",
) -> tuple[torch.Tensor, float]:
    """Codebook (num_codes, tokens_per_code, hidden) from the top principal directions of centred gradients.

    Returns the codebook and the share of the centred gradients' energy its span holds. With fewer personas than
    codes, the remaining codes are random directions orthogonal to the data's (drawn with ``seed`` when given, so
    that the same gradients always give the same codebook); so are directions of (numerically) zero variance.
    ``scale``: ``"equal"`` gives every code the norm ``code_norm``; ``"whiten"`` makes code c's norm proportional
    to ``1 / singular_c`` (mean norm ``code_norm``), so that a unit of mixture moves the loss about equally along
    every code: the top directions are the steepest, and at equal norms a first optimiser step along them
    overshoots.
    """
    if scale not in CODE_SCALES:
        raise ValueError(f"`scale` must be one of {CODE_SCALES}, got {scale!r}.")
    stacked = torch.stack([g.flatten() for g in gradients.values()])  # (personas, tokens_per_code * hidden)
    shape = next(iter(gradients.values())).shape
    centred = stacked - stacked.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(P, D), D)
    rank = int((singular > singular[0] * 1e-6).sum())  # centring removes a dimension: the last row is noise
    keep = min(num_codes, rank)
    directions = vh[:keep]
    explained = float((singular[:keep] ** 2).sum() / (singular**2).sum().clamp(min=1e-30))
    if keep < num_codes:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        extra = torch.randn(num_codes - keep, directions.shape[1], dtype=directions.dtype, generator=generator)
        extra -= extra @ directions.T @ directions
        directions = torch.cat([directions, torch.linalg.qr(extra.T).Q.T])
    norms = torch.ones(num_codes, dtype=directions.dtype)  # (num_codes,)
    if scale == "whiten":
        inverse = 1.0 / singular[:keep].clamp(min=singular[0] * 1e-2)  # bounded: at most 100x apart
        norms = torch.cat([inverse, inverse.max().expand(num_codes - keep)])  # random codes: the flattest's norm
        norms = norms / norms.mean()
    return (directions * norms[:, None] * code_norm).reshape(num_codes, *shape), explained


def init_codebook_from_gradients(
    model,
    batches: Sequence[Mapping[str, torch.Tensor]],
    options: LossOptions = FAST,
    progress: bool = True,
    scale: str = "equal",
) -> GradientInit:
    """Replace W by the principal directions of per-persona gradients at the zero mixture; mixtures stay as they are.

    The codes keep the mean norm of the codebook they replace, so the soft prompt's scale is unchanged; ``scale``
    as in `codebook_from_gradients`.
    """
    tuner = as_tuner(model)
    layer, adapter = tuner.personamux_layer, tuner.current_adapter
    codebook = layer.personamux_codebook[adapter]
    passes = sum(int(b["input_ids"].shape[0]) for b in batches)
    gradients = persona_prompt_gradients(model, batches, options, progress)
    if len(gradients) < 2:
        raise ValueError(f"A gradient codebook needs at least 2 personas, got {len(gradients)}.")
    code_norm = float(codebook.detach().float().flatten(1).norm(dim=1).mean())
    new, explained = codebook_from_gradients(gradients, codebook.shape[0], code_norm, scale=scale)
    with torch.no_grad():
        codebook.copy_(new.to(codebook.device, codebook.dtype))
    random_share = min(1.0, codebook.shape[0] / new[0].numel())
    logger.info(
        "Gradient codebook from %d personas (%d passes): the codes hold %.1f%% of the persona gradients' variance "
        "(a random codebook: %.1f%%).",
        len(gradients),
        passes,
        100 * explained,
        100 * random_share,
    )
    return GradientInit(len(gradients), passes, explained, random_share)
