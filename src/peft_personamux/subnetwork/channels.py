"""Servable channel masks: MLP neurons (inputs of ``down_proj``) and attention heads (inputs of ``o_proj``).

Zeroing input channel ``j`` of a Linear equals zeroing column ``j`` of its weight, so a mask over channels is an
activation mask, and every batch row can carry its own: a forward pre-hook multiplies the Linear's input by the row's
mask. `SubnetworkBank.apply` registers those hooks for one call and removes them in ``finally`` (as peft's Poly
passes task ids), so the model is never modified. Channels are chosen by the same Wanda scores as the weight masks,
summed over each column (structured Wanda); this granularity is ours, not validated by the paper.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..persona_files import PersonaFileError, validate_persona_name
from .config import SubnetworkConfig
from .files import model_fingerprint, read_mask_file, write_mask_file
from .scores import column_scores, contrast_weight, contrast_z, contrastive_scores, group_scores, topk_keep
from .statistics import ActivationStatistics, unwrap_model

PersonaRows = str | None | Sequence[str | None] | torch.Tensor


@dataclass
class ChannelLayout:
    """Where the channel masks act in one model: per decoder layer its ``down_proj`` and ``o_proj``."""

    down: list[tuple[str, nn.Linear]]  # (module name, module) per layer
    out: list[tuple[str, nn.Linear]]
    num_heads: int

    @classmethod
    def of(cls, model) -> ChannelLayout:
        base = unwrap_model(model)
        linears = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.Linear)]
        down = [(n, m) for n, m in linears if n.endswith("mlp.down_proj")]
        out = [(n, m) for n, m in linears if n.endswith("self_attn.o_proj")]
        num_heads = getattr(base.config, "num_attention_heads", None)
        if not down or len(down) != len(out) or not num_heads:
            raise ValueError(
                f"{type(base).__name__} has no Llama-style `mlp.down_proj` / `self_attn.o_proj` Linear pairs "
                f"(found {len(down)} and {len(out)}); channel masks need them. Use granularity='weight' instead."
            )
        if out[0][1].in_features % num_heads:
            raise ValueError(f"o_proj has {out[0][1].in_features} inputs, not a multiple of {num_heads} heads.")
        return cls(down, out, int(num_heads))

    @property
    def num_layers(self) -> int:
        return len(self.down)

    @property
    def intermediate_size(self) -> int:
        return self.down[0][1].in_features

    @property
    def head_dim(self) -> int:
        return self.out[0][1].in_features // self.num_heads

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {"neurons": (self.num_layers, self.intermediate_size), "heads": (self.num_layers, self.num_heads)}


@dataclass
class ChannelMask:
    """One persona's channel mask: True keeps a neuron or head."""

    name: str
    neurons: torch.Tensor  # (num_layers, intermediate_size) bool
    heads: torch.Tensor  # (num_layers, num_heads) bool
    fingerprint: str  # of the model it was calibrated on
    metadata: dict[str, str] = field(default_factory=dict)  # calibration settings
    statistics: ActivationStatistics | None = field(default=None, repr=False)  # not saved

    @property
    def num_bits(self) -> int:
        return self.neurons.numel() + self.heads.numel()

    @property
    def packed_bytes(self) -> int:
        """Bytes of mask bits on disk (the file adds a small safetensors header)."""
        return (self.neurons.numel() + 7) // 8 + (self.heads.numel() + 7) // 8

    def save(self, path: str | os.PathLike) -> str:
        masks = {"neurons": self.neurons, "heads": self.heads}
        return write_mask_file(os.fspath(path), "channel", self.name, masks, self.fingerprint, self.metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model, strict: bool = True) -> ChannelMask:
        """Read a channel mask file for ``model``; ``strict=False`` accepts a mask made on another checkpoint."""
        return cls.read(path, ChannelLayout.of(model).shapes(), model_fingerprint(model) if strict else None)

    @classmethod
    def read(cls, path: str | os.PathLike, shapes: dict[str, tuple[int, int]], fingerprint: str | None) -> ChannelMask:
        name, masks, metadata = read_mask_file(os.fspath(path), "channel", fingerprint, shapes)
        return cls(name, masks["neurons"], masks["heads"], metadata["model_fingerprint"], metadata)


