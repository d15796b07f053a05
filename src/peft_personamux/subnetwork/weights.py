"""The paper's faithful masks: one bit per weight of every decoder Linear, applied to the weights reversibly.

For every Linear ``W`` (out, in), each output row keeps its ``floor(in * (1 - sparsity))`` weights of highest score
``|W[i, j]| * A[j]`` (Wanda) or, against an opposing persona, ``|W[i, j]| * phi(z_j)`` (Contrastive-Wanda). The LM
head is left dense: it is tied to the input embeddings in SmolLM2, and masking it would mask the vocabulary.
One persona at a time: `apply_weight_mask` swaps masked copies in and keeps the original tensors, so switching back
restores the very same tensors (bit-exact). Size: one bit per weight, 13.3 MB per persona for SmolLM2-135M.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..persona_files import PersonaFileError
from .config import SubnetworkConfig
from .files import WEIGHT_FORMAT, model_fingerprint, read_mask_file, write_mask_file
from .scores import contrast_weight, contrast_z, contrastive_scores, row_topk_mask, wanda_scores
from .statistics import ActivationStatistics, decoder_linears, unwrap_model

logger = logging.getLogger(__name__)


@dataclass
class WeightMask:
    """One persona's unstructured mask: module name -> (out, in) bool, True keeps the weight."""

    name: str
    masks: dict[str, torch.Tensor]
    fingerprint: str
    metadata: dict[str, str] = field(default_factory=dict)
    statistics: ActivationStatistics | None = field(default=None, repr=False)  # not saved

    @property
    def num_bits(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def packed_bytes(self) -> int:
        """Bytes of mask bits on disk (the file adds a safetensors header)."""
        return sum((m.numel() + 7) // 8 for m in self.masks.values())

    def save(self, path: str | os.PathLike) -> str:
        return write_mask_file(os.fspath(path), "weight", self.name, self.masks, self.fingerprint, self.metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model, strict: bool = True) -> WeightMask:
        """Read a weight mask file for ``model``; every masked Linear must exist with the stored shape."""
        linears = decoder_linears(model)
        path = os.fspath(path)
        keys: list[str] = []
        if os.path.isfile(path):  # a missing file: read_mask_file words the error
            try:
                with safe_open(path, framework="pt") as f:
                    if (f.metadata() or {}).get("format") == WEIGHT_FORMAT:  # else read_mask_file names the format
                        keys = list(f.keys())
            except Exception as err:
                raise PersonaFileError(f"{path} is not a readable safetensors mask file: {err}") from err
        unknown = [k for k in keys if k not in linears]
        if unknown:
            raise PersonaFileError(f"{path}: masks for Linear layers this model does not have: {unknown[:3]}.")
        shapes = {k: tuple(linears[k].weight.shape) for k in keys}
        fingerprint = model_fingerprint(model) if strict else None
        name, masks, metadata = read_mask_file(path, "weight", fingerprint, shapes)
        return cls(name, masks, metadata["model_fingerprint"], metadata)


def build_weight_mask(
    model,
    name: str,
    statistics: ActivationStatistics,
    config: SubnetworkConfig,
    contrast: ActivationStatistics | None = None,
    progress: bool = False,
) -> WeightMask:
    """Per-row top-(1 - sparsity) Wanda (or Contrastive-Wanda, with ``contrast``) mask of every decoder Linear."""
    masks: dict[str, torch.Tensor] = {}
    linears = decoder_linears(model, mlp_only=config.mlp_only)
    for module_name, module in tqdm(linears.items(), desc="weight masks", disable=not progress, unit="layer"):
        if module_name not in statistics.sums:
            raise ValueError(f"No calibration statistics for {module_name!r}: calibrate on this model first.")
        mean = statistics.mean(module_name)
        scores = wanda_scores(module.weight, mean)  # (out, in)
        if contrast is not None:
            z = contrast_z(mean, statistics.var(module_name), contrast.mean(module_name), contrast.var(module_name))
            scores = contrastive_scores(module.weight, contrast_weight(z, config.contrast, config.tau), scores)
        masks[module_name] = row_topk_mask(scores, config.sparsity).cpu()
    metadata = {**config.to_metadata(), "samples": str(statistics.count), "contrastive": str(contrast is not None)}
    return WeightMask(name, masks, model_fingerprint(model), metadata, statistics)


class AppliedWeightMask(contextlib.AbstractContextManager):
    """A weight mask in effect on a model; `restore` (or leaving the ``with`` block) puts the originals back."""

    def __init__(self, model, mask: WeightMask) -> None:
        self._model = unwrap_model(model)
        self.name = mask.name
        self._originals: dict[nn.Linear, torch.Tensor] = {}
        linears = decoder_linears(self._model)
        missing = [k for k in mask.masks if k not in linears]
        if missing:
            raise ValueError(f"Weight mask {mask.name!r} names Linear layers this model lacks: {missing[:3]}.")
        for key, bits in mask.masks.items():
            module = linears[key]
            if tuple(bits.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"Weight mask {mask.name!r}: {key} has shape {tuple(bits.shape)}, the weight "
                    f"{tuple(module.weight.shape)}."
                )
        with torch.no_grad():
            for key, bits in mask.masks.items():
                module = linears[key]
                original = module.weight.data
                self._originals[module] = original  # the tensor itself: restoring is exact
                module.weight.data = original * bits.to(original.device, original.dtype)

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def restore(self) -> None:
        """Put the original weight tensors back (idempotent)."""
        for module, original in self._originals.items():
            module.weight.data = original
        self._originals.clear()
        if _ACTIVE.get(self._model) is self:
            del _ACTIVE[self._model]

    def __exit__(self, *exc) -> None:
        self.restore()


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, AppliedWeightMask] = weakref.WeakKeyDictionary()


def apply_weight_mask(model, mask: WeightMask, strict: bool = True) -> AppliedWeightMask:
    """Mask ``model``'s weights with ``mask`` until ``restore()`` (or the end of a ``with`` block).

    A mask already in effect on the model is restored first, so switching personas is one call. ``strict``
    refuses a mask calibrated on another model (fingerprint).
    """
    base = unwrap_model(model)
    previous = _ACTIVE.get(base)
    if previous is not None:
        previous.restore()
    if strict and mask.fingerprint != model_fingerprint(base):
        raise PersonaFileError(
            f"The weight mask of {mask.name!r} was calibrated on model {mask.fingerprint!r}, but this model is "
            f"{model_fingerprint(base)!r}. Calibrate the persona again on this model."
        )
    applied = AppliedWeightMask(base, mask)
    _ACTIVE[base] = applied
    return applied


def active_weight_mask(model) -> str | None:
    """Name of the weight mask in effect on ``model``, or None."""
    applied = _ACTIVE.get(unwrap_model(model))
    return applied.name if applied is not None and applied.active else None
