"""`PersonaMuxTrainer`: the `Trainer` subclass both stages use; it overrides only what differs."""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer

from ..compiled_layers import compiled_decoder_layers, eager_decoder_layers, resumed_layers
from ..loss import LossOptions, PrefixCache, choose_attention, choose_autocast, mean_response_loss
from ..persona_files import list_persona_files
from ..sampling import PersonaBatchSampler, row_lengths
from ..weight_casts import drop_casts

logger = logging.getLogger(__name__)

# Dataset columns the collator reads. Trainer keeps only columns named by the base model's forward unless told.
KEPT_COLUMNS = ("persona", "persona_ids", "prompt", "response", "text_persona")
FAST_LOSS_KEY = "personamux_fast_loss"  # log_history entry: the fast loss's autocast choice, kept for a resume


def _is_mixture(parameter_name: str) -> bool:
    return "personamux_mixture" in parameter_name or ".mixture." in parameter_name


def load_persona_files(model, directory: str | os.PathLike) -> list[str]:
    """Load every persona file under ``directory/personas/`` into ``model`` (registering new names). Returns them."""
    names = []
    for name, path in list_persona_files(directory).items():
        model.load_persona(path, activate=False, overwrite=True)  # a checkpoint replaces what is registered
        names.append(name)
    return names


def autocast_dtype(args, device: torch.device | str) -> torch.dtype | None:
    """The fast loss's autocast dtype for training arguments ``args`` on ``device``: bf16 under ``--bf16``, else
    ``args.autocast`` ('auto' measures this CPU); None: the weights' dtype."""
    if args.bf16 and args.autocast == "auto":
        return torch.bfloat16
    return choose_autocast(device, args.autocast)


_CHOOSE = object()  # `fast_loss_options`: choose the autocast dtype from the arguments and this machine
AUTOCAST_NAMES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # as recorded in log_history


def fast_loss_options(args, device: torch.device | str, dtype: torch.dtype | None | object = _CHOOSE) -> LossOptions:
    """The fast loss's options for training arguments ``args`` on ``device`` (autocast and attention choice);
    ``dtype`` fixes the autocast dtype (a resumed run's recorded one) instead of choosing it."""
    if dtype is _CHOOSE:
        dtype = autocast_dtype(args, device)
    compiled = bool(getattr(args, "compile_layers", False))
    return LossOptions(
        autocast_dtype=dtype,
        attention=choose_attention(device, dtype, getattr(args, "attention", "auto")),
        compiled_head=compiled,  # compiled with the layers or the body
        compiled_body=compiled and getattr(args, "compile_scope", "layers") == "body",
    )


def fast_loss_record(options: LossOptions, args, device_type: str) -> dict:
    """The ``log_history`` record of a fast-loss choice (`PersonaMuxTrainer.loss_options`)."""
    dtype = options.autocast_dtype
    return {
        "autocast": str(dtype).removeprefix("torch.") if dtype else None,
        "device": device_type,
        "mode": "bf16" if args.bf16 and args.autocast == "auto" else args.autocast,
    }


def recorded_autocast(record: dict) -> torch.dtype | None:
    """The autocast dtype of a ``log_history`` record; a clear error for an edited or foreign trainer_state.json."""
    name = record.get("autocast") if isinstance(record, dict) else record
    if not isinstance(record, dict) or name not in AUTOCAST_NAMES:
        raise ValueError(
            f"`{FAST_LOSS_KEY}.autocast` in the checkpoint's trainer_state.json must be one of "
            f"{sorted(AUTOCAST_NAMES, key=str)}, got {name!r}; remove that log_history entry to choose again."
        )
    return AUTOCAST_NAMES[name]


