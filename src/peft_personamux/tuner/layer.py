"""The Persona-Mux layer: wraps the input embedding and writes the soft prompt over placeholder positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass
class PromptRequest:
    """What the next forward pass should put at the placeholders (set by the tuner around each call)."""

    persona_ids: torch.Tensor  # (batch,) rows of the persona table
    bias_scale: float
    mixtures: torch.Tensor | None = None  # (batch, num_codes): per-row override of the table (fast fitting)


class PersonaMuxLayer(nn.Module, BaseTunerLayer):
    """Input embedding with a Persona-Mux soft prompt.

    Parameters per adapter: codebook ``W`` (num_codes, tokens_per_code, d), bias ``b`` (num_bias_tokens, d) and the
    persona table of mixture vectors (num_personas, num_codes). The table is kept out of the adapter file (names
    without the method prefix); persona files hold its rows.
    """

    adapter_layer_names = ("personamux_codebook", "personamux_bias", "mixture")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, placeholder_token_id: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.placeholder_token_id = placeholder_token_id
        self.personamux_codebook = nn.ParameterDict()
        self.personamux_bias = nn.ParameterDict()
        self.mixture = nn.ParameterDict()
        self.request: PromptRequest | None = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = "default"
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape  # (vocab, hidden)

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
        self.mixture[adapter_name] = nn.Parameter(torch.zeros(0, num_codes, device=weight.device, dtype=weight.dtype))
        self.set_adapter(self.active_adapters)

    # -- soft prompt -------------------------------------------------------------------------------------------

    def soft_prompt(
        self, adapter_name: str, persona_ids: torch.Tensor, bias_scale: float, mixtures: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Soft prompts for a batch of personas: ``bias_scale * b ⊕ einsum(W, m_i)``; no bias tokens at scale 0."""
        codebook = self.personamux_codebook[adapter_name]  # (num_codes, tokens_per_code, hidden)
        mixture = self.mixture[adapter_name][persona_ids] if mixtures is None else mixtures  # (batch, num_codes)
        mixed = torch.einsum("bc,ckd->bkd", mixture.to(codebook.dtype), codebook)  # (batch, tokens_per_code, hidden)
        if bias_scale == 0:
            return mixed
        bias = self.personamux_bias[adapter_name] * bias_scale  # (num_bias_tokens, hidden)
        return torch.cat([bias.unsqueeze(0).expand(mixed.shape[0], -1, -1), mixed], dim=1)  # (batch, n_virtual, d)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        embeds = self.base_layer(input_ids, *args, **kwargs)  # (batch, seq, hidden)
        request = self.request
        if self.disable_adapters or request is None:
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

    # -- peft BaseTunerLayer plumbing ----------------------------------------------------------------------------

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("Persona-Mux is a soft prompt: there are no weights to merge into the base model.")

    def unmerge(self) -> None:
        return None
