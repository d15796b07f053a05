"""Training arguments of the two stages: `TrainingArguments` with the paper's defaults and Persona-Mux options.

Defaults that differ from `transformers.TrainingArguments` (as TRL's `SFTConfig` documents its own):

| argument | default here | TrainingArguments | why |
| --- | --- | --- | --- |
| ``learning_rate`` | 1e-3 | 5e-5 | soft prompts and mixtures train with Adam's default rate (paper) |
| ``adam_epsilon`` | 1e-4 | 1e-8 | the paper's value: stable half-precision updates of tiny gradients |
| ``weight_decay`` | 0.0 | 0.0 | kept at 0 (stage 2 refuses others): decay would shrink rows that do not train |
| ``bf16`` | None (auto) | False | on for a CUDA GPU with bf16, unless ``fp16`` or ``use_cpu`` |
| ``logging_steps`` | 10 | 500 | runs are short |
| ``label_names`` | ``["labels"]`` | None | the collator writes ``labels`` |
| ``ddp_find_unused_parameters`` | True | None | W and the mixtures get no gradient during the warm-up |
| ``num_train_epochs`` (stage 1) | 3.0 | 3.0 | warm-up 1 + 2 joint epochs |
| ``max_steps`` (stage 2) | 100 | -1 | full-batch steps of the paper |
| ``lr_scheduler_type`` (stage 2) | ``"constant"`` | ``"linear"`` | the paper's Adam at a fixed rate |
| ``save_strategy`` (stage 2) | ``"no"`` | ``"steps"`` | 100 steps of a few hundred weights need no checkpoints |
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..codebook_init import CODE_SCALES
from ..files import LOSS_CURVE_NAME, LOSS_LOG_NAME
from ..loss import check_attention
from ..prompting import DEFAULT_INSTRUCTION

COMPILE_SCOPES = ("layers", "body")  # `compile_scope`: what `compile_layers` compiles


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
            "the soft prompt run once without gradient, the soft prompt and the template after it run once per "
            "persona group. Same loss and gradients as the plain forward (tested). On a 2-core CPU with bf16 "
            "(benchmarks/train_speed.py): about 4x the plain forward's example passes per second in stage 2, 3.9x "
            "in stage 1 with --personas_per_batch 2 --length_grouped true (as docs/pretrained/pretrain_cmd.sh "
            "trains) and 3.5x on random stage-1 batches. Off under multi-process DDP."
        },
    )
    autocast: str = field(
        default="auto",
        metadata={
            "help": "Autocast of the fast loss: 'auto' (bf16 with --bf16, or on a CPU whose bf16 matmul measures "
            ">= 1.25x float32; timed once per process, and a resumed run keeps its checkpoint's choice), 'bf16', "
            "or 'no'."
        },
    )
    attention: str = field(
        default="auto",
        metadata={
            "help": "Attention implementation of the fast loss: 'auto' (eager under bf16 autocast on CPU, where "
            "torch's flash-attention backward is slow on short rows; else the model's own), 'model', or a "
            "transformers implementation name such as 'eager' or 'sdpa'."
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
        check_attention(self.attention)
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
    gradient_codebook_scale: str = field(
        default="equal",
        metadata={
            "help": "Norms of the gradient codebook's codes: 'equal' (the noise codes' mean norm) or 'whiten' "
            "(proportional to 1 / the direction's singular value, same mean: the steepest codes get the smallest "
            "norm, so that the first joint steps do not overshoot along them)."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "Compile the base model's decoder layers, and the output head with its cross entropy "
            "(`LossOptions.compiled_head`), with torch.compile while training (`compiled_layers`; "
            "needs a C++ compiler; the first step compiles for minutes, less when inductor's disk cache has the "
            "graphs). It fuses the element-wise work (norms, rotary, activations) that takes about half the "
            "operator time of a bf16 step on a CPU with AMX, where it sped up stage-1 batches (training.md, Speed). "
            "For long runs; the layers run eager again after training."
        },
    )
    compile_scope: str = field(
        default="layers",
        metadata={
            "help": "What `compile_layers` compiles: 'layers' (each decoder layer its own compiled region) or 'body' "
            "(everything after the input embeddings as one region, `LossOptions.compiled_body`: one guard check per "
            "call instead of one per layer, 1.09-1.14x the speed per step of 'layers' on a 2-core AMX Xeon, but its "
            "up to three graphs compile for minutes each; for runs of hours; not with activation checkpointing). The "
            "output head is compiled either way."
        },
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
        if self.compile_layers and self.torch_compile:
            raise ValueError(
                "`compile_layers` and `torch_compile` both compile the model: set one of them, got both True."
            )
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"`compile_scope` must be one of {COMPILE_SCOPES}, got {self.compile_scope!r}.")
        checkpointing = getattr(self, "activation_checkpointing", False) or self.gradient_checkpointing
        if self.compile_layers and self.compile_scope == "body" and checkpointing:
            raise ValueError(
                "`compile_scope='body'` does not combine with activation checkpointing (the checkpointed layers break "
                "the compiled region at every layer): use `compile_scope='layers'`."
            )
        if self.gradient_codebook_scale not in CODE_SCALES:
            raise ValueError(
                f"`gradient_codebook_scale` must be one of {CODE_SCALES}, got {self.gradient_codebook_scale!r}."
            )


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
        default=True, metadata={"help": "Start every persona from `fit_start` (False: from its current mixture)."}
    )
    fit_start: str = field(
        default="zero",
        metadata={
            "help": "Where a reset mixture starts: 'zero' (the paper) or 'mean', the mean mixture of the codebook "
            "folder's persona files (its pretraining personas). At zero the 8 mixed tokens are zero vectors, the "
            "singular point of the model's first RMSNorm, where fits crawl; see docs/results.md."
        },
    )
    fit_method: str = field(
        default="adam",
        metadata={
            "help": "'adam': the paper's recipe through the Trainer (max_steps full-batch Adam steps). 'fisher': "
            "fisher_steps Levenberg-Marquardt steps on per-example gradients (fitting.fit_mixtures), about 14x fewer "
            "example passes. 'lbfgs': lbfgs_steps L-BFGS iterations on the full-batch loss (no learning rate). "
            "See docs/fitting.md and docs/results.md before choosing."
        },
    )
    fisher_steps: int = field(
        default=6, metadata={"help": "Steps of fit_method='fisher' (one pass over the data each)."}
    )
    lbfgs_steps: int = field(
        default=8, metadata={"help": "Iterations of fit_method='lbfgs' (at most 1.25x as many passes over the data)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fit_method not in ("adam", "fisher", "lbfgs"):
            raise ValueError(f"`fit_method` must be 'adam', 'fisher' or 'lbfgs', got {self.fit_method!r}.")
        if self.fit_start not in ("zero", "mean"):
            raise ValueError(f"`fit_start` must be 'zero' or 'mean', got {self.fit_start!r}.")
        for name in ("fisher_steps", "lbfgs_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.weight_decay != 0:
            raise ValueError(
                f"`weight_decay` must be 0 when fitting personas (it would shrink the other personas' rows), got "
                f"{self.weight_decay!r}."
            )
        if self.max_micro_batch_size is not None and self.max_micro_batch_size < 1:
            raise ValueError(f"`max_micro_batch_size` must be a positive integer, got {self.max_micro_batch_size!r}.")