def build_channel_mask(
    model,
    name: str,
    statistics: ActivationStatistics,
    config: SubnetworkConfig,
    contrast: ActivationStatistics | None = None,
) -> ChannelMask:
    """Keep the top ``1 - sparsity`` neurons and heads of every layer by structured Wanda score.

    With ``contrast`` (the opposing persona's statistics, or every other persona pooled), the score is
    ``phi(z_j) * sum_i |W[i, j]|`` (Contrastive-Wanda summed over the column), ties broken by the plain score.
    """
    layout = ChannelLayout.of(model)
    neurons, heads = [], []
    for (down_name, down), (out_name, out) in zip(layout.down, layout.out):
        per_layer = []
        for module_name, module in ((down_name, down), (out_name, out)):
            plain = column_scores(module.weight, statistics.mean(module_name))  # (in,)
            if contrast is not None:
                z = contrast_z(
                    statistics.mean(module_name),
                    statistics.var(module_name),
                    contrast.mean(module_name),
                    contrast.var(module_name),
                )
                phi = contrast_weight(z, config.contrast, config.tau).to(plain.device)
                column = module.weight.detach().float().abs().sum(0)  # (in,)
                plain = contrastive_scores(column.unsqueeze(0), phi, plain.unsqueeze(0)).squeeze(0)
            per_layer.append(plain)
        neurons.append(topk_keep(per_layer[0], config.sparsity).cpu())
        heads.append(topk_keep(group_scores(per_layer[1], layout.num_heads), config.sparsity).cpu())
    metadata = {**config.to_metadata(), "samples": str(statistics.count), "contrastive": str(contrast is not None)}
    return ChannelMask(name, torch.stack(neurons), torch.stack(heads), model_fingerprint(model), metadata, statistics)


