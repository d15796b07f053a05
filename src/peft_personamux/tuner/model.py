"""``PersonaMuxModel``: the peft tuner that owns the codebook, the bias tokens and the persona registry."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import _get_submodules
from torch import nn

from ..inputs import Expanded, insert_virtual_tokens, positions_from_mask
from ..persona_files import (
    PersonaFileError,
    codebook_fingerprint,
    list_persona_files,
    persona_path,
    read_persona_file,
    validate_persona_name,
    write_persona_file,
)
from .config import PersonaMuxConfig, PersonaMuxInit, safe_tokenizer_kwargs
from .layer import DEFAULT_PERSONA_ROW, PersonaMuxLayer, PromptRequest

logger = logging.getLogger(__name__)

PersonaSpec = str | int | Sequence[str | int] | torch.Tensor | None


class _PersonaWriter:
    """Called by ``PersonaMuxConfig.save_pretrained``: writes the adapter's personas beside adapter_config.json."""

    def __init__(self, tuner: PersonaMuxModel, adapter_name: str) -> None:
        self._tuner = weakref.ref(tuner)  # weak: configs are deep-copied and must not copy the model
        self.adapter_name = adapter_name

    def __call__(self, directory: str) -> None:
        tuner = self._tuner()
        if tuner is not None and self.adapter_name in tuner.peft_config:
            tuner.save_personas(directory, adapter_name=self.adapter_name)


class BiasScale(contextlib.AbstractContextManager):
    """Returned by ``set_bias_scale``: the new scale holds until ``__exit__`` (if used with ``with``)."""

    def __init__(self, tuner: PersonaMuxModel, previous: float) -> None:
        self._tuner, self._previous = tuner, previous

    def __exit__(self, *exc) -> None:
        self._tuner._bias_scale = self._previous


