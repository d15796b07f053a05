"""``SubnetworkConfig``: how a persona's subnetwork is calibrated and masked (sparsity, statistic, granularity).

The method is "Your Language Model Secretly Contains Personality Subnetworks" (Ye et al., ICLR 2026,
arXiv 2602.07164; code github.com/Ruimeng-Ye/Persona at ec12c29). Notes for implementers:
``../shared/papers/persona-subnetworks-summary.md``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class Granularity(str, enum.Enum):
    """What one mask bit switches off."""

    WEIGHT = "weight"  # the paper: one bit per weight of every decoder Linear, per-row top-(1 - sparsity)
    CHANNEL = "channel"  # servable: one bit per MLP neuron (down_proj input) and per attention head (o_proj input)


class Statistic(str, enum.Enum):
    """Per-sample activation strength of an input channel, averaged over calibration samples."""

    SAMPLE_L2 = "sample_l2"  # authors' code: sqrt(sum_t x_tj^2) over one sample's tokens (grows with its length)
    SAMPLE_RMS = "sample_rms"  # length-normalised: sqrt(mean_t x_tj^2), so long lines do not weigh more


class Contrast(str, enum.Enum):
    """phi in the contrastive score ``|W| * phi(z)`` (z: standardised difference of the two personas' means)."""

    RELU = "relu"  # authors' default; every channel with z <= 0 ties at 0 (ties are broken by the plain score)
    SOFTPLUS = "softplus"  # softplus(z / tau): no ties


class CalibrationFormat(str, enum.Enum):
    """What text the calibration forward passes read."""

    LINES = "lines"  # authors' code: each response on its own, no template; statistics over all its tokens
    CHAT = "chat"  # the project's prompt format (chat template); statistics over the response tokens only


@dataclass
class SubnetworkConfig:
    """Settings of `calibrate_subnetwork`. Every field is serialised into the mask file's metadata."""

    sparsity: float = field(
        default=0.3,
        metadata={
            "help": "Fraction zeroed: of each weight row (weight masks) or of each layer's MLP neurons and heads "
            "(channel masks). The paper uses 0.3 (contrastive) and 0.5; a 135M model loses general ability "
            "quickly under channel masks, so measure (docs/subnetworks.md) before going above 0.1-0.3."
        },
    )
    granularity: Granularity = field(
        default=Granularity.CHANNEL,
        metadata={
            "help": "'channel' (KB-sized, mixes per batch row, combines with a soft prompt) or 'weight' (the paper's "
            "unstructured masks, 13 MB per persona for SmolLM2-135M, one persona at a time)."
        },
    )
    statistic: Statistic = field(
        default=Statistic.SAMPLE_L2,
        metadata={"help": "'sample_l2' as in the authors' code, or 'sample_rms' (length-normalised)."},
    )
    calibration_format: CalibrationFormat = field(
        default=CalibrationFormat.LINES,
        metadata={"help": "'lines' (raw responses, as the authors) or 'chat' (prompt format, response tokens)."},
    )
    contrast: Contrast = field(
        default=Contrast.SOFTPLUS,
        metadata={"help": "phi of the contrastive score: 'softplus' (no ties) or 'relu' (the authors' default)."},
    )
    tau: float = field(default=2.0, metadata={"help": "Temperature of softplus(z / tau) (authors: 2)."})
    mlp_only: bool = field(
        default=False, metadata={"help": "Weight masks: mask only the MLP Linears (authors' prune_only_mlp)."}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Calibrate on at most this many lines of the persona (None: all)."}
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per calibration sample (authors: 512)."})
    batch_size: int = field(
        default=8, metadata={"help": "Calibration samples per forward pass (padding is excluded from statistics)."}
    )

    def __post_init__(self) -> None:
        for name, kind in (
            ("granularity", Granularity),
            ("statistic", Statistic),
            ("calibration_format", CalibrationFormat),
            ("contrast", Contrast),
        ):
            value = getattr(self, name)
            try:
                setattr(self, name, kind(value))
            except ValueError:
                choices = ", ".join(repr(k.value) for k in kind)
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.") from None
        check_sparsity(self.sparsity)
        if not self.tau > 0:
            raise ValueError(f"`tau` must be positive, got {self.tau!r}.")
        for name in ("max_length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"`max_samples` must be a positive integer or None, got {self.max_samples!r}.")

    def to_metadata(self) -> dict[str, str]:
        """Plain strings for a safetensors header."""
        return {k: str(v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` if it lies strictly between 0 and 1, else ``ValueError`` naming it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"`sparsity` must be strictly between 0 and 1, got {sparsity!r}.")
    return float(sparsity)