class PersonaMuxTrainer(Trainer):
    """`Trainer` that keeps the persona columns, restores persona files when resuming, computes the loss with
    `loss.response_nll` (``fast_loss``), gives the mixture table its own learning rate and orders batches by
    persona and length when asked."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not getattr(self.args, "fast_loss", False) or return_outputs or self.args.world_size > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # DDP needs its forward
        if getattr(self, "_prefix_cache", None) is None:
            self._prefix_cache = PrefixCache()
        model = self.accelerator.unwrap_model(model)
        options = self.loss_options()
        if not getattr(self, "_in_training_step", False):  # evaluation: nothing compiled for one pass (see `train`)
            options = options.eager()
        return mean_response_loss(model, inputs, num_items_in_batch, options=options, prefix_cache=self._prefix_cache)

    def train(self, *args, **kwargs):
        self._loss_options = None  # chosen again once the (resumed) state is loaded: see `loss_options`
        try:
            if not getattr(self.args, "compile_layers", False) or self.args.compile_scope != "layers":
                return super().train(*args, **kwargs)
            # compiled only inside training steps (`training_step`; so are the head and, with compile_scope 'body',
            # the body: `compute_loss`): evaluation and callbacks (the identity diagnostic) run without gradient and
            # would compile graphs of their own, for minutes, for one pass
            with compiled_decoder_layers(self.model), eager_decoder_layers(self.model) as self._compiled_layers:
                return super().train(*args, **kwargs)
        finally:
            self._compiled_layers = ()
            drop_casts(self.model)  # the fast loss's bf16 weight copies are for training steps only

    def training_step(self, *args, **kwargs):
        self._in_training_step = True
        try:
            with resumed_layers(getattr(self, "_compiled_layers", ())):  # `compile_layers`: see `train`
                return super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False

    def loss_options(self) -> LossOptions:
        """The fast loss's options: autocast dtype and attention implementation (`fast_loss_options`), chosen at a
        run's first step and recorded in ``state.log_history`` (so in every checkpoint's trainer_state.json) when
        they differ from the last record. A run resumed from a checkpoint with ``autocast="auto"`` (and no
        ``--bf16``) takes the last choice recorded on this device type instead of timing this CPU again, so that a
        CPU near the bf16 threshold cannot train the rest of the run in another precision. (A record's ``mode``
        says which setting made it, for a reader of trainer_state.json.)"""
        options = getattr(self, "_loss_options", None)
        if options is not None:
            return options
        device_type = torch.device(self.args.device).type
        records = [e[FAST_LOSS_KEY] for e in self.state.log_history if FAST_LOSS_KEY in e]
        recorded = records[-1] if records else None
        here = next((r for r in reversed(records) if not isinstance(r, dict) or r.get("device") == device_type), None)
        auto = self.args.autocast == "auto" and not self.args.bf16
        if here is not None and auto:
            options = fast_loss_options(self.args, self.args.device, recorded_autocast(here))
            logger.info("Fast loss as recorded in the checkpoint: %s.", options)
        else:
            options = fast_loss_options(self.args, self.args.device)
            logger.info("Fast loss: %s.", options)
        record = fast_loss_record(options, self.args, device_type)
        # a fresh run, or a resume that changed precision: the next resume keeps this segment's choice
        if not isinstance(recorded, dict) or any(recorded.get(key) != record[key] for key in ("autocast", "device")):
            self.state.log_history.append({FAST_LOSS_KEY: record, "step": self.state.global_step})
        self._loss_options = options
        return options

    def create_optimizer(self, model=None):
        rate = getattr(self.args, "mixture_learning_rate", None)
        if rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        mixture = [p for n, p in opt_model.named_parameters() if p.requires_grad and _is_mixture(n)]
        shared = [p for n, p in opt_model.named_parameters() if p.requires_grad and not _is_mixture(n)]
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        groups = [{"params": shared, "lr": self.args.learning_rate}, {"params": mixture, "lr": rate}]
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        per_batch = getattr(self.args, "personas_per_batch", None)
        grouped = getattr(self.args, "length_grouped", False)
        if (per_batch is None and not grouped) or dataset is None or "persona" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        return PersonaBatchSampler(
            dataset["persona"],
            self.args.per_device_train_batch_size,
            per_batch,
            row_lengths(dataset) if grouped else None,
            seed=self.args.seed,
        )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # The base model's forward names none of these, so remove_unused_columns=True would drop them and every
        # row would silently train the active persona.
        self._signature_columns += [c for c in KEPT_COLUMNS if c not in self._signature_columns]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The adapter file holds W and b only; the mixture table lives in the checkpoint's persona files.
        names = load_persona_files(self.model, resume_from_checkpoint)
        logger.info("Restored %d personas from %s.", len(names), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        load_persona_files(self.model, self.state.best_model_checkpoint)