class PersonaMuxModel(BaseTuner):
    """Persona-Mux: a soft prompt per persona, ``bias_scale * b ⊕ einsum(W, m_i)``, mixed from a shared codebook.

    Created by ``peft.get_peft_model(model, PersonaMuxConfig(...))``. The soft prompt is written into the input
    embeddings at placeholder positions (see ``peft_personamux.inputs``), so attention masks, position ids, the KV
    cache and ``generate`` work as for the base model. Persona methods below are reachable on the ``PeftModel``.
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

    def _ensure_state(self) -> None:
        if "_persona_names" not in self.__dict__:
            self.__dict__["_persona_names"] = {}  # adapter -> names, index = row of the persona table
            self.__dict__["_active_persona"] = {}  # adapter -> name or None
            self.__dict__["_persona_dir"] = {}  # adapter -> folder that holds personas/ (last save or load)
            self.__dict__["_trainable_rows"] = {}  # adapter -> rows that receive gradients, None = all
            self.__dict__["_grad_hooks"] = {}
            self.__dict__["_bias_scale"] = 1.0

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
        **kwargs,
    ) -> None:
        self._ensure_state()
        config: PersonaMuxConfig = self.peft_config[adapter_name]
        embedding = model.get_input_embeddings()
        if embedding is None or not hasattr(embedding, "weight"):
            raise ValueError(
                f"{type(model).__name__} has no input embedding layer with a weight; Persona-Mux needs one."
            )
        vocab_size, hidden = embedding.weight.shape
        if config.placeholder_token_id is None:
            config.placeholder_token_id = _default_placeholder_id(model, vocab_size)
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
        codebook = _init_rows(config.codebook_init, config.num_codes * config.tokens_per_code, base, config)
        bias = _init_rows(config.bias_init, config.num_bias_tokens, base, config)
        layer.update_layer(
            adapter_name,
            config.num_codes,
            config.tokens_per_code,
            config.num_bias_tokens,
            codebook.reshape(config.num_codes, config.tokens_per_code, hidden),
            bias,
        )
        self._persona_names[adapter_name] = []
        self._active_persona[adapter_name] = None
        self._trainable_rows[adapter_name] = None
        self._bias_scale = config.default_bias_scale
        source_dir = getattr(config, "_source_dir", None)
        if source_dir:
            self._persona_dir[adapter_name] = source_dir
        object.__setattr__(config, "_persona_writer", _PersonaWriter(self, adapter_name))
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for p in self._layer.parameters():
                p.requires_grad_(False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """As peft does for its own adapters: keep W, b and the table in float32 over a half precision base model,
        unless ``autocast_adapter_dtype=False`` (then they take the base model's dtype)."""
        if not autocast_adapter_dtype or adapter_name not in self.peft_config:
            return
        layer = self._layer
        for dict_name in layer.adapter_layer_names:
            param = getattr(layer, dict_name).get(adapter_name)
            if param is not None and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()  # in place: the parameter (and any optimizer's hold on it) stays
        self._apply_row_mask(adapter_name)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for adapter in self.active_adapters:
            self._set_trainable(adapter, codebook=True, bias=True, rows="all")

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter file holds the codebook and the bias only; each persona has its own file."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {k: v for k, v in out.items() if ".personamux_mixture" not in k}

    @property
    def _layer(self) -> PersonaMuxLayer:
        layer = self.model.get_input_embeddings()
        if not isinstance(layer, PersonaMuxLayer):
            raise RuntimeError("The Persona-Mux layer was removed from the model (unload() was called?).")
        return layer

    @property
    def _adapter(self) -> str:
        active = [a for a in self.active_adapters if a in self.peft_config]
        if not active:
            raise ValueError(
                "This model has no active Persona-Mux adapter (was it deleted?). Add one with `add_adapter` or "
                "`load_adapter`, then `set_adapter`."
            )
        return active[0]

    def _config(self, adapter_name: str | None = None) -> PersonaMuxConfig:
        return self.peft_config[adapter_name or self._adapter]

    # -- persona registry ----------------------------------------------------------------------------------------

    @property
    def personas(self) -> list[str]:
        """Registered persona names, in table-row order."""
        return list(self._persona_names[self._adapter])

    @property
    def num_personas(self) -> int:
        return len(self._persona_names[self._adapter])

    @property
    def active_persona(self) -> str | None:
        return self._active_persona[self._adapter]

    def persona_index(self, name: str) -> int:
        """Row of ``name`` in the persona table."""
        names = self._persona_names[self._adapter]
        try:
            return names.index(name)
        except ValueError:
            raise KeyError(self._unknown_persona_message(name)) from None

    def _unknown_persona_message(self, name: str) -> str:
        names = self._persona_names[self._adapter]
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        files = self.available_persona_files()
        hint = f" Persona files in {self.persona_dir}: {len(files)}." if self.persona_dir else ""
        return f"Unknown persona {name!r}. Registered ({len(names)}): {shown or 'none'}.{hint}"

    def add_personas(
        self, names: Sequence[str], mixtures: torch.Tensor | None = None, exist_ok: bool = False
    ) -> list[int]:
        """Register personas (new rows start at zero, as in the paper). Returns their rows.

        Register personas before building an optimizer: growing the table replaces the parameter.
        """
        adapter = self._adapter
        names = [validate_persona_name(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate persona names in {names}.")
        registry = self._persona_names[adapter]
        existing = [n for n in names if n in registry]
        if existing and not exist_ok:
            raise ValueError(f"Personas already registered: {existing}. Pass exist_ok=True, or use set_mixture().")
        new = [n for n in names if n not in registry]
        table = self._layer.personamux_mixture[adapter]
        if table.device.type == "meta":
            raise RuntimeError(
                "The persona table is on the meta device (adapter weights created with low_cpu_mem_usage=True and "
                "never loaded); load the adapter with PeftModel.from_pretrained or load_adapter first."
            )
        num_codes = table.shape[1]
        if mixtures is not None:
            mixtures = torch.as_tensor(mixtures)
            if mixtures.shape != (len(names), num_codes):
                raise ValueError(f"`mixtures` must have shape {(len(names), num_codes)}, got {tuple(mixtures.shape)}.")
        if new:
            grown = torch.zeros(len(registry) + len(new), num_codes, device=table.device, dtype=table.dtype)
            grown[: len(registry)] = table.data
            self._layer.personamux_mixture[adapter] = nn.Parameter(grown, requires_grad=table.requires_grad)
            registry.extend(new)
            self._apply_row_mask(adapter)
        rows = [registry.index(n) for n in names]
        if mixtures is not None:
            with torch.no_grad():
                self._layer.personamux_mixture[adapter][rows] = mixtures.to(table.device, table.dtype)
        return rows

    def add_persona(self, name: str, mixture: torch.Tensor | None = None, exist_ok: bool = False) -> int:
        """Register one persona; its mixture starts at zero unless given. Returns its row."""
        return self.add_personas([name], None if mixture is None else torch.as_tensor(mixture)[None], exist_ok)[0]

    def remove_persona(self, name: str) -> None:
        """Drop a persona from the table (later rows move up by one)."""
        adapter = self._adapter
        row = self.persona_index(name)
        table = self._layer.personamux_mixture[adapter]
        keep = [i for i in range(table.shape[0]) if i != row]
        kept = nn.Parameter(table.data[keep].clone(), requires_grad=table.requires_grad)
        self._layer.personamux_mixture[adapter] = kept
        self._persona_names[adapter].pop(row)
        if self._active_persona[adapter] == name:
            self._active_persona[adapter] = None
        rows = self._trainable_rows[adapter]
        if rows is not None:
            self._trainable_rows[adapter] = [r - (r > row) for r in rows if r != row]
        self._apply_row_mask(adapter)

    def get_mixture(self, name: str) -> torch.Tensor:
        """A copy of persona ``name``'s mixture vector, shape (num_codes,)."""
        return self._layer.personamux_mixture[self._adapter][self.persona_index(name)].detach().clone()

    def set_mixture(self, name: str, mixture: torch.Tensor) -> None:
        """Overwrite persona ``name``'s mixture vector."""
        mixture = torch.as_tensor(mixture)
        table = self._layer.personamux_mixture[self._adapter]
        if mixture.shape != (table.shape[1],) or not torch.isfinite(mixture).all():
            raise ValueError(f"mixture must be {table.shape[1]} finite floats, got shape {tuple(mixture.shape)}.")
        with torch.no_grad():
            table[self.persona_index(name)] = mixture.to(table.device, table.dtype)

    def set_persona(self, name: str | None) -> None:
        """Make ``name`` the persona used when a call passes no ``persona_ids`` (None clears it)."""
        if name is not None:
            self.persona_index(name)
        self._active_persona[self._adapter] = name

    @property
    def persona_dir(self) -> str | None:
        """Folder whose ``personas/`` sub-folder ``load_persona(name)``/``save_persona(name)`` use."""
        return self._persona_dir.get(self._adapter)

    @persona_dir.setter
    def persona_dir(self, directory: str | None) -> None:
        self._persona_dir[self._adapter] = None if directory is None else os.fspath(directory)

    def available_persona_files(self) -> dict[str, str]:
        """Persona files found under ``persona_dir``, by name."""
        return list_persona_files(self.persona_dir) if self.persona_dir else {}

    def codebook_fingerprint(self, adapter_name: str | None = None) -> str:
        """Hash of W and b that persona files record (recomputed each call: fused optimizers and ``.data`` writes
        change the tensors without bumping their version counters, so no cache can be trusted)."""
        adapter = adapter_name or self._adapter
        return codebook_fingerprint(self._layer.personamux_codebook[adapter], self._layer.personamux_bias[adapter])

    def save_persona(self, name: str, directory: str | os.PathLike | None = None) -> str:
        """Write ``<directory>/personas/<name>.safetensors`` (directory defaults to the last save/load folder)."""
        directory = directory if directory is not None else self.persona_dir
        if directory is None:
            raise ValueError("No folder to save to: pass `directory`, or call save_pretrained(...) first.")
        row = self.persona_index(name)
        mixture = self._layer.personamux_mixture[self._adapter][row]
        return write_persona_file(persona_path(directory, name), name, mixture, self.codebook_fingerprint())

    def save_personas(
        self, directory: str | os.PathLike, names: Sequence[str] | None = None, adapter_name: str | None = None
    ) -> list[str]:
        """Write persona files for ``names`` (default: every registered persona). Returns the paths."""
        adapter = adapter_name or self._adapter
        table = self._layer.personamux_mixture[adapter].detach()
        registry = self._persona_names[adapter]
        fingerprint = self.codebook_fingerprint(adapter)
        paths = [
            write_persona_file(persona_path(directory, n), n, table[registry.index(n)], fingerprint)
            for n in (registry if names is None else names)
        ]
        self._persona_dir[adapter] = os.fspath(directory)
        return paths

    def load_persona(
        self,
        name_or_path: str | os.PathLike,
        strict: bool = True,
        activate: bool = True,
        overwrite: bool = False,
        name: str | None = None,
    ) -> str:
        """Load a persona by name (from ``persona_dir``, or already registered) or from a ``.safetensors`` file.

        The file is checked first (digest, shape, dtype, finite values, codebook fingerprint; see
        ``persona_files.read_persona_file``). It registers under ``name`` if given, else under the name the file
        records. That name must be free or hold the same values: replacing another mixture needs ``overwrite=True``.
        A load that fails leaves the registry as it was. The persona becomes the active one unless
        ``activate=False``. Returns its name.
        """
        target = os.fspath(name_or_path)
        adapter = self._adapter
        if name is not None:
            validate_persona_name(name)
        if target.endswith(".safetensors") or os.path.isfile(target):
            path = target
        else:
            validate_persona_name(target)
            path = persona_path(self.persona_dir, target) if self.persona_dir else None
            if path is None or not os.path.isfile(path):
                if target in self._persona_names[adapter] and name in (None, target):
                    if activate:
                        self.set_persona(target)
                    return target
                raise KeyError(self._unknown_persona_message(target))
        stored, mixture = read_persona_file(path, self._config().num_codes, self.codebook_fingerprint(), strict=strict)
        name = stored if name is None else name
        table = self._layer.personamux_mixture[adapter]
        values = mixture.to(table.device, table.dtype)
        if not bool(torch.isfinite(values).all()):
            raise PersonaFileError(f"{path}: persona {stored!r} has values that overflow this model's {table.dtype}.")
        registry = self._persona_names[adapter]
        if name in registry and not overwrite and not torch.equal(table[registry.index(name)].detach(), values):
            source = f"persona {stored!r} of {path}" if stored == name else f"{path} (persona {stored!r})"
            raise ValueError(
                f"Persona {name!r} is already registered with other values than {source}. Pass overwrite=True to "
                f"replace it, or name='...' to register the file under another name."
            )
        self.add_personas([name], mixtures=values[None], exist_ok=True)
        if activate:
            self.set_persona(name)
        return name

    # -- bias scale ----------------------------------------------------------------------------------------------

    @property
    def bias_scale(self) -> float:
        return self._bias_scale

    def set_bias_scale(self, scale: float) -> BiasScale:
        """Scale the bias tokens: 1.0 full, 0.5 half, 0 removes them. Also a context manager that restores."""
        previous = self._bias_scale
        self._bias_scale = _check_bias_scale(scale)
        return BiasScale(self, previous)

    # -- training stages -----------------------------------------------------------------------------------------

    def _set_trainable(self, adapter: str, codebook: bool, bias: bool, rows: str | list[int] | None) -> None:
        layer = self._layer
        layer.personamux_codebook[adapter].requires_grad_(codebook)
        layer.personamux_bias[adapter].requires_grad_(bias)
        layer.personamux_mixture[adapter].requires_grad_(rows is not None)
        self._trainable_rows[adapter] = None if rows in (None, "all") else list(rows)
        self._apply_row_mask(adapter)

    def _apply_row_mask(self, adapter: str) -> None:
        handle = self._grad_hooks.pop(adapter, None)
        if handle is not None:
            handle.remove()
        rows = self._trainable_rows[adapter]
        table = self._layer.personamux_mixture[adapter]
        if rows is None or not table.requires_grad:
            return
        mask = torch.zeros(table.shape[0], 1, device=table.device, dtype=table.dtype)
        mask[rows] = 1
        self._grad_hooks[adapter] = table.register_hook(lambda grad: grad * mask)

    def train_bias_only(self) -> None:
        """Stage 1 warm-up: only the bias tokens train; W and every mixture vector are frozen."""
        self._set_trainable(self._adapter, codebook=False, bias=True, rows=None)

    def train_codebook(self) -> None:
        """Stage 1: W, b and every mixture vector train jointly."""
        self._set_trainable(self._adapter, codebook=True, bias=True, rows="all")

    def train_personas(self, names: str | Sequence[str]) -> None:
        """Stage 2: W and b frozen; only the rows of ``names`` receive gradients."""
        names = [names] if isinstance(names, str) else list(names)
        rows = [self.persona_index(n) for n in names]
        self._set_trainable(self._adapter, codebook=False, bias=False, rows=rows)

    def freeze(self) -> None:
        """Nothing trains (inference)."""
        self._set_trainable(self._adapter, codebook=False, bias=False, rows=None)

    # -- forward and generate ------------------------------------------------------------------------------------

    def _resolve_persona_ids(self, persona_ids: PersonaSpec, batch: int, device: torch.device) -> torch.Tensor:
        """Turn names, rows or None into a (batch,) tensor of rows.

        None means the active persona, or when none is active the default persona: the zero mixture (the bias
        tokens followed by zero vectors, the dataset's "average character"), row ``DEFAULT_PERSONA_ROW``.
        """
        if persona_ids is None:
            active = self.active_persona
            if active is None:
                return torch.full((batch,), DEFAULT_PERSONA_ROW, dtype=torch.long, device=device)
            persona_ids = active
        if isinstance(persona_ids, str):
            persona_ids = [persona_ids] * batch
        elif isinstance(persona_ids, int):
            persona_ids = [persona_ids] * batch
        if isinstance(persona_ids, torch.Tensor):
            ids = persona_ids.to(device=device, dtype=torch.long).reshape(-1)
            if persona_ids.is_floating_point():
                raise ValueError(f"`persona_ids` must be integer rows, got dtype {persona_ids.dtype}.")
        else:
            ids = torch.tensor(
                [self.persona_index(p) if isinstance(p, str) else int(p) for p in persona_ids],
                dtype=torch.long,
                device=device,
            )
        if ids.numel() == 1 and batch > 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise ValueError(f"Got {ids.numel()} persona ids for a batch of {batch} rows.")
        bad = ids[(ids < 0) | (ids >= self.num_personas)]
        if bad.numel():
            raise ValueError(
                f"Persona ids {sorted(set(bad.tolist()))} are out of range: {self.num_personas} personas "
                "are registered."
            )
        return ids

    def _num_virtual(self, bias_scale: float) -> int:
        config = self._config()
        return config.tokens_per_code + (config.num_bias_tokens if bias_scale > 0 else 0)

    def _prompt_enabled(self) -> bool:
        """False under ``disable_adapter()`` and once every adapter is deleted: then calls go to the base model."""
        if not any(a in self.peft_config for a in self.active_adapters):
            return False
        layer = self.model.get_input_embeddings()
        return isinstance(layer, PersonaMuxLayer) and not layer.disable_adapters

    @contextlib.contextmanager
    def _request(
        self, persona_ids: torch.Tensor, bias_scale: float, mixtures: torch.Tensor | None = None
    ) -> Iterator[None]:
        layer = self._layer
        layer.request = PromptRequest(persona_ids, bias_scale, mixtures)
        try:
            yield
        finally:
            layer.request = None

    def _prepare(self, input_ids, attention_mask, labels, persona_ids, bias_scale, padding_side: str):
        if not self._prompt_enabled():  # the base model's inputs, exactly as given
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            return Expanded(input_ids, mask, labels, padding_side == "left"), None, 0.0
        config = self._config()
        pad_id = getattr(self.model.config, "pad_token_id", None)
        scale = self._bias_scale if bias_scale is None else _check_bias_scale(bias_scale)
        ids = self._resolve_persona_ids(persona_ids, input_ids.shape[0], input_ids.device)
        expanded = insert_virtual_tokens(
            input_ids,
            attention_mask,
            labels,
            config.placeholder_token_id,
            self._num_virtual(scale),
            padding_side,
            pad_id,
        )
        return expanded, ids, scale

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
        if not self._prompt_enabled():  # disable_adapter() or no adapter left: exactly the base model
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
        expanded, ids, scale = self._prepare(input_ids, attention_mask, labels, persona_ids, bias_scale, "right")
        if position_ids is not None:
            position_ids = positions_from_mask(expanded.attention_mask)
        with self._request(ids, scale):
            return self.model(
                input_ids=expanded.input_ids,
                attention_mask=expanded.attention_mask,
                labels=expanded.labels,
                position_ids=position_ids,
                **kwargs,
            )

    def generate(self, *args, persona_ids: PersonaSpec = None, bias_scale: float | None = None, **kwargs):
        """``generate`` with per-row personas. Returned sequences start with the caller's ``input_ids``."""
        if not self._prompt_enabled():  # disable_adapter() or no adapter left: exactly the base model
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
        expanded, ids, scale = self._prepare(
            input_ids, kwargs.pop("attention_mask", None), None, persona_ids, bias_scale, "left"
        )
        added = expanded.input_ids.shape[1] - input_ids.shape[1]
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += added
        # the placeholder id must never be generated, or a later prefill would treat it as a prompt slot
        suppress = list(
            kwargs.pop("suppress_tokens", None) or getattr(self.model.generation_config, "suppress_tokens", None) or []
        )
        kwargs["suppress_tokens"] = sorted(set(suppress) | {self._config().placeholder_token_id})
        with self._request(ids, scale):
            out = self.model.generate(
                *args, input_ids=expanded.input_ids, attention_mask=expanded.attention_mask, **kwargs
            )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        width = expanded.input_ids.shape[1]
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        restored = torch.cat([prompt.to(sequences.device), sequences[:, width:]], dim=1)
        if isinstance(out, torch.Tensor):
            return restored
        out.sequences = restored
        return out

    # -- serving and persona arithmetic --------------------------------------------------------------------------

    def export_prompt_embeds(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        persona_ids: PersonaSpec = None,
        bias_scale: float | None = None,
    ) -> list[torch.Tensor]:
        """Per-row input embeddings with the soft prompt in place (vLLM ``prompt_embeds``); see ``serving``."""
        from ..serving import export_prompt_embeds

        return export_prompt_embeds(self, input_ids, attention_mask, persona_ids, bias_scale)

    def blend_personas(self, weights: dict[str, float], name: str | None = None) -> str:
        """Register a persona mixed from others, e.g. ``{"hamlet": 0.7, "ophelia": 0.3}``; returns its name."""
        from ..arithmetic import blend_personas

        return blend_personas(self, weights, name)

    def persona_map(self, path: str | os.PathLike = "persona_map.png", names: Sequence[str] | None = None) -> str:
        """Write a PNG of all personas' mixture vectors projected with PCA, labelled with names."""
        from ..arithmetic import persona_map

        return persona_map(self, path, None if names is None else list(names))

    def fit_embedding_map(self, embeddings: dict[str, torch.Tensor], alphas: Sequence[float] | None = None):
        """Ridge map from ``{persona: external embedding}`` to those personas' mixtures (`EmbeddingMap`)."""
        from ..persona_embedding import fit_embedding_map

        return fit_embedding_map(self, embeddings, alphas)

    def persona_from_embedding(self, name: str, embedding: torch.Tensor, embedding_map, exist_ok: bool = False) -> str:
        """Register a zero-shot persona whose mixture ``embedding_map`` predicts from ``embedding``."""
        from ..persona_embedding import persona_from_embedding

        return persona_from_embedding(self, name, embedding, embedding_map, exist_ok)

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
        handle = self._grad_hooks.pop(adapter_name, None)
        if handle is not None:
            handle.remove()
        for state in (self._persona_names, self._active_persona, self._persona_dir, self._trainable_rows):
            state.pop(adapter_name, None)


def as_tuner(model) -> PersonaMuxModel:
    """The ``PersonaMuxModel`` of a Persona-Mux ``PeftModel`` (or the tuner itself)."""
    return model if isinstance(model, PersonaMuxModel) else model.base_model


def _swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> str:
    """Put ``new`` where ``old`` sits in ``model``; returns the module's name."""
    name = next(n for n, m in model.named_modules() if m is old)
    parent, _, child_name = _get_submodules(model, name)
    setattr(parent, child_name, new)
    return name


def _check_bias_scale(scale: float) -> float:
    scale = float(scale)
    if not scale >= 0 or scale == float("inf"):
        raise ValueError(
            f"`bias_scale` must be a finite number >= 0 (1 full, 0.5 half, 0 removes the bias), got {scale!r}."
        )
    return scale


def _default_placeholder_id(model: nn.Module, vocab_size: int) -> int:
    """The largest vocabulary id that is not a special token the model uses for bos/eos/padding."""
    special: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(cfg, key, None)
            special.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return next(i for i in range(vocab_size - 1, -1, -1) if i not in special)


def _init_rows(init: PersonaMuxInit, rows: int, embedding: nn.Module, config: PersonaMuxConfig) -> torch.Tensor:
    """``rows`` initial vectors (rows, hidden) in the space the embedding layer outputs."""
    weight = embedding.weight
    vocab_size = weight.shape[0]
    device = weight.device
    with torch.no_grad():
        if init is PersonaMuxInit.TEXT:
            from transformers import AutoTokenizer

            kwargs = safe_tokenizer_kwargs(config.tokenizer_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"`init_text` {config.init_text!r} has no tokens.")
            ids = torch.tensor((ids * (rows // len(ids) + 1))[:rows], device=device)
            return embedding(ids).float()
        if init is PersonaMuxInit.SAMPLE_VOCAB:
            return embedding(torch.randint(0, vocab_size, (rows,), device=device)).float()
        sample = embedding(torch.randint(0, vocab_size, (min(vocab_size, 4096),), device=device)).float()
        std = sample.std().item() * config.init_std_scale
        return torch.randn(rows, weight.shape[1], device=device) * std
