"""The Persona-Mux layer: wraps the input embedding and writes the soft prompt over placeholder positions."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

# Row id that `PromptRequest.persona_ids` uses for the default persona: the zero mixture (see `soft_prompt`).
DEFAULT_PERSONA_ROW = -1
# The persona table's name before it took the method prefix (releases up to 0.1.0); still accepted on load.
LEGACY_MIXTURE_NAME = "mixture"


@dataclass
class PromptRequest:
    """What the next forward pass should put at the placeholders (set by the tuner around each call)."""

    persona_ids: torch.Tensor  # (batch,) rows of the persona table, DEFAULT_PERSONA_ROW for the zero mixture
    bias_scale: float
    mixtures: torch.Tensor | None = None  # (batch, num_codes): per-row override of the table (fast fitting)


# Each thread's open requests, by layer: a model called from several threads (a thread pool serving personas) puts
# each call's own personas at its placeholders. Module-level, so that layers stay deep-copyable and picklable.
_REQUESTS = threading.local()


class PersonaMuxLayer(nn.Module, BaseTunerLayer):
    """Input embedding with a Persona-Mux soft prompt.

    Parameters per adapter: codebook ``W`` (num_codes, tokens_per_code, d), bias ``b`` (num_bias_tokens, d) and the
    persona table ``personamux_mixture`` of mixture vectors (num_personas, num_codes). The adapter file holds W and
    b; persona files hold the table's rows, so the table is left out of the adapter file and not reported missing.
    """

    adapter_layer_names = ("personamux_codebook", "personamux_bias", "personamux_mixture")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, placeholder_token_id: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.placeholder_token_id = placeholder_token_id
        self.personamux_codebook = nn.ParameterDict()
        self.personamux_bias = nn.ParameterDict()
        self.personamux_mixture = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = "default"
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape  # (vocab, hidden)
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def request(self) -> PromptRequest | None:
        """What the calling thread's open `prompt_request` asks this layer for (None: no request open)."""
        return getattr(_REQUESTS, "by_layer", {}).get(id(self))

    @request.setter
    def request(self, value: PromptRequest | None) -> None:
        if not hasattr(_REQUESTS, "by_layer"):
            _REQUESTS.by_layer = {}
        if value is None:
            _REQUESTS.by_layer.pop(id(self), None)
        else:
            _REQUESTS.by_layer[id(self)] = value

    @property
    def mixture(self) -> nn.ParameterDict:
        """The persona table by its former name (read-only alias of ``personamux_mixture``)."""
        return self.personamux_mixture

    def update_layer(
        self,
        adapter_name: str,
        num_codes: int,
        tokens_per_code: int,
        num_bias_tokens: int,
        codebook_init: torch.Tensor,
        bias_init: torch.Tensor,
    ) -> None:
        """Create the parameters of one adapter from initial values of the right shapes."""
        hidden = self.out_features
        if codebook_init.shape != (num_codes, tokens_per_code, hidden):
            raise ValueError(
                f"codebook init has shape {tuple(codebook_init.shape)}, expected "
                f"{(num_codes, tokens_per_code, hidden)}."
            )
        if bias_init.shape != (num_bias_tokens, hidden):
            raise ValueError(f"bias init has shape {tuple(bias_init.shape)}, expected {(num_bias_tokens, hidden)}.")
        weight = self.base_layer.weight
        self.personamux_codebook[adapter_name] = nn.Parameter(codebook_init.to(weight.device, weight.dtype))
        self.personamux_bias[adapter_name] = nn.Parameter(bias_init.to(weight.device, weight.dtype))
        # mixture vectors start at zero (paper); rows are added by the tuner's persona registry
        self.personamux_mixture[adapter_name] = nn.Parameter(
            torch.zeros(0, num_codes, device=weight.device, dtype=weight.dtype)
        )
        self.set_adapter(self.active_adapters)

    # -- soft prompt -------------------------------------------------------------------------------------------

    def soft_prompt(
        self, adapter_name: str, persona_ids: torch.Tensor, bias_scale: float, mixtures: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Soft prompts for a batch of personas: ``bias_scale * b ⊕ einsum(W, m_i)``; no bias tokens at scale 0.

        A row id of ``DEFAULT_PERSONA_ROW`` (-1) stands for the default persona, the zero mixture.
        """
        codebook = self.personamux_codebook[adapter_name]  # (num_codes, tokens_per_code, hidden)
        if mixtures is None:
            mixtures = self._table_rows(adapter_name, persona_ids)  # (batch, num_codes)
        mixed = torch.einsum("bc,ckd->bkd", mixtures.to(codebook.dtype), codebook)  # (batch, tokens_per_code, d)
        if bias_scale == 0:
            return mixed
        bias = self.personamux_bias[adapter_name] * bias_scale  # (num_bias_tokens, hidden)
        return torch.cat([bias.unsqueeze(0).expand(mixed.shape[0], -1, -1), mixed], dim=1)  # (batch, n_virtual, d)

    def _table_rows(self, adapter_name: str, persona_ids: torch.Tensor) -> torch.Tensor:
        table = self.personamux_mixture[adapter_name]  # (num_personas, num_codes)
        persona_ids = persona_ids.to(table.device)
        default = persona_ids == DEFAULT_PERSONA_ROW
        if not bool(default.any()):
            return table[persona_ids]
        zeros = table.new_zeros(persona_ids.shape[0], table.shape[1])
        if table.shape[0] == 0:
            return zeros
        return torch.where(default[:, None], zeros, table[persona_ids.clamp(min=0)])

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        embeds = self.base_layer(input_ids, *args, **kwargs)  # (batch, seq, hidden)
        request = self.request
        if self.disable_adapters or request is None or not self.active_adapters:
            return embeds
        is_ph = input_ids == self.placeholder_token_id  # (batch, seq)
        counts = is_ph.sum(-1)
        if not bool(counts.any()):
            return embeds  # decoding steps after the prefill: the prompt is already in the KV cache
        prompts = self.soft_prompt(
            self.active_adapters[0], request.persona_ids.to(input_ids.device), request.bias_scale, request.mixtures
        )  # (batch, n_virtual, hidden)
        if prompts.shape[0] != input_ids.shape[0] and input_ids.shape[0] % prompts.shape[0] == 0:
            # generate() with num_return_sequences or beams repeats each row
            prompts = prompts.repeat_interleave(input_ids.shape[0] // prompts.shape[0], dim=0)
        n_virtual = prompts.shape[1]
        has_prompt = counts > 0
        if bool((counts[has_prompt] != n_virtual).any()):
            raise ValueError(
                f"Expected {n_virtual} placeholder tokens per row, found {counts.tolist()}. Inputs with persona "
                "placeholders must go through the Persona-Mux model's forward/generate, which size them."
            )
        if prompts.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{prompts.shape[0]} personas for a batch of {input_ids.shape[0]} rows.")
        # written after the lookup, so models that scale embeddings (Gemma) need no special case
        source = prompts[has_prompt].to(embeds.dtype)  # rows that carry a prompt
        return embeds.masked_scatter(is_ph.unsqueeze(-1), source)

    # -- loading -------------------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        legacy = prefix + LEGACY_MIXTURE_NAME + "."
        for key in [k for k in state_dict if k.startswith(legacy)]:
            state_dict[prefix + "personamux_mixture." + key[len(legacy) :]] = state_dict.pop(key)
        for dict_name in ("personamux_codebook", "personamux_bias"):
            for adapter_name, param in getattr(self, dict_name).items():
                key = f"{prefix}{dict_name}.{adapter_name}"
                if key in state_dict:
                    _check_adapter_weight(key, state_dict[key], param)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- peft BaseTunerLayer plumbing ----------------------------------------------------------------------------

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("Persona-Mux is a soft prompt: there are no weights to merge into the base model.")

    def unmerge(self) -> None:
        return None


def _check_adapter_weight(key: str, value: torch.Tensor, param: torch.Tensor) -> None:
    """A clear error for an adapter file whose codebook or bias does not fit this config and base model."""
    what = "codebook (num_codes, tokens_per_code, hidden)" if "codebook" in key else "bias (num_bias_tokens, hidden)"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        dtype = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"Adapter weight {key!r} must be a floating point tensor, got {dtype}.")
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"Adapter weight {key!r} has shape {tuple(value.shape)}, but the adapter config and base model expect "
            f"the {what} shape {tuple(param.shape)}. Check num_codes, tokens_per_code and num_bias_tokens in "
            "adapter_config.json, and that the base model is the one the adapter was trained on."
        )
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"Adapter weight {key!r} contains NaN or infinite values: the adapter file is damaged.")


def _after_load(layer: PersonaMuxLayer, incompatible_keys) -> None:
    """The table is not in adapter files: never report it missing, and never leave it on the meta device."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if ".personamux_mixture." not in k and not k.endswith(".personamux_mixture")]
    for adapter_name, table in list(layer.personamux_mixture.items()):
        if table.device.type != "meta":
            continue
        # low_cpu_mem_usage creates every adapter weight on meta, and the file fills in only W and b
        codebook = layer.personamux_codebook[adapter_name]
        device = codebook.device if codebook.device.type != "meta" else layer.base_layer.weight.device
        layer.personamux_mixture[adapter_name] = nn.Parameter(
            torch.zeros(table.shape, device=device, dtype=table.dtype), requires_grad=table.requires_grad
        )
