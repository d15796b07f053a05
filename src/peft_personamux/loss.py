"""Response loss: summed token NLL per row, computed only where it is needed.

The plain path (`PersonaMuxModel.forward` with labels) runs the causal LM's 49k-vocabulary head at every position
and the whole prompt with gradient. Training a soft prompt needs neither:

* **logits only where there are labels**: the decoder body runs once, and the output head only at the positions
  that predict a response token;
* **prefix reuse**: the tokens before the soft prompt (the chat template's system turn, the text persona) do not
  depend on any trained weight, so their key/value states are computed once without gradient (`PrefixCache`) and
  the rest of each row runs on top of them;
* **shared soft prompt** (``LossOptions.shared_prompt``): rows with the same prefix and persona (all of stage 2's
  rows, persona-grouped stage-1 batches) run the soft prompt's virtual tokens, and the tokens they all have right
  after it (the chat template's system turn and instruction), once and share their key/value states (`shared_prompt`);
  the rest of a group's rows then runs packed, in lines of a few rows without padding (`shared_prompt.line_layout`),
  where that costs fewer FLOPs;
* **bf16 autocast** where the processor has bf16 matrix units (`choose_autocast` measures it);
* **eager attention under CPU bf16 autocast** (`choose_attention`): torch's CPU flash-attention backward is the
  largest single cost on short rows (30% of a step on a 2-core AMX Xeon); the plain matmul-softmax path is faster
  there and gives the same loss within bf16 rounding.

`response_nll` returns the same numbers as the plain path (see tests/test_loss.py) and is what the Trainer stages,
persona fitting and loss evaluation call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .compiled_layers import eager_body, run_body
from .inputs import IGNORE_INDEX
from .kv_cache import PrefixCache, autocast, prompt_starts, split_prefix
from .machine import bf16_matmul_speedup, matmul_rate
from .shared_prompt import can_share_prompt, prompt_groups, shared_run_lengths, split_shared_prompt
from .tuner.model import as_tuner
from .weight_casts import kept_casts

__all__ = [  # PrefixCache lives in kv_cache, the matmul probes in machine; callers import them from here
    "FAST",
    "PLAIN",
    "LossOptions",
    "PrefixCache",
    "bf16_matmul_speedup",
    "check_attention",
    "choose_attention",
    "choose_autocast",
    "matmul_rate",
    "mean_response_loss",
    "response_nll",
    "token_nll",
]

logger = logging.getLogger(__name__)

# config attributes of heads that do more than a linear map (soft-capping, scaling): those models use the plain path
_SPECIAL_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of next-token prediction, 0 where the label is ``IGNORE_INDEX``.

    ``logits`` (batch, seq, vocab) and ``labels`` (batch, seq) are aligned (position t's label is the token at t);
    the result (batch, seq - 1) is the loss of predicting token t + 1 from position t, in float32.
    """
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@dataclass(frozen=True)
class LossOptions:
    """Which shortcuts `response_nll` takes; every combination gives the plain path's numbers within tolerance."""

    labels_only: bool = True  # output head only at positions that predict a label
    prefix_cache: bool = True  # reuse the key/value states of the text before the soft prompt
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16; None runs in the weights' dtype
    attention: str | None = None  # attention implementation for the call ("eager", "sdpa"); None: the model's own
    # rows of one (prefix, persona) run the soft prompt and the template text after it once (needs a decoder body):
    # 1.2-1.4x over the other shortcuts where rows share a persona (stage 2; stage 1 with --personas_per_batch),
    # about 1.0x on rows of mixed personas (benchmarks/train_speed.py, a 2-core AMD EPYC)
    shared_prompt: bool = True
    # with the shared prompt, the rows of one group run packed into lines without padding between them (eager or
    # SDPA attention, under a 4D mask; `shared_prompt.line_layout`): None when that costs fewer FLOPs than padded
    # rows, True always where the shared prompt runs (rows that share no prompt, or activation checkpointing, run
    # unpacked), False never
    packed: bool | None = None
    # under autocast on CPU, each frozen linear weight is cast once and kept instead of on every call
    # (`weight_casts.kept_casts`: same numbers; costs a low-precision copy of the linear weights)
    keep_casts: bool = True
    # the output head and its cross entropy run under torch.compile (inductor fuses the float32 cast of the logits,
    # the log-softmax and their backward: 3-5% of a compiled stage-1 step on a 2-core AMX Xeon,
    # benchmarks/results/train_speed_xeon_amx_compiled_head*.md); needs a C++ compiler (on CPU) and ``labels_only``;
    # training's ``compile_layers`` turns it on
    compiled_head: bool = False
    # the decoder body after its input embeddings (masks, rotary, every layer, the final norm) runs as one
    # torch.compile region (`compiled_layers.run_body`); the embeddings, where the soft prompt goes in, stay eager
    compiled_body: bool = False

    def __post_init__(self) -> None:
        if self.compiled_body and not self.labels_only:
            raise ValueError("`compiled_body=True` compiles the labels-only path: it needs `labels_only=True`.")
        if self.packed is True and not self.shared_prompt:
            raise ValueError("`packed=True` packs the rows of a shared-prompt group: it needs `shared_prompt=True`.")
        if self.compiled_head and not self.labels_only:
            raise ValueError("`compiled_head=True` compiles the labels-only head: it needs `labels_only=True`.")

    def eager(self) -> LossOptions:
        """These options with nothing compiled: for one-off passes (evaluation, callbacks), where compiling graphs
        for minutes would not pay back."""
        return dataclasses.replace(self, compiled_head=False, compiled_body=False)


