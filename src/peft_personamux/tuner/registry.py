"""The persona registry of a Persona-Mux tuner: names and rows of the persona table, the active persona, the bias
scale, and which parameters train (the paper's two stages). Mixed into `PersonaMuxModel`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..persona_files import validate_persona_name
from .layer import DEFAULT_PERSONA_ROW

PersonaSpec = str | int | Sequence[str | int] | torch.Tensor | None


class BiasScale(contextlib.AbstractContextManager):
    """Returned by ``set_bias_scale``: the new scale holds until ``__exit__`` (if used with ``with``)."""

    def __init__(self, registry: PersonaRegistry, previous: float) -> None:
        self._registry, self._previous = registry, previous

    def __exit__(self, *exc) -> None:
        self._registry._bias_scale = self._previous


def check_bias_scale(scale: float) -> float:
    """``scale`` as a float; ``ValueError`` unless it is finite and >= 0."""
    scale = float(scale)
    if not scale >= 0 or scale == float("inf"):
        raise ValueError(
            f"`bias_scale` must be a finite number >= 0 (1 full, 0.5 half, 0 removes the bias), got {scale!r}."
        )
    return scale


class PersonaRegistry:
    """Persona names, mixture rows, active persona, bias scale and training stages, per adapter.

    Needs ``personamux_layer`` and ``current_adapter`` from the tuner it is mixed into.
    """

    def init_registry_state(self) -> None:
        """Create the per-adapter tables (once; peft builds the tuner through ``BaseTuner.__init__``)."""
        if "_persona_names" not in self.__dict__:
            self.__dict__["_persona_names"] = {}  # adapter -> names, index = row of the persona table
            self.__dict__["_active_persona"] = {}  # adapter -> name or None
            self.__dict__["_persona_dir"] = {}  # adapter -> folder that holds personas/ (last save or load)
            self.__dict__["_trainable_rows"] = {}  # adapter -> rows that receive gradients, None = all
            self.__dict__["_grad_hooks"] = {}
            self.__dict__["_bias_scale"] = 1.0

    def add_registry(self, adapter_name: str) -> None:
        """An empty registry for a new adapter."""
        self._persona_names[adapter_name] = []
        self._active_persona[adapter_name] = None
        self._trainable_rows[adapter_name] = None

    def drop_registry(self, adapter_name: str) -> None:
        """Forget a deleted adapter's personas and gradient hook."""
        handle = self._grad_hooks.pop(adapter_name, None)
        if handle is not None:
            handle.remove()
        for state in (self._persona_names, self._active_persona, self._persona_dir, self._trainable_rows):
            state.pop(adapter_name, None)

    # -- names and rows ------------------------------------------------------------------------------------------

    @property
    def personas(self) -> list[str]:
        """Registered persona names, in table-row order."""
        return list(self._persona_names[self.current_adapter])

    @property
    def num_personas(self) -> int:
        return len(self._persona_names[self.current_adapter])

    @property
    def active_persona(self) -> str | None:
        return self._active_persona[self.current_adapter]

    def persona_index(self, name: str) -> int:
        """Row of ``name`` in the persona table."""
        names = self._persona_names[self.current_adapter]
        try:
            return names.index(name)
        except ValueError:
            raise KeyError(self.unknown_persona_message(name)) from None

    def unknown_persona_message(self, name: str) -> str:
        """What a ``KeyError`` for ``name`` says: the registered names, and how many files ``persona_dir`` holds."""
        names = self._persona_names[self.current_adapter]
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
        adapter = self.current_adapter
        names = [validate_persona_name(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate persona names in {names}.")
        registry = self._persona_names[adapter]
        existing = [n for n in names if n in registry]
        if existing and not exist_ok:
            raise ValueError(f"Personas already registered: {existing}. Pass exist_ok=True, or use set_mixture().")
        new = [n for n in names if n not in registry]
        layer = self.personamux_layer
        table = layer.personamux_mixture[adapter]
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
            layer.personamux_mixture[adapter] = nn.Parameter(grown, requires_grad=table.requires_grad)
            registry.extend(new)
            self.apply_row_mask(adapter)
        rows = [registry.index(n) for n in names]
        if mixtures is not None:
            with torch.no_grad():
                layer.personamux_mixture[adapter][rows] = mixtures.to(table.device, table.dtype)
        return rows

    def add_persona(self, name: str, mixture: torch.Tensor | None = None, exist_ok: bool = False) -> int:
        """Register one persona; its mixture starts at zero unless given. Returns its row."""
        return self.add_personas([name], None if mixture is None else torch.as_tensor(mixture)[None], exist_ok)[0]

    def remove_persona(self, name: str) -> None:
        """Drop a persona from the table (later rows move up by one)."""
        adapter = self.current_adapter
        row = self.persona_index(name)
        layer = self.personamux_layer
        table = layer.personamux_mixture[adapter]
        keep = [i for i in range(table.shape[0]) if i != row]
        layer.personamux_mixture[adapter] = nn.Parameter(table.data[keep].clone(), requires_grad=table.requires_grad)
        self._persona_names[adapter].pop(row)
        if self._active_persona[adapter] == name:
            self._active_persona[adapter] = None
        rows = self._trainable_rows[adapter]
        if rows is not None:
            self._trainable_rows[adapter] = [r - (r > row) for r in rows if r != row]
        self.apply_row_mask(adapter)

    def mixture_table(self, adapter_name: str | None = None) -> nn.Parameter:
        """The persona table (num_personas, num_codes) of ``adapter_name`` (default: the current adapter)."""
        return self.personamux_layer.personamux_mixture[adapter_name or self.current_adapter]

    def get_mixture(self, name: str) -> torch.Tensor:
        """A copy of persona ``name``'s mixture vector, shape (num_codes,)."""
        return self.mixture_table()[self.persona_index(name)].detach().clone()

    def set_mixture(self, name: str, mixture: torch.Tensor) -> None:
        """Overwrite persona ``name``'s mixture vector."""
        mixture = torch.as_tensor(mixture)
        table = self.mixture_table()
        if mixture.shape != (table.shape[1],) or not torch.isfinite(mixture).all():
            raise ValueError(f"mixture must be {table.shape[1]} finite floats, got shape {tuple(mixture.shape)}.")
        with torch.no_grad():
            table[self.persona_index(name)] = mixture.to(table.device, table.dtype)

    def set_persona(self, name: str | None) -> None:
        """Make ``name`` the persona used when a call passes no ``persona_ids`` (None clears it)."""
        if name is not None:
            self.persona_index(name)
        self._active_persona[self.current_adapter] = name

    def resolve_persona_ids(self, persona_ids: PersonaSpec, batch: int, device: torch.device) -> torch.Tensor:
        """Turn names, rows or None into a (batch,) tensor of rows.

        None means the active persona, or when none is active the default persona: the zero mixture (the bias
        tokens followed by zero vectors, the dataset's "average character"), row ``DEFAULT_PERSONA_ROW``.
        """
        if persona_ids is None:
            active = self.active_persona
            if active is None:
                return torch.full((batch,), DEFAULT_PERSONA_ROW, dtype=torch.long, device=device)
            persona_ids = active
        if isinstance(persona_ids, (str, int)):
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

    # -- bias scale ----------------------------------------------------------------------------------------------

    @property
    def bias_scale(self) -> float:
        return self._bias_scale

    def set_bias_scale(self, scale: float) -> BiasScale:
        """Scale the bias tokens: 1.0 full, 0.5 half, 0 removes them. Also a context manager that restores."""
        previous = self._bias_scale
        self._bias_scale = check_bias_scale(scale)
        return BiasScale(self, previous)

    # -- training stages -----------------------------------------------------------------------------------------

    def set_trainable(self, adapter: str, codebook: bool, bias: bool, rows: str | list[int] | None) -> None:
        """Which of W, b and the table's rows (``"all"``, a list of rows, or None) receive gradients."""
        layer = self.personamux_layer
        layer.personamux_codebook[adapter].requires_grad_(codebook)
        layer.personamux_bias[adapter].requires_grad_(bias)
        layer.personamux_mixture[adapter].requires_grad_(rows is not None)
        self._trainable_rows[adapter] = None if rows in (None, "all") else list(rows)
        self.apply_row_mask(adapter)

    def apply_row_mask(self, adapter: str) -> None:
        """(Re)attach the gradient hook that zeroes the rows that do not train (after the table was replaced)."""
        handle = self._grad_hooks.pop(adapter, None)
        if handle is not None:
            handle.remove()
        rows = self._trainable_rows[adapter]
        table = self.personamux_layer.personamux_mixture[adapter]
        if rows is None or not table.requires_grad:
            return
        mask = torch.zeros(table.shape[0], 1, device=table.device, dtype=table.dtype)
        mask[rows] = 1
        self._grad_hooks[adapter] = table.register_hook(lambda grad: grad * mask)

    def train_bias_only(self) -> None:
        """Stage 1 warm-up: only the bias tokens train; W and every mixture vector are frozen."""
        self.set_trainable(self.current_adapter, codebook=False, bias=True, rows=None)

    def train_codebook(self) -> None:
        """Stage 1: W, b and every mixture vector train jointly."""
        self.set_trainable(self.current_adapter, codebook=True, bias=True, rows="all")

    def train_personas(self, names: str | Sequence[str]) -> None:
        """Stage 2: W and b frozen; only the rows of ``names`` receive gradients."""
        names = [names] if isinstance(names, str) else list(names)
        rows = [self.persona_index(n) for n in names]
        self.set_trainable(self.current_adapter, codebook=False, bias=False, rows=rows)

    def freeze(self) -> None:
        """Nothing trains (inference)."""
        self.set_trainable(self.current_adapter, codebook=False, bias=False, rows=None)
