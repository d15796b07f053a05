"""Scores and masks as pure functions of weights and activation statistics (no model, no hooks).

Wanda (Sun et al. 2023) scores a weight by ``|W[i, j]| * A[j]``; the paper keeps, in every output row, the top
``(1 - sparsity)`` fraction of weights by that score. Channel masks score an input channel by the sum of its column,
``A[j] * sum_i |W[i, j]|`` (structured Wanda, as FLAP / Wanda-sp), and a head by the sum over its channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Contrast

CONTRAST_EPS = 1e-6  # authors' epsilon under the square root of the pooled variance
_TIE_BREAK = 1e-6  # weight of the plain score that orders channels the contrastive score ties (ReLU zeros)


def kept_count(size: int, sparsity: float) -> int:
    """Entries kept of ``size``: ``floor(size * (1 - sparsity))`` as in the authors' code, at least one."""
    return max(1, int(size * (1.0 - sparsity)))


def wanda_scores(weight: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``|W| * A`` broadcast over rows: weight (out, in), activation (in,) -> (out, in) float32."""
    if activation.shape != (weight.shape[1],):
        raise ValueError(
            f"Activation statistic has shape {tuple(activation.shape)}, but the weight has {weight.shape[1]} inputs."
        )
    return weight.detach().float().abs() * activation.float().to(weight.device).unsqueeze(0)


def contrast_z(
    mean: torch.Tensor, var: torch.Tensor, other_mean: torch.Tensor, other_var: torch.Tensor
) -> torch.Tensor:
    """Standardised difference of two personas' channel means: ``(mu - mu') / sqrt(var + var' + eps)``, (in,)."""
    return (mean - other_mean) / torch.sqrt(var + other_var + CONTRAST_EPS)


def contrast_weight(z: torch.Tensor, contrast: Contrast, tau: float) -> torch.Tensor:
    """``phi(z)``: ReLU (authors' default) or ``softplus(z / tau)``."""
    return F.relu(z) if contrast == Contrast.RELU else F.softplus(z / tau)


def contrastive_scores(weight: torch.Tensor, phi: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Contrastive-Wanda ``|W| * phi(z)``, (out, in), with ties (ReLU zeros) broken by the plain Wanda score."""
    score = weight.detach().float().abs() * phi.float().to(weight.device).unsqueeze(0)  # (out, in)
    return score + _TIE_BREAK * score.amax().clamp_min(1e-30) * plain / plain.amax().clamp_min(1e-30)


def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, True for the ``kept_count(in, sparsity)`` highest scores: (out, in) -> (out, in) bool."""
    keep = kept_count(scores.shape[1], sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, scores.topk(keep, dim=1).indices, True)


def column_scores(weight: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Structured Wanda: ``A[j] * sum_i |W[i, j]|`` per input channel, (in,)."""
    return wanda_scores(weight, activation).sum(0)


def group_scores(channel_scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of channel scores over ``groups`` equal consecutive groups (attention heads): (in,) -> (groups,)."""
    if channel_scores.numel() % groups:
        raise ValueError(f"{channel_scores.numel()} channels do not split into {groups} equal heads.")
    return channel_scores.reshape(groups, -1).sum(1)


def topk_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the ``kept_count(n, sparsity)`` highest of ``scores`` (n,) -> (n,) bool."""
    keep = kept_count(scores.numel(), sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(0, scores.topk(keep).indices, True)
