"""Training-free persona subnetworks (Ye et al., ICLR 2026): masks found from a persona's lines by forward passes.

* ``weight`` masks (the paper): one bit per decoder weight, per-row top-(1 - sparsity) Wanda scores, plain or
  contrastive; applied to the weights reversibly, one persona at a time (`apply_weight_mask`).
* ``channel`` masks (servable): one bit per MLP neuron and attention head; many personas per batch through
  per-call forward pre-hooks (`SubnetworkBank.apply`), a few KB per persona, and they stack with a Persona-Mux
  soft prompt (`combine`).

See docs/subnetworks.md.
"""

from .calibrate import calibrate_subnetwork, persona_statistics
from .channels import ChannelLayout, ChannelMask, SubnetworkBank, build_channel_mask
from .config import CalibrationFormat, Contrast, Granularity, Statistic, SubnetworkConfig
from .files import list_subnetwork_files, model_fingerprint, subnetwork_path
from .statistics import ActivationStatistics, collect_statistics
from .weights import AppliedWeightMask, WeightMask, active_weight_mask, apply_weight_mask, build_weight_mask

__all__ = [
    "ActivationStatistics",
    "AppliedWeightMask",
    "CalibrationFormat",
    "ChannelLayout",
    "ChannelMask",
    "Contrast",
    "Granularity",
    "Statistic",
    "SubnetworkBank",
    "SubnetworkConfig",
    "WeightMask",
    "active_weight_mask",
    "apply_weight_mask",
    "build_channel_mask",
    "build_weight_mask",
    "calibrate_subnetwork",
    "collect_statistics",
    "list_subnetwork_files",
    "model_fingerprint",
    "persona_statistics",
    "subnetwork_path",
]