class SubnetworkBank:
    """Channel masks of many personas for one model, applied per batch row for the length of one call.

    Row 0 of the tables keeps every channel (no mask): rows of a batch without a persona, or whose persona has no
    mask (``strict=False``), run the full model exactly.
    """

    def __init__(self, model) -> None:
        self.layout = ChannelLayout.of(model)
        self.fingerprint = model_fingerprint(model)
        weight = self.layout.down[0][1].weight
        self._dtype, self._device = weight.dtype, weight.device
        self._names: list[str] = []
        self._neurons = torch.ones(1, self.layout.num_layers, self.layout.intermediate_size, dtype=torch.bool)
        self._heads = torch.ones(1, self.layout.num_layers, self.layout.num_heads, dtype=torch.bool)

    @property
    def personas(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def index(self, name: str) -> int:
        """Table row of ``name`` (rows start at 1; 0 is the unmasked model)."""
        if name not in self._names:
            raise KeyError(f"Persona {name!r} has no channel mask in this bank; known: {self._names[:10]}.")
        return self._names.index(name) + 1

    def add(self, mask: ChannelMask, exist_ok: bool = False) -> int:
        """Register ``mask`` (checked against this model's fingerprint and shapes); returns its row."""
        validate_persona_name(mask.name)
        if mask.fingerprint != self.fingerprint:
            raise PersonaFileError(
                f"The channel mask of {mask.name!r} was calibrated on model {mask.fingerprint!r}, but this bank's "
                f"model is {self.fingerprint!r}."
            )
        expected = self.layout.shapes()
        for key, tensor in (("neurons", mask.neurons), ("heads", mask.heads)):
            if tuple(tensor.shape) != expected[key] or tensor.dtype != torch.bool:
                raise ValueError(
                    f"Mask `{key}` of {mask.name!r} has shape {tuple(tensor.shape)} ({tensor.dtype}); this model "
                    f"needs {expected[key]} bool."
                )
        if mask.name in self._names:
            if not exist_ok:
                raise ValueError(f"Persona {mask.name!r} already has a channel mask; pass exist_ok=True to replace.")
            row = self.index(mask.name)
            self._neurons[row], self._heads[row] = mask.neurons, mask.heads
            return row
        self._names.append(mask.name)
        self._neurons = torch.cat([self._neurons, mask.neurons.unsqueeze(0)])
        self._heads = torch.cat([self._heads, mask.heads.unsqueeze(0)])
        return len(self._names)

    def load(self, path: str | os.PathLike, exist_ok: bool = False) -> str:
        """Read a channel mask file (validated for this model) and register it; returns the persona name."""
        mask = ChannelMask.read(path, self.layout.shapes(), self.fingerprint)
        self.add(mask, exist_ok)
        return mask.name

    def remove(self, name: str) -> None:
        row = self.index(name)
        keep = [i for i in range(len(self._names) + 1) if i != row]
        self._names.remove(name)
        self._neurons, self._heads = self._neurons[keep], self._heads[keep]

    def rows(self, persona_ids: PersonaRows, strict: bool = True) -> torch.Tensor:
        """Table rows (n,) for a name (n = 1, any batch), names or None per row, or a tensor of rows."""
        if isinstance(persona_ids, torch.Tensor):
            rows = persona_ids.reshape(-1).long().cpu()
            if persona_ids.is_floating_point() or bool(((rows < 0) | (rows > len(self._names))).any()):
                raise ValueError(f"Mask rows must be integers in [0, {len(self._names)}], got {rows.tolist()}.")
            return rows
        names = [persona_ids] if persona_ids is None or isinstance(persona_ids, str) else list(persona_ids)
        if not names:
            raise ValueError("`persona_ids` is empty: give one name, or one name (or None) per batch row.")
        rows = []
        for name in names:
            if name is None or (not strict and name not in self._names):
                rows.append(0)
            else:
                rows.append(self.index(name))
        return torch.tensor(rows, dtype=torch.long)

    @contextlib.contextmanager
    def apply(self, persona_ids: PersonaRows, strict: bool = True) -> Iterator[None]:
        """Within the block every forward (and each ``generate`` step) masks each batch row with its persona's mask.

        ``persona_ids``: one name for every row, one name or None per row, or a tensor of table rows. ``generate``
        with beams or ``num_return_sequences`` repeats rows; the masks follow (``repeat_interleave``). With
        ``strict=False`` personas without a mask run unmasked (e.g. personas that carry only a mixture).
        """
        rows = self.rows(persona_ids, strict)
        neurons = self._neurons[rows].to(self._device, self._dtype)  # (n, num_layers, intermediate)
        heads = self._heads[rows].to(self._device, self._dtype)  # (n, num_layers, num_heads)
        heads = heads.repeat_interleave(self.layout.head_dim, dim=2)  # (n, num_layers, num_heads * head_dim)
        handles = []
        try:
            for layer, ((_, down), (_, out)) in enumerate(zip(self.layout.down, self.layout.out)):
                handles.append(down.register_forward_pre_hook(_row_mask_hook(neurons[:, layer])))
                handles.append(out.register_forward_pre_hook(_row_mask_hook(heads[:, layer])))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _row_mask_hook(mask: torch.Tensor):
    """Pre-hook multiplying a Linear's input (batch, seq, in) by its row's mask (n, in); n = 1 broadcasts."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = mask
        if m.shape[0] != x.shape[0] and m.shape[0] != 1:
            if x.shape[0] % m.shape[0]:
                raise ValueError(f"{m.shape[0]} persona masks for a batch of {x.shape[0]} rows.")
            m = m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)  # beams / num_return_sequences
        shape = (m.shape[0],) + (1,) * (x.dim() - 2) + (m.shape[1],)
        return (x * m.to(x.dtype).view(shape),) + tuple(args[1:])

    return hook