FAST = LossOptions()  # the default exact shortcuts, in the weights' dtype
PLAIN = LossOptions(labels_only=False, prefix_cache=False, autocast_dtype=None, shared_prompt=False)


def response_nll(
    model,
    batch: Mapping[str, torch.Tensor],
    bias_scale: float | None = None,
    mixtures: torch.Tensor | None = None,
    options: LossOptions = FAST,
    prefix_cache: PrefixCache | None = None,
    shared_mixtures: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response NLL per row (rows,) and label tokens per row (rows,) of a Persona-Mux model.

    ``batch`` holds collator output: ``input_ids``, ``attention_mask``, ``labels`` (-100 outside responses,
    aligned with ``input_ids``) and ``persona_ids``, right padded, one placeholder per row (or none: the soft prompt
    then goes first). ``mixtures`` (rows, num_codes) overrides the persona table row by row (fitting). Gradients
    flow to whatever requires them (codebook, bias, mixtures). With ``options.prefix_cache`` and no
    ``prefix_cache`` given, prefixes are computed for this call only. ``shared_mixtures``: the rows of one persona
    carry one mixture (e.g. indexed from a per-persona tensor), so ``options.shared_prompt`` may compute the soft
    prompt once for them even when ``mixtures`` requires gradient; without it, only mixtures without gradient are
    shared (rows grouped by value), so per-row leaf copies keep their own gradients.
    """
    base = as_tuner(model).model
    keep = options.keep_casts and batch["input_ids"].device.type == "cpu"
    with _attention(base, options.attention), kept_casts(base, options.autocast_dtype if keep else None):
        return _response_nll(model, batch, bias_scale, mixtures, options, prefix_cache, shared_mixtures)


def _response_nll(model, batch, bias_scale, mixtures, options: LossOptions, prefix_cache, shared_mixtures):
    tuner = as_tuner(model)
    device = batch["input_ids"].device
    prepared = tuner.prepare(
        batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("persona_ids"), bias_scale, "right"
    )
    enabled = prepared.persona_ids is not None  # None: the adapter is off, the base model's own inputs
    request = tuner.prompt_request(prepared.persona_ids, prepared.bias_scale, mixtures)
    base = tuner.model
    body = _decoder_body(base)
    labels_only = options.labels_only and body is not None and _plain_head(base)
    if options.compiled_head and not labels_only:
        _warn_once(f"`compiled_head` is ignored: {type(base).__name__}'s head is not a plain linear map at labels.")
    input_ids, attention_mask, labels = prepared.input_ids, prepared.attention_mask, prepared.labels
    placeholder = tuner.adapter_config().placeholder_token_id
    starts = prompt_starts(input_ids, placeholder) if enabled else None
    # without options.prefix_cache, prefixes still run once per call (without gradient) but are not kept across calls
    cache = prefix_cache if prefix_cache is not None and options.prefix_cache else PrefixCache()
    kwargs: dict = {}
    shared, row_of = None, None
    # under activation checkpointing transformers runs without a key/value cache: no prefix or shared prompt reuse
    checkpointing = _checkpointing(base)
    if options.compiled_body and not labels_only:
        _warn_once(f"`compiled_body` is ignored: {type(base).__name__} has no separate decoder body and plain head.")
    if options.compiled_body and checkpointing:  # its checkpointed layers break the region at every layer
        _warn_once("`compiled_body` is ignored under activation checkpointing; compile the layers one by one instead.")
    compiled_body = options.compiled_body and labels_only and not checkpointing
    run = run_body if compiled_body else eager_body  # the decoder body's forward
    if options.shared_prompt and body is not None and enabled and not checkpointing:
        shared = _prompt_sharing(tuner, prepared, mixtures, shared_mixtures, starts, placeholder)
    if shared is not None:
        if options.packed is True and _packing(body) is None:
            implementation = getattr(body.config, "_attn_implementation", None)
            raise ValueError(f"`packed=True` needs attention 'eager' or 'sdpa' (4D masks), got {implementation!r}.")
        width, representatives, group_of_row, common = shared

        def group_request(rows: list[int]):
            picked = torch.tensor(rows, device=device)
            rows_mixtures = None if mixtures is None else mixtures[picked]
            return tuner.prompt_request(prepared.persona_ids[picked], prepared.bias_scale, rows_mixtures)

        input_ids, attention_mask, labels, kwargs, row_of = split_shared_prompt(
            body,
            cache,
            input_ids,
            attention_mask,
            labels,
            starts,
            width,
            representatives,
            group_of_row,
            group_request,
            options.autocast_dtype,
            common=common,
            pack=None if options.packed is False else _packing(body),
            always_pack=options.packed is True,
            run=run,
        )
        request = contextlib.nullcontext()  # the rest of each row has no virtual tokens
    elif (
        options.prefix_cache
        and body is not None
        and not checkpointing
        and starts is not None
        and bool((starts > 0).any())
    ):
        input_ids, attention_mask, labels, kwargs = split_prefix(
            body, cache, input_ids, attention_mask, labels, starts, options.autocast_dtype
        )
    if row_of is None:  # one line per row
        row_of = torch.arange(labels.shape[0], device=device)[:, None].expand_as(labels)  # (rows, seq)
    keep = labels[:, 1:] != IGNORE_INDEX  # (lines, seq - 1): positions that predict a label
    with request, autocast(device, options.autocast_dtype):
        if labels_only:
            hidden = run(body, input_ids, attention_mask, **kwargs).last_hidden_state
            nll = _labels_only_nll(base.get_output_embeddings(), hidden, labels, keep, options.compiled_head)
        else:
            logits = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    if not labels_only:
        nll = token_nll(logits, labels)[keep]  # (label tokens,)
    rows = row_of[:, 1:][keep]  # (label tokens,) the row each label belongs to
    num_rows = prepared.input_ids.shape[0]
    per_row = torch.zeros(num_rows, device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
    return per_row, torch.bincount(rows, minlength=num_rows)


def mean_response_loss(model, batch, num_items: int | torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Mean token loss of ``batch`` (sum over label tokens / ``num_items``, default the batch's label tokens)."""
    nll, tokens = response_nll(model, batch, **kwargs)
    denominator = tokens.sum() if num_items is None else num_items
    return nll.sum() / torch.as_tensor(denominator, device=nll.device).clamp(min=1)


# -- autocast choice -------------------------------------------------------------------------------------------------


def choose_autocast(device: torch.device | str, mode: str = "auto", min_speedup: float = 1.25) -> torch.dtype | None:
    """The autocast dtype for training on ``device``: ``"auto"`` (bf16 when measured faster), ``"bf16"``, ``"no"``.

    On CUDA, ``auto`` takes bf16 when supported. On CPU it times a matmul of the training shapes in float32 and in
    bf16 and takes bf16 only if it is at least ``min_speedup`` times faster (CPUs without bf16 matrix units run bf16
    slower than float32).
    """
    if mode not in ("auto", "bf16", "no"):
        raise ValueError(f"`autocast` must be 'auto', 'bf16' or 'no', got {mode!r}.")
    if mode == "no":
        return None
    if mode == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    speedup = bf16_matmul_speedup()
    logger.info("bf16 matmul on this CPU runs %.2fx float32 (autocast if >= %.2f).", speedup, min_speedup)
    return torch.bfloat16 if speedup >= min_speedup else None


def check_attention(mode: str) -> None:
    """Raise ValueError naming the `attention` field unless ``mode`` is "auto", "model" or a transformers
    attention implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ("auto", "model", "eager", *ALL_ATTENTION_FUNCTIONS.keys())
    if mode not in known:
        raise ValueError(f"`attention` must be one of {', '.join(map(repr, known))}, got {mode!r}.")


def choose_attention(device: torch.device | str, autocast_dtype: torch.dtype | None, mode: str = "auto") -> str | None:
    """The attention implementation for training: ``"auto"`` (eager under bf16 autocast on CPU, else the model's
    own), ``"model"`` (the model's own), or a transformers implementation name (``"eager"``, ``"sdpa"``).

    On CPU under bf16 autocast, torch's flash-attention backward is slow on short rows, so "auto" takes eager there
    and keeps the model's own (SDPA) otherwise; `benchmarks/train_speed.py` measures both on a given CPU.
    """
    check_attention(mode)
    if mode == "model":
        return None
    if mode != "auto":
        return mode
    return "eager" if torch.device(device).type == "cpu" and autocast_dtype == torch.bfloat16 else None


# -- internals -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _attention(base: nn.Module, implementation: str | None):
    """Run with ``base.config._attn_implementation = implementation`` (restored afterwards); None: unchanged.

    Left unchanged under activation checkpointing: its recomputation runs in backward, outside this context.
    """
    config = getattr(base, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if implementation is None or previous is None or previous == implementation or _checkpointing(base):
        yield
        return
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def _prompt_sharing(tuner, prepared, mixtures, shared_mixtures: bool, starts, placeholder: int):
    """(width, representatives, group_of_row, common) when rows can share their soft prompt's forward, else None;
    ``common[g]``: the tokens after the soft prompt that group g's rows also run once (`shared_run_lengths`).

    Mixtures that require gradient are shared only when the caller says rows of one persona carry one mixture;
    otherwise rows are grouped by value, so per-row leaf copies keep their own gradients.
    """
    width = tuner.adapter_config().num_virtual(prepared.bias_scale)
    if mixtures is not None and mixtures.requires_grad and not shared_mixtures:
        return None
    ids, mask, labels = prepared.input_ids, prepared.attention_mask, prepared.labels
    if not can_share_prompt(ids, mask, labels, starts, width, placeholder):
        return None
    key_mixtures = None if mixtures is None or shared_mixtures else mixtures
    representatives, group_of_row = prompt_groups(ids, starts, prepared.persona_ids, key_mixtures)
    if len(representatives) == ids.shape[0]:  # every row its own group: nothing to share
        return None
    common = shared_run_lengths(ids, mask, labels, starts, width, group_of_row)
    return width, representatives, group_of_row, common


def _checkpointing(base: nn.Module) -> bool:
    """True under activation checkpointing, where transformers turns the key/value cache off (no shared prompt)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def _decoder_body(base: nn.Module) -> nn.Module | None:
    """The transformer body of a causal LM (LlamaModel, GPT2Model, ...), or None when it has no separate body."""
    body = getattr(base, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not base else None


def _plain_head(base: nn.Module) -> bool:
    """True when logits are just ``output_embeddings(hidden)`` (no soft-capping or scaling)."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return False
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text_config, key, None) not in (None, 1, 1.0) for key in _SPECIAL_HEAD_KEYS)


def _packing(body: nn.Module) -> str | None:
    """The attention implementation packed rows run under ("eager", "sdpa"), or None when its masks are not 4D."""
    implementation = getattr(getattr(body, "config", None), "_attn_implementation", None)
    return implementation if implementation in ("eager", "sdpa") else None


def _labels_only_nll(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, compiled: bool):
    """NLL (label tokens,) of the labels at ``keep`` (lines, seq - 1), the head run only at the positions that
    predict them; ``compiled``: under torch.compile (`LossOptions.compiled_head`) where the head is a plain
    ``nn.Linear`` without hooks (a subclass, e.g. a quantized or adapted head, runs its own forward eagerly)."""
    states = hidden[:, :-1][keep]  # (label tokens, hidden)
    targets = labels[:, 1:][keep]  # (label tokens,)
    if compiled and type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        return _compiled_head_nll()(states, head.weight, head.bias, targets)
    return F.cross_entropy(head(states).float(), targets, reduction="none")


def _head_nll(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """NLL (tokens,) of ``targets`` under the linear head ``(weight, bias)`` on ``states`` (tokens, hidden), the
    logits taken to float32 before the softmax: what `_labels_only_nll` computes, as one function to compile."""
    logits = F.linear(states, weight, bias)  # (tokens, vocab), in the autocast dtype if any
    return F.cross_entropy(logits.float(), targets, reduction="none")


@functools.cache
def _compiled_head_nll():
    """`_head_nll` under torch.compile (dynamic shapes: one graph for any number of label tokens), made once."""
    return torch.compile(_head_nll, dynamic=True)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)
