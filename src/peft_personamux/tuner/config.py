"""Configuration of a Persona-Mux adapter."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from .peft_type import PEFT_TYPE_NAME, extend_peft_type


class PersonaMuxInit(str, enum.Enum):
    """How the codebook ``W`` and the bias tokens ``b`` are initialised."""

    RANDOM = "random"  # normal noise with the standard deviation of the base model's token embeddings
    SAMPLE_VOCAB = "sample_vocab"  # embeddings of tokens drawn at random from the vocabulary
    TEXT = "text"  # embeddings of the tokens of `init_text`, repeated to fill the rows (as peft prompt tuning)


@dataclass
class PersonaMuxConfig(PeftConfig):
    """Configuration for [`PersonaMuxModel`].

    The soft prompt of persona ``i`` is ``bias_scale * b ⊕ einsum(W, m_i)``: ``num_bias_tokens`` bias tokens followed
    by ``tokens_per_code`` tokens mixed from a codebook of ``num_codes`` codes with the persona's mixture vector
    ``m_i`` (``num_codes`` floats, the only per-persona parameters).
    """

    num_codes: int = field(
        default=64,
        metadata={"help": "Number of codes in the shared codebook, i.e. parameters per persona. The paper uses 64."},
    )
    tokens_per_code: int = field(
        default=8,
        metadata={"help": "Virtual tokens per code (length of the mixed part of the soft prompt). The paper uses 8."},
    )
    num_bias_tokens: int = field(
        default=12,
        metadata={
            "help": "Bias tokens shared by all personas; they capture the dataset's domain shift. The paper uses 12."
        },
    )
    codebook_init: PersonaMuxInit | str = field(
        default=PersonaMuxInit.RANDOM,
        metadata={
            "help": "Initialisation of the codebook W: 'random' (embedding-scaled noise), 'sample_vocab' or 'text'. "
            "W must start non-zero: with every mixture at zero its gradient is zero."
        },
    )
    bias_init: PersonaMuxInit | str = field(
        default=PersonaMuxInit.SAMPLE_VOCAB,
        metadata={"help": "Initialisation of the bias tokens b: 'random', 'sample_vocab' (default) or 'text'."},
    )
    init_text: str | None = field(
        default=None,
        metadata={"help": "Text whose token embeddings initialise W and/or b when their init is 'text'."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer used to tokenise `init_text` (only needed for 'text' init)."},
    )
    tokenizer_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoTokenizer.from_pretrained` when tokenising `init_text`. "
            "`trust_remote_code` is dropped with a warning: an adapter_config.json must not run code."
        },
    )
    init_std_scale: float = field(
        default=1.0,
        metadata={"help": "Multiplier on the embedding standard deviation used by 'random' init."},
    )
    placeholder_token_id: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary id that marks where the soft prompt goes in `input_ids`. It must be a valid id "
            "(logits processors index the vocabulary with it). None picks the largest id that is not the model's "
            "bos/eos/pad token; it is written back here so that saved adapters keep it."
        },
    )
    default_bias_scale: float = field(
        default=1.0,
        metadata={"help": "Bias scale after loading: 1.0 full, 0.5 half, 0 removes the bias tokens."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type(PEFT_TYPE_NAME)
        for name in ("num_codes", "tokens_per_code"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(self.num_bias_tokens, int) or self.num_bias_tokens < 0:
            raise ValueError(f"`num_bias_tokens` must be a non-negative integer, got {self.num_bias_tokens!r}.")
        for name in ("codebook_init", "bias_init"):
            value = getattr(self, name)
            try:
                setattr(self, name, PersonaMuxInit(value))
            except ValueError:
                choices = ", ".join(repr(i.value) for i in PersonaMuxInit)
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.") from None
            if getattr(self, name) is PersonaMuxInit.TEXT and not (self.init_text and self.tokenizer_name_or_path):
                raise ValueError(
                    f"`{name}='text'` needs `init_text` and `tokenizer_name_or_path`, got init_text={self.init_text!r}"
                    f" and tokenizer_name_or_path={self.tokenizer_name_or_path!r}."
                )
        if self.tokenizer_kwargs is not None:
            if not isinstance(self.tokenizer_kwargs, dict):
                raise ValueError(f"`tokenizer_kwargs` must be a dict, got {self.tokenizer_kwargs!r}.")
            self.tokenizer_kwargs = safe_tokenizer_kwargs(self.tokenizer_kwargs)
        if not self.init_std_scale > 0:
            raise ValueError(f"`init_std_scale` must be positive, got {self.init_std_scale!r}.")
        if self.placeholder_token_id is not None and self.placeholder_token_id < 0:
            raise ValueError(
                f"`placeholder_token_id` must be a vocabulary id (>= 0), got {self.placeholder_token_id}."
            )
        if not self.default_bias_scale >= 0:
            raise ValueError(f"`default_bias_scale` must be >= 0, got {self.default_bias_scale!r}.")

    @property
    def num_virtual_tokens(self) -> int:
        """Length of the soft prompt at a non-zero bias scale."""
        return self.num_virtual(1.0)

    def num_virtual(self, bias_scale: float) -> int:
        """Length of the soft prompt at ``bias_scale``: the bias tokens are left out at scale 0."""
        return self.tokens_per_code + (self.num_bias_tokens if bias_scale > 0 else 0)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("codebook_init", "bias_init"):
            out[name] = PersonaMuxInit(out[name]).value
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        # peft does not remember where an adapter came from, yet `load_persona(name)` needs the persona folder.
        # Keep it on the instance only (never written to adapter_config.json).
        import os

        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isdir(path):
            object.__setattr__(config, "_source_dir", os.path.abspath(path))
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        # Persona files travel with the adapter: the tuner registers a writer (holding it weakly) on its config.
        writer = getattr(self, "_persona_writer", None)
        if writer is not None:
            writer(save_directory)


def safe_tokenizer_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` without ``trust_remote_code``: a downloaded adapter_config.json must not run a tokenizer repo's code
    (peft's prompt tuning drops it too). Warns when the key was there."""
    kwargs = dict(kwargs or {})
    if "trust_remote_code" in kwargs:
        value = kwargs.pop("trust_remote_code")
        warnings.warn(
            f"Ignoring `tokenizer_kwargs['trust_remote_code']={value!r}`: Persona-Mux never runs a tokenizer "
            "repository's code. Tokenise `init_text` yourself if the tokenizer needs it.",
            UserWarning,
            stacklevel=3,
        )
    return kwargs
