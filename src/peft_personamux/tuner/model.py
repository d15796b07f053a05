"""``PersonaMuxModel``: the peft tuner that owns the codebook and the bias tokens, and puts soft prompts in place.

This file holds injection (wrapping the input embedding), the one `prepare` step, ``forward`` and ``generate``. The
persona registry and training stages are in `registry`, persona files in `persona_io`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import _get_submodules
from torch import nn

from ..inputs import Expanded, insert_virtual_tokens, positions_from_mask
from .config import PersonaMuxConfig
from .init import default_placeholder_id, init_rows
from .layer import PersonaMuxLayer, PromptRequest
from .persona_io import PersonaFiles, PersonaWriter
from .registry import PersonaRegistry, PersonaSpec, check_bias_scale

logger = logging.getLogger(__name__)


@dataclass
class PreparedInputs(Expanded):
    """`insert_virtual_tokens`' output for this model, and what the embedding layer writes at the placeholders.

    ``persona_ids`` is None when the adapter is off (``disable_adapter()`` or none left): then the inputs are the
    caller's, exactly as given.
    """

    persona_ids: torch.Tensor | None = None  # (batch,) rows of the persona table
    bias_scale: float = 0.0


class PersonaMuxModel(PersonaRegistry, PersonaFiles, BaseTuner):
    """Persona-Mux: a soft prompt per persona, ``bias_scale * b ⊕ einsum(W, m_i)``, mixed from a shared codebook.

    Created by ``peft.get_peft_model(model, PersonaMuxConfig(...))``. The soft prompt is written into the input
    embeddings at placeholder positions (see ``peft_personamux.inputs``), so attention masks, position ids, the KV
    cache and ``generate`` work as for the base model. Persona methods are reachable on the ``PeftModel``.
    """

    prefix: str = "personamux_"
    tuner_layer_cls = PersonaMuxLayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- injection -----------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: PersonaMuxConfig, model_config: dict) -> PersonaMuxConfig:
        return peft_config

    def _create_and_replace(self, *args, **kwargs) -> None:  # pragma: no cover - inject_adapter does the work
        raise NotImplementedError("PersonaMuxModel wraps the input embedding in inject_adapter.")

    def _check_target_module_exists(self, peft_config, key: str) -> bool:  # pragma: no cover
        return False

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
        **kwargs,
    ) -> None:
        self.init_registry_state()
        config: PersonaMuxConfig = self.peft_config[adapter_name]
        embedding = model.get_input_embeddings()
        if embedding is None or not hasattr(embedding, "weight"):
            raise ValueError(
                f"{type(model).__name__} has no input embedding layer with a weight; Persona-Mux needs one."
            )
        vocab_size, hidden = embedding.weight.shape
        if config.placeholder_token_id is None:
            config.placeholder_token_id = default_placeholder_id(model, vocab_size)
        if config.placeholder_token_id >= vocab_size:
            raise ValueError(
                f"`placeholder_token_id` must be below the vocabulary size {vocab_size}, got "
                f"{config.placeholder_token_id}."
            )
        if isinstance(embedding, PersonaMuxLayer):
            layer = embedding
            if layer.placeholder_token_id != config.placeholder_token_id:
                raise ValueError(
                    "All Persona-Mux adapters of a model must share `placeholder_token_id`; got "
                    f"{config.placeholder_token_id} and {layer.placeholder_token_id}."
                )
        else:
            layer = PersonaMuxLayer(embedding, config.placeholder_token_id)
            self.targeted_module_names.append(_swap_module(model, embedding, layer))
        base = layer.base_layer
        codebook = init_rows(config.codebook_init, config.num_codes * config.tokens_per_code, base, config)
        bias = init_rows(config.bias_init, config.num_bias_tokens, base, config)
        layer.update_layer(
            adapter_name,
            config.num_codes,
            config.tokens_per_code,
            config.num_bias_tokens,
            codebook.reshape(config.num_codes, config.tokens_per_code, hidden),
            bias,
        )
        self.add_registry(adapter_name)
        self._bias_scale = config.default_bias_scale
        source_dir = getattr(config, "_source_dir", None)
        if source_dir:
            self._persona_dir[adapter_name] = source_dir
        object.__setattr__(config, "_persona_writer", PersonaWriter(self, adapter_name))
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for p in self.personamux_layer.parameters():
                p.requires_grad_(False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """As peft does for its own adapters: keep W, b and the table in float32 over a half precision base model,
        unless ``autocast_adapter_dtype=False`` (then they take the base model's dtype)."""
        if not autocast_adapter_dtype or adapter_name not in self.peft_config:
            return
        layer = self.personamux_layer
        for dict_name in layer.adapter_layer_names:
            param = getattr(layer, dict_name).get(adapter_name)
            if param is not None and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()  # in place: the parameter (and any optimizer's hold on it) stays
        self.apply_row_mask(adapter_name)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for adapter in self.active_adapters:
            self.set_trainable(adapter, codebook=True, bias=True, rows="all")

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter file holds the codebook and the bias only; each persona has its own file."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {k: v for k, v in out.items() if ".personamux_mixture" not in k}

    # -- the adapter in use --------------------------------------------------------------------------------------

    @property
    def personamux_layer(self) -> PersonaMuxLayer:
        """The wrapped input embedding that holds W, b and the persona table of every adapter."""
        layer = self.model.get_input_embeddings()
        if not isinstance(layer, PersonaMuxLayer):
            raise RuntimeError("The Persona-Mux layer was removed from the model (unload() was called?).")
        return layer

    @property
    def current_adapter(self) -> str:
        """The first active adapter that still exists; ``ValueError`` when there is none."""
        active = [a for a in self.active_adapters if a in self.peft_config]
        if not active:
            raise ValueError(
                "This model has no active Persona-Mux adapter (was it deleted?). Add one with `add_adapter` or "
                "`load_adapter`, then `set_adapter`."
            )
        return active[0]

    def adapter_config(self, adapter_name: str | None = None) -> PersonaMuxConfig:
        """The config of ``adapter_name`` (default: the current adapter)."""
        return self.peft_config[adapter_name or self.current_adapter]

    def num_virtual(self, bias_scale: float) -> int:
        """Soft-prompt length of the current adapter at ``bias_scale``."""
        return self.adapter_config().num_virtual(bias_scale)

    def prompt_enabled(self) -> bool:
        """False under ``disable_adapter()`` and once every adapter is deleted: then calls go to the base model."""
        if not any(a in self.peft_config for a in self.active_adapters):
            return False
        layer = self.model.get_input_embeddings()
        return isinstance(layer, PersonaMuxLayer) and not layer.disable_adapters

    # -- prepare, forward and generate ---------------------------------------------------------------------------

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        persona_ids: PersonaSpec = None,
        bias_scale: float | None = None,
        padding_side: str = "right",
    ) -> PreparedInputs:
        """Widen each row's placeholder into the soft prompt's length (ids, mask and labels together) and resolve
        persona rows and bias scale. The one step that forward, generate, the loss, fitting and serving share."""
        if not self.prompt_enabled():  # the base model's inputs, exactly as given
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            return PreparedInputs(input_ids, mask, labels, padding_side == "left")
        config = self.adapter_config()
        pad_id = getattr(self.model.config, "pad_token_id", None)
        scale = self._bias_scale if bias_scale is None else check_bias_scale(bias_scale)
        ids = self.resolve_persona_ids(persona_ids, input_ids.shape[0], input_ids.device)
        width = config.num_virtual(scale)
        expanded = insert_virtual_tokens(
            input_ids, attention_mask, labels, config.placeholder_token_id, width, padding_side, pad_id
        )
        return PreparedInputs(**vars(expanded), persona_ids=ids, bias_scale=scale)

    @contextlib.contextmanager
    def prompt_request(
        self, persona_ids: torch.Tensor | None, bias_scale: float, mixtures: torch.Tensor | None = None
    ) -> Iterator[None]:
        """While open, the embedding layer writes these personas' soft prompts at the placeholders (None: nothing).

        ``mixtures`` (batch, num_codes) overrides the persona table row by row (fitting).
        """
        if persona_ids is None:
            yield
            return
        layer = self.personamux_layer
        layer.request = PromptRequest(persona_ids, bias_scale, mixtures)
        try:
            yield
        finally:
            layer.request = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        persona_ids: PersonaSpec = None,
        bias_scale: float | None = None,
        **kwargs,
    ):
        """Run the base model with each row's soft prompt at its placeholder (or first in the row).

        Outputs (logits, hidden states) include the virtual-token positions; labels there are -100.
        """
        if not self.prompt_enabled():  # disable_adapter() or no adapter left: exactly the base model
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        if inputs_embeds is not None:
            raise ValueError(
                "Persona-Mux writes the soft prompt through the embedding layer, so `inputs_embeds` "
                "would silently skip it. Pass `input_ids`, or build embeddings with the prompt in "
                "place with `export_prompt_embeds`."
            )
        if input_ids is None:
            raise ValueError("Persona-Mux needs `input_ids`.")
        if self.training and labels is not None and persona_ids is None and self.num_personas > 1:
            raise ValueError(
                "Training batch without `persona_ids` while several personas are registered: the active persona would "
                "train on every row. transformers.Trainer drops columns that the base model's forward does not name: "
                "use PersonaMuxTrainer, or TrainingArguments(remove_unused_columns=False)."
            )
        prepared = self.prepare(input_ids, attention_mask, labels, persona_ids, bias_scale, "right")
        if position_ids is not None:
            position_ids = positions_from_mask(prepared.attention_mask)
        with self.prompt_request(prepared.persona_ids, prepared.bias_scale):
            return self.model(
                input_ids=prepared.input_ids,
                attention_mask=prepared.attention_mask,
                labels=prepared.labels,
                position_ids=position_ids,
                **kwargs,
            )

    def generate(self, *args, persona_ids: PersonaSpec = None, bias_scale: float | None = None, **kwargs):
        """``generate`` with per-row personas. Returned sequences start with the caller's ``input_ids``."""
        if not self.prompt_enabled():  # disable_adapter() or no adapter left: exactly the base model
            return self.model.generate(*args, **kwargs)
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None and args:
            input_ids, args = args[0], args[1:]
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("Persona-Mux generate needs `input_ids` (soft prompts go through the embedding layer).")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("`inputs_embeds` would skip the soft prompt; pass `input_ids` instead.")
        prepared = self.prepare(input_ids, kwargs.pop("attention_mask", None), None, persona_ids, bias_scale, "left")
        width = prepared.input_ids.shape[1]
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += width - input_ids.shape[1]
        # the placeholder id must never be generated, or a later prefill would treat it as a prompt slot
        suppress = list(
            kwargs.pop("suppress_tokens", None) or getattr(self.model.generation_config, "suppress_tokens", None) or []
        )
        kwargs["suppress_tokens"] = sorted(set(suppress) | {self.adapter_config().placeholder_token_id})
        with self.prompt_request(prepared.persona_ids, prepared.bias_scale):
            out = self.model.generate(
                *args, input_ids=prepared.input_ids, attention_mask=prepared.attention_mask, **kwargs
            )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        restored = torch.cat([prompt.to(sequences.device), sequences[:, width:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out

    # -- no merging for soft prompts -----------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "Persona-Mux is a soft prompt: there are no weights to merge into the base model. Use "
            "`unload()` to get the base model back."
        )

    def merge_and_unload(self, *args, **kwargs):
        self._check_merge_allowed()

    def merge_adapter(self, *args, **kwargs) -> None:
        self._check_merge_allowed()

    def unload(self) -> nn.Module:
        """Remove the Persona-Mux layer and return the base model, as it was before ``get_peft_model``."""
        layer = self.model.get_input_embeddings()
        if isinstance(layer, PersonaMuxLayer):
            _swap_module(self.model, layer, layer.base_layer)
        # as peft's own unload does: a left-over config would make the next get_peft_model hold two adapters
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        for handle in self._grad_hooks.values():
            handle.remove()
        self._grad_hooks.clear()
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter with its personas; with none left, forward and generate are the base model's."""
        super().delete_adapter(adapter_name)
        self.drop_registry(adapter_name)


def persona_method(function: Callable) -> Callable:
    """Extension point: make ``function(model, ...)`` a method of every `PersonaMuxModel` (so of its PeftModel too).

    Applications built on the tuner register their entry points with it (``export_prompt_embeds`` in `serving`,
    ``blend_personas``/``persona_map`` in `arithmetic`, ``fit_embedding_map``/``persona_from_embedding`` in
    `persona_embedding`), so that ``model.blend_personas(...)`` works while the tuner imports none of them.
    """
    existing = PersonaMuxModel.__dict__.get(function.__name__)
    if existing is not None and getattr(existing, "__qualname__", None) != function.__qualname__:
        raise ValueError(f"PersonaMuxModel already has a method {function.__name__!r}; pick another name.")
    setattr(PersonaMuxModel, function.__name__, function)
    return function


def as_tuner(model) -> PersonaMuxModel:
    """The ``PersonaMuxModel`` of a Persona-Mux ``PeftModel`` (or the tuner itself)."""
    return model if isinstance(model, PersonaMuxModel) else model.base_model


def _swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> str:
    """Put ``new`` where ``old`` sits in ``model``; returns the module's name."""
    name = next(n for n, m in model.named_modules() if m is old)
    parent, _, child_name = _get_submodules(model, name)
    setattr(parent, child_name, new)
    return name
