"""Training with `transformers.Trainer`: stage 1 pretrains the codebook, stage 2 fits the mixtures of new personas.

Stage 1 (`pretrain_codebook`, paper "Training"): every persona of the dataset gets a row of the mixture table, all at
zero. For ``warmup_epochs`` only the bias tokens train; then W, b and every mixture train jointly
(`StageSwitchCallback`). Stage 2 (`fit_personas`): W and b are frozen and only the mixture vectors of the new
personas train, from zero, full batch, 100 steps (paper, "Implementation details"). Both use Adam with
``eps=1e-4`` and no weight decay, and write persona files beside the adapter in every save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .collator import PersonaMuxCollator
from .diagnostics import IdentityDiagnosticCallback
from .loss import LossOptions, PrefixCache, choose_autocast, mean_response_loss, response_nll
from .persona_files import list_persona_files
from .prompting import DEFAULT_INSTRUCTION
from .sampling import PersonaBatchSampler, row_lengths

logger = logging.getLogger(__name__)

# Dataset columns the collator reads. Trainer keeps only columns named by the base model's forward unless told.
KEPT_COLUMNS = ("persona", "persona_ids", "prompt", "response", "text_persona")
LOSS_LOG_NAME = "loss_log.jsonl"
LOSS_CURVE_NAME = "loss_curve.png"
STAGE_KEY = "personamux_stage"  # log_history entries that mark a stage switch


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class PersonaMuxTrainingArguments(TrainingArguments):
    """`TrainingArguments` with Persona-Mux defaults (paper: Adam, eps 1e-4, half precision) and prompt options."""

    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Adam learning rate. 1e-3 (torch's Adam default, as in the paper) suits soft prompts."},
    )
    adam_epsilon: float = field(
        default=1e-4,
        metadata={"help": "Adam epsilon. The paper uses 1e-4: it keeps half-precision updates of tiny grads stable."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "Keep 0: decoupled decay would also shrink mixture rows that are not training."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. None (default): on when training on a CUDA GPU with bf16 support and "
            "neither fp16 nor use_cpu is set.",
            "nargs": "?",  # a bare --bf16 means True, as for TrainingArguments' own optional booleans
            "const": True,
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every this many optimizer steps."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"],
        metadata={"help": "Batch keys holding labels (the collator writes `labels`)."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=True,
        metadata={
            "help": "Needed under DDP: W and the mixtures are frozen during the warm-up, so they get no gradient."
        },
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction in every user turn, after the persona."}
    )
    max_prompt_tokens: int | None = field(
        default=256,
        metadata={"help": "Longer prompts lose the start of the prompt text first; the placeholder always stays."},
    )
    max_response_tokens: int | None = field(
        default=128, metadata={"help": "Responses are cut to this many tokens (labels included)."}
    )
    loss_log: bool = field(
        default=True,
        metadata={"help": f"Write {LOSS_LOG_NAME} while training and {LOSS_CURVE_NAME} at the end in output_dir."},
    )
    fast_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss with `loss.response_nll`: logits only at response tokens and the text before "
            "the soft prompt run once without gradient. Same loss and gradients as the plain forward (tested); "
            "about 1.3-2x faster per example on CPU (benchmarks/train_speed.py). Off under multi-process DDP."
        },
    )
    autocast: str = field(
        default="auto",
        metadata={
            "help": "Autocast of the fast loss: 'auto' (bf16 with --bf16, or on a CPU whose bf16 matmul measures "
            ">= 1.25x float32), 'bf16', or 'no'."
        },
    )
    mixture_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the persona mixture table (its own Adam group). None: learning_rate. In stage 1 "
            "a row only learns from its own persona's lines, so it is updated far less often than W and b; a "
            "larger rate (e.g. 10x) lets rows move as far as the shared weights."
        },
    )
    personas_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Stage 1: each batch holds lines of this many personas (batch_size / personas_per_batch lines "
            "each), so every touched mixture row sees several lines per step. None: random lines."
        },
    )
    length_grouped: bool = field(
        default=False,
        metadata={"help": "Batch lines of similar length together (less padding); the batch order stays random."},
    )

    def __post_init__(self) -> None:
        if self.bf16 is None:  # the paper trains in half precision; on CPU the fast loss's `autocast` decides
            self.bf16 = _cuda_bf16() and not self.fp16 and not self.use_cpu
        super().__post_init__()
        for name in ("max_prompt_tokens", "max_response_tokens", "personas_per_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if self.autocast not in ("auto", "bf16", "no"):
            raise ValueError(f"`autocast` must be 'auto', 'bf16' or 'no', got {self.autocast!r}.")
        if self.mixture_learning_rate is not None and not self.mixture_learning_rate > 0:
            raise ValueError(f"`mixture_learning_rate` must be positive or None, got {self.mixture_learning_rate!r}.")


@dataclass
class CodebookTrainingArguments(PersonaMuxTrainingArguments):
    """Stage 1: codebook pretraining."""

    warmup_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Epochs during which only the bias tokens train (mixtures stay 0, W frozen). The paper uses 1: it "
            "keeps the codes from all learning the same component and makes zero mixtures a good starting point."
        },
    )
    num_train_epochs: float = field(
        default=3.0, metadata={"help": "Total epochs, warm-up included (warm-up 1 + 2 joint epochs by default)."}
    )
    gradient_codebook: bool = field(
        default=False,
        metadata={
            "help": "At the end of the warm-up, replace the noise codebook by the principal directions of the "
            "per-persona gradients w.r.t. the mixed tokens (`codebook_init`; one forward+backward pass over "
            "gradient_codebook_lines lines per persona). Beyond the paper: see docs/results.md for its ablation."
        },
    )
    gradient_codebook_lines: int = field(
        default=8, metadata={"help": "Lines per persona for the gradient codebook's pass."}
    )
    identity_every: int = field(
        default=0,
        metadata={
            "help": "Log the persona-identity diagnostic (`diagnostics`: held-out loss with each persona's own "
            "mixture vs another's) every this many steps; 0 turns it off. Its lines are held out of training."
        },
    )
    identity_lines: int = field(default=2, metadata={"help": "Held-out lines per persona for the diagnostic."})
    identity_personas: int = field(default=64, metadata={"help": "Personas the diagnostic uses (at most)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.warmup_epochs >= 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {self.warmup_epochs!r}.")
        for name in ("gradient_codebook_lines", "identity_lines", "identity_personas"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.identity_every < 0:
            raise ValueError(f"`identity_every` must be >= 0, got {self.identity_every!r}.")


@dataclass
class PersonaFitArguments(PersonaMuxTrainingArguments):
    """Stage 2: fit the mixture vectors of new personas on a frozen codebook."""

    max_steps: int = field(
        default=100, metadata={"help": "Optimizer steps; each step sees every example once (paper: 100)."}
    )
    learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Adam learning rate of the mixture weights (paper: Adam defaults, 1e-3, for 100 steps). Raise it "
            "when taking far fewer steps."
        },
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning rate schedule."})
    save_strategy: str = field(
        default="no", metadata={"help": "Checkpoints are rarely worth it for 100 steps of a few hundred weights."}
    )
    max_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Largest forward batch per device. None: all examples at once. Smaller values split the full "
            "batch with gradient accumulation (same update, less memory)."
        },
    )
    reset_mixtures: bool = field(
        default=True, metadata={"help": "Start every persona from a zero mixture, as in the paper."}
    )
    fit_method: str = field(
        default="adam",
        metadata={
            "help": "'adam': the paper's recipe through the Trainer (max_steps full-batch Adam steps). 'fisher': "
            "fisher_steps Levenberg-Marquardt steps on per-example gradients (fitting.fit_mixtures), about 14x fewer "
            "example passes; see docs/fitting.md and docs/results.md before choosing."
        },
    )
    fisher_steps: int = field(
        default=6, metadata={"help": "Steps of fit_method='fisher' (one pass over the data each)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fit_method not in ("adam", "fisher"):
            raise ValueError(f"`fit_method` must be 'adam' or 'fisher', got {self.fit_method!r}.")
        if not isinstance(self.fisher_steps, int) or self.fisher_steps < 1:
            raise ValueError(f"`fisher_steps` must be a positive integer, got {self.fisher_steps!r}.")
        if self.weight_decay != 0:
            raise ValueError(
                f"`weight_decay` must be 0 when fitting personas (it would shrink the other personas' rows), got "
                f"{self.weight_decay!r}."
            )
        if self.max_micro_batch_size is not None and self.max_micro_batch_size < 1:
            raise ValueError(f"`max_micro_batch_size` must be a positive integer, got {self.max_micro_batch_size!r}.")


# -- trainer ---------------------------------------------------------------------------------------------------------


def _is_mixture(parameter_name: str) -> bool:
    return "personamux_mixture" in parameter_name or ".mixture." in parameter_name


def load_persona_files(model, directory: str | os.PathLike) -> list[str]:
    """Load every persona file under ``directory/personas/`` into ``model`` (registering new names). Returns them."""
    names = []
    for name, path in list_persona_files(directory).items():
        model.load_persona(path, activate=False, overwrite=True)  # a checkpoint replaces what is registered
        names.append(name)
    return names


class PersonaMuxTrainer(Trainer):
    """`Trainer` that keeps the persona columns, restores persona files when resuming, computes the loss with
    `loss.response_nll` (``fast_loss``), gives the mixture table its own learning rate and orders batches by
    persona and length when asked."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not getattr(self.args, "fast_loss", False) or return_outputs or self.args.world_size > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # DDP needs its forward
        if getattr(self, "_loss_options", None) is None:
            self._loss_options = LossOptions(autocast_dtype=self._autocast_dtype())
            self._prefix_cache = PrefixCache()
            logger.info("Fast loss: %s.", self._loss_options)
        model = self.accelerator.unwrap_model(model)
        return mean_response_loss(
            model, inputs, num_items_in_batch, options=self._loss_options, prefix_cache=self._prefix_cache
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.args.bf16 and self.args.autocast == "auto":
            return torch.bfloat16
        return choose_autocast(self.args.device, self.args.autocast)

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


class StageSwitchCallback(TrainerCallback):
    """Stage 1 schedule: bias only for ``warmup_epochs``, then W, b and all mixtures.

    The optimizer must be built while everything requires grad (`build_codebook_trainer` does it); frozen
    parameters then get no gradient, and Adam skips them until the switch.
    """

    def __init__(self, warmup_epochs: float = 1.0, on_switch: Callable[[Any], dict] | None = None) -> None:
        if not warmup_epochs >= 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs!r}.")
        self.warmup_epochs = warmup_epochs
        self.on_switch = on_switch  # run once when the joint stage starts in this run (not on resume past it)
        self.in_warmup: bool | None = None

    def _apply(self, model, state, warmup: bool, fresh: bool = True) -> None:
        if warmup == self.in_warmup:
            return
        if warmup:
            model.train_bias_only()
        else:
            model.train_codebook()
        self.in_warmup = warmup
        stage = "bias_warmup" if warmup else "codebook"
        state.log_history.append({STAGE_KEY: stage, "step": state.global_step, "epoch": state.epoch or 0.0})
        logger.info("Persona-Mux stage 1: %s from step %d.", stage, state.global_step)
        if not warmup and fresh and self.on_switch is not None:
            state.log_history.append({"step": state.global_step, **self.on_switch(model)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.in_warmup = None
        # on resume, epoch is restored; a run resumed inside the joint stage already has its codebook start
        self._apply(model, state, (state.epoch or 0.0) < self.warmup_epochs, fresh=state.global_step == 0)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.in_warmup and (state.epoch or 0.0) >= self.warmup_epochs:
            self._apply(model, state, False)


class TrainPersonasCallback(TrainerCallback):
    """Stage 2: only the rows of ``names`` train (applied again at train begin, after any checkpoint load)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.train_personas(self.names)


class LossLogCallback(TrainerCallback):
    """Append every log entry to ``output_dir/loss_log.jsonl``; plot ``loss_curve.png`` when training ends."""

    def __init__(self, log_name: str = LOSS_LOG_NAME, plot_name: str = LOSS_CURVE_NAME, title: str = "") -> None:
        self.log_name, self.plot_name, self.title = log_name, plot_name, title

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or not args.output_dir:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(args.output_dir, self.log_name), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and args.output_dir:
            plot_loss_curve(state.log_history, os.path.join(args.output_dir, self.plot_name), self.title)


def plot_loss_curve(log_history: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str | None:
    """Plot training (and eval) loss against the step, with stage switches as vertical lines. Returns the path."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone, renders with Agg

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        logger.info("No loss was logged (fewer steps than logging_steps?); no loss curve written.")
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    for entry in log_history:
        if STAGE_KEY in entry and entry["step"] > 0:
            ax.axvline(entry["step"], color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                entry[STAGE_KEY],
                (entry["step"], 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(3, 0),
                textcoords="offset points",
                va="top",
                fontsize=8,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token loss")
    ax.set_title(title or "Persona-Mux training")
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# -- stage 1 ---------------------------------------------------------------------------------------------------------


def personas_in(*datasets) -> list[str]:
    """Sorted persona names of one or more datasets (sorted, so every process builds the same table)."""
    names: set[str] = set()
    for ds in datasets:
        if ds is not None:
            names.update(ds["persona"])
    return sorted(names)


def _collator(model, tokenizer, args: PersonaMuxTrainingArguments, text_personas) -> PersonaMuxCollator:
    return PersonaMuxCollator.for_model(
        model,
        tokenizer,
        text_personas=text_personas,
        instruction=args.instruction,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens,
    )


def build_codebook_trainer(
    model,
    tokenizer,
    dataset,
    args: CodebookTrainingArguments,
    text_personas: Mapping[str, str] | None = None,
    eval_dataset=None,
    callbacks: Sequence[TrainerCallback] = (),
    identity_dataset=None,
) -> PersonaMuxTrainer:
    """A stage 1 trainer: registers every persona of ``dataset`` (and ``eval_dataset``), all at zero.

    ``identity_dataset``: held-out lines of those personas for the identity diagnostic (``args.identity_every``).
    """
    model.add_personas(personas_in(dataset, eval_dataset, identity_dataset), exist_ok=True)
    model.train_codebook()  # the optimizer is built from what requires grad: W, b and the whole mixture table
    collator = _collator(model, tokenizer, args, text_personas)
    extra: list[TrainerCallback] = [LossLogCallback(title="Persona-Mux codebook pretraining")] if args.loss_log else []
    if identity_dataset is not None and getattr(args, "identity_every", 0) > 0:
        extra.append(IdentityDiagnosticCallback(_batches(identity_dataset, collator, 16), args.identity_every))
    on_switch = None
    if getattr(args, "gradient_codebook", False):
        lines = _first_lines(dataset, args.gradient_codebook_lines)
        on_switch = lambda m: _gradient_codebook(m, _batches(lines, collator, 16), trainer)  # noqa: E731
    trainer = PersonaMuxTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[StageSwitchCallback(getattr(args, "warmup_epochs", 1.0), on_switch), *extra, *callbacks],
    )
    return trainer


def _batches(dataset, collator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _first_lines(dataset, per_persona: int):
    """The first ``per_persona`` rows of each persona (a subset for the gradient codebook's pass)."""
    seen: Counter = Counter()
    keep = []
    for index, name in enumerate(dataset["persona"]):
        if seen[name] < per_persona:
            keep.append(index)
            seen[name] += 1
    return dataset.select(keep)


def _gradient_codebook(model, batches, trainer: PersonaMuxTrainer) -> dict:
    from .codebook_init import init_codebook_from_gradients

    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    options = LossOptions(autocast_dtype=trainer._autocast_dtype())
    init = init_codebook_from_gradients(model, batches, options, progress=not trainer.args.disable_tqdm)
    return {
        "gradient_codebook_explained": round(init.explained, 5),
        "gradient_codebook_explained_random": round(init.explained_random, 5),
        "gradient_codebook_passes": init.example_passes,
    }


def split_identity_lines(dataset, lines: int, personas: int, seed: int = 0):
    """``(train, held_out)``: the last ``lines`` rows of up to ``personas`` personas (those with at least
    ``lines + 4`` rows, spread over the sorted names) move to ``held_out`` for the identity diagnostic."""
    counts = Counter(dataset["persona"])
    eligible = sorted(n for n, c in counts.items() if c >= lines + 4)
    if len(eligible) < 2:
        raise ValueError(f"The identity diagnostic needs 2 personas with at least {lines + 4} lines.")
    chosen = set(eligible[:: max(1, len(eligible) // personas)][:personas])
    seen: Counter = Counter()
    held = set()
    names = dataset["persona"]
    for index in range(len(names) - 1, -1, -1):
        name = names[index]
        if name in chosen and seen[name] < lines:
            held.add(index)
            seen[name] += 1
    train = [i for i in range(len(names)) if i not in held]
    return dataset.select(train), dataset.select(sorted(held))


def pretrain_codebook(
    model,
    tokenizer,
    dataset,
    args: CodebookTrainingArguments,
    text_personas: Mapping[str, str] | None = None,
    eval_dataset=None,
    callbacks: Sequence[TrainerCallback] = (),
) -> PersonaMuxTrainer:
    """Stage 1: train the codebook, bias and one mixture per persona of ``dataset``; save to ``args.output_dir``.

    Resumes from ``args.resume_from_checkpoint`` when set (a path, or True for the last checkpoint). Afterwards the
    model is frozen, and ``output_dir`` holds the adapter (W and b) and ``personas/<name>.safetensors``.
    """
    identity = None
    if getattr(args, "identity_every", 0) > 0:
        dataset, identity = split_identity_lines(dataset, args.identity_lines, args.identity_personas, args.seed)
    trainer = build_codebook_trainer(
        model, tokenizer, dataset, args, text_personas, eval_dataset, callbacks, identity_dataset=identity
    )
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "1"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    model.freeze()
    # model.save_pretrained rather than trainer.save_model: the codebook folder gets no tokenizer copy and no
    # pickled training_args.bin, only adapter_config.json, adapter_model.safetensors and personas/
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        model.save_pretrained(args.output_dir)
    return trainer


# -- stage 2 ---------------------------------------------------------------------------------------------------------


def full_batch_arguments(args: PersonaFitArguments, num_examples: int) -> PersonaFitArguments:
    """Copy of ``args`` whose every optimizer step sees all ``num_examples`` (micro-batches accumulate if capped)."""
    if num_examples < 1:
        raise ValueError("The dataset to fit personas on is empty.")
    per_device = math.ceil(num_examples / max(1, args.world_size))
    micro = min(per_device, args.max_micro_batch_size or per_device)
    return dataclasses.replace(
        args,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=math.ceil(per_device / micro),
    )


def _register_for_fit(model, dataset, args: PersonaFitArguments) -> list[str]:
    """Register the personas of ``dataset`` (zeroed when ``args.reset_mixtures``); returns their names."""
    names = personas_in(dataset)
    model.add_personas(names, exist_ok=True)
    if args.reset_mixtures:
        for name in names:
            model.set_mixture(name, torch.zeros_like(model.get_mixture(name)))
    return names


def build_fit_trainer(
    model,
    tokenizer,
    dataset,
    args: PersonaFitArguments,
    text_personas: Mapping[str, str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> PersonaMuxTrainer:
    """A stage 2 trainer for the personas of ``dataset``: registered (from zero), only their rows train."""
    names = _register_for_fit(model, dataset, args)
    model.train_personas(names)  # W and b frozen: the optimizer holds only the mixture table
    extra = [LossLogCallback(title="Persona-Mux persona fitting")] if args.loss_log else []
    return PersonaMuxTrainer(
        model=model,
        args=full_batch_arguments(args, len(dataset)),
        train_dataset=dataset,
        data_collator=_collator(model, tokenizer, args, text_personas),
        callbacks=[TrainPersonasCallback(names), *extra, *callbacks],
    )


def fit_personas(
    model,
    tokenizer,
    dataset,
    args: PersonaFitArguments,
    eval_dataset=None,
    text_personas: Mapping[str, str] | None = None,
    save_dir: str | os.PathLike | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, dict[str, Any]]:
    """Stage 2: fit the mixture vectors of every persona in ``dataset`` at once; W and b stay frozen.

    Each optimizer step sees all examples (full batch), so fitting many personas costs the same per example as one.
    Persona files go to ``save_dir`` (default ``args.output_dir``; pass the codebook folder to keep them beside it).
    Returns, per persona: ``train_examples``, ``file``, and with ``eval_dataset`` the held-out mean token loss
    ``loss_before``/``loss_after`` and ``eval_examples``.
    """
    names = personas_in(dataset)
    eval_kwargs = {
        "text_personas": text_personas,
        "instruction": args.instruction,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_response_tokens": args.max_response_tokens,
        "batch_size": args.per_device_eval_batch_size,
    }
    heldout = set(eval_dataset["persona"]) if eval_dataset is not None else set()
    eval_names = [n for n in names if n in heldout]
    if args.fit_method == "fisher":
        _register_for_fit(model, dataset, args)
        fit = lambda: _fit_fisher(model, tokenizer, dataset, args, text_personas)  # noqa: E731
    else:
        fit = build_fit_trainer(model, tokenizer, dataset, args, text_personas, callbacks).train
    before = evaluate_loss(model, tokenizer, eval_dataset, eval_names, **eval_kwargs) if eval_names else {}
    fit()
    model.freeze()
    after = evaluate_loss(model, tokenizer, eval_dataset, eval_names, **eval_kwargs) if eval_names else {}
    directory = os.fspath(save_dir if save_dir is not None else args.output_dir)
    paths = dict(zip(names, model.save_personas(directory, names=names))) if args.should_save else {}
    train_counts = Counter(dataset["persona"])
    eval_counts = Counter(eval_dataset["persona"]) if eval_dataset is not None else Counter()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = {"train_examples": train_counts[name], "file": paths.get(name)}
        if name in before:
            results[name].update(eval_examples=eval_counts[name], loss_before=before[name], loss_after=after[name])
    return results


def _fit_fisher(model, tokenizer, dataset, args: PersonaFitArguments, text_personas) -> None:
    """``fit_method='fisher'``: the whole dataset as one batch for `fitting.fit_mixtures` (chunked forward passes)."""
    from .fitting import fit_mixtures

    rows = [dict(zip(dataset.column_names, values)) for values in zip(*(dataset[c] for c in dataset.column_names))]
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) for k, v in _collator(model, tokenizer, args, text_personas)(rows).items()}
    fit = fit_mixtures(
        model,
        batch,
        method="fisher",
        steps=args.fisher_steps,
        chunk_size=args.max_micro_batch_size or 16,
        progress=not args.disable_tqdm,
    )
    logger.info(
        "Fisher fit: %d example passes in %.1f s, train loss %.4f -> %.4f.",
        fit.example_passes,
        fit.seconds,
        fit.losses[0],
        fit.losses[-1],
    )


# -- evaluation ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    model,
    tokenizer,
    dataset,
    persona_names: Sequence[str] | None = None,
    bias_scale: float = 1.0,
    batch_size: int = 16,
    text_personas: Mapping[str, str] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_prompt_tokens: int | None = 256,
    max_response_tokens: int | None = 128,
) -> dict[str, float]:
    """Mean token loss on the responses of each persona (token-weighted over its rows), without gradients.

    ``persona_names=None`` evaluates every persona in ``dataset``; each must be registered in ``model``.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    column = list(dataset["persona"])
    wanted = set(column) if persona_names is None else set(persona_names)
    missing = sorted(wanted - set(column))
    if missing:
        raise ValueError(f"Personas {missing[:5]} have no rows in the evaluation dataset.")
    indices = [i for i, name in enumerate(column) if name in wanted]
    cache = PrefixCache()
    collator = PersonaMuxCollator.for_model(
        model,
        tokenizer,
        text_personas=text_personas,
        instruction=instruction,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )
    device = next(p.device for p in model.parameters())
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            rows = [dataset[i] for i in indices[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            nll, tokens = response_nll(model, batch, bias_scale=bias_scale, prefix_cache=cache)  # (rows,), (rows,)
            for feature, row_nll, row_tokens in zip(rows, nll.tolist(), tokens.tolist()):
                sums[feature["persona"]] += row_nll
                counts[feature["persona"]] += row_tokens
    finally:
        model.train(was_training)
    return {name: sums[name] / counts[name] for name in sorted(sums) if counts[name]}
