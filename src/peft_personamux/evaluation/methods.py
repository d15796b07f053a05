"""The methods compared: prompt formats, scoring, sampling, and training of LoRA, soft prompts and Persona-Mux.

Every method reads the same user turn (``prompting.user_message``): text persona, task instruction, prompt.
Persona-Mux puts its soft prompt at the placeholder after the text persona; the other methods have no placeholder
(the text persona is followed directly by the instruction), ICL lists a few real lines of the persona after the
instruction, and peft's prompt tuning (SP) prepends its 8 virtual tokens to the whole sequence, as peft does.
"""

from __future__ import annotations

import copy
import inspect
import logging
import random
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..collator import IGNORE_INDEX, build_generation_inputs, encode_example
from ..loss import token_nll
from .config import EvalConfig

logger = logging.getLogger(__name__)

Row = Mapping[str, str]  # persona, prompt, response


@dataclass(frozen=True)
class PromptFormat:
    """How one method prompts for one persona, in the collator's terms."""

    text_persona: str | None  # before the placeholder: only Persona-Mux has one, the others fold it in `instruction`
    instruction: str
    truncate: bool = True  # apply `max_prompt_tokens`; ICL prompts are longer by design (their lines are short)

    def max_prompt_tokens(self, config: EvalConfig) -> int | None:
        return config.max_prompt_tokens if self.truncate else None


def plain_format(instruction: str, text_persona: str | None, icl_lines: Sequence[str] = ()) -> PromptFormat:
    """Prompt without a soft prompt: ``"{text_persona} {instruction}"``, then example lines for ICL."""
    head = f"{text_persona.strip()} " if text_persona and text_persona.strip() else ""
    text = head + instruction
    if icl_lines:
        text += "\n\nExample lines of this character:\n" + "\n".join(f"- {line}" for line in icl_lines)
    return PromptFormat(None, text, truncate=not icl_lines)


def mux_format(instruction: str, text_persona: str | None) -> PromptFormat:
    """Persona-Mux prompt: the soft prompt goes right after the text persona (or first, without one)."""
    return PromptFormat(text_persona or None, instruction)


# -- batches and losses ----------------------------------------------------------------------------------------------


def encode_rows(
    tokenizer, rows: Sequence[Row], formats: Mapping[str, PromptFormat], placeholder_id: int, config: EvalConfig
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (response tokens only) for ``rows``."""
    encoded = []
    for row in rows:
        fmt = formats[row["persona"]]
        encoded.append(
            encode_example(
                tokenizer,
                row["prompt"],
                row["response"],
                placeholder_id,
                fmt.text_persona,
                fmt.instruction,
                fmt.max_prompt_tokens(config),
                config.max_response_tokens,
            )
        )
    width = max(len(e.input_ids) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (rows, width)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(e.input_ids), 1, torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def keeps_logits(model) -> bool:
    """True when ``model`` keeps each row's token positions (a causal LM, with LoRA or peft prompt tuning) and its
    causal LM takes ``logits_to_keep`` (transformers >= 4.50 accepts positions as a 1-D tensor there)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config.peft_type, "value", config.peft_type) not in ("LORA", "PROMPT_TUNING"):
        return False  # e.g. Persona-Mux widens rows at its placeholder: positions would not line up
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def row_nll(model, batch: Mapping[str, torch.Tensor], prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response NLL per row (rows,) and response tokens per row (rows,).

    ``model``: a causal LM, with LoRA or peft prompt tuning. ``prefix``: virtual tokens the model prepends (prompt
    tuning); their logits are dropped. Where the model takes ``logits_to_keep``, the output head runs only at
    positions that predict a response token in some row (with a large vocabulary the head at every position is a
    large share of the cost); the numbers are the same within float rounding.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    targets = labels[:, 1:]  # (rows, width - 1): position t predicts token t + 1
    tokens = (targets != IGNORE_INDEX).sum(-1)  # (rows,)
    if not keeps_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, prefix:]  # (rows, width, vocab)
        return token_nll(logits, labels).sum(-1), tokens
    positions = (targets != IGNORE_INDEX).any(0).nonzero()[:, 0]  # (k,) positions predicting a label in any row
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions + prefix).logits
    nll = F.cross_entropy(  # (rows, k); 0 where a kept position predicts no label of this row
        logits.float().transpose(1, 2), targets[:, positions], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.sum(-1), tokens


@torch.no_grad()
def persona_losses(
    model,
    tokenizer,
    rows: Sequence[Row],
    formats: Mapping[str, PromptFormat],
    placeholder_id: int,
    config: EvalConfig,
    prefix: int = 0,
) -> dict[str, float]:
    """Mean token loss on the responses of each persona (token-weighted over its rows), as `training.evaluate_loss`."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), config.eval_batch_size):
        chunk = rows[start : start + config.eval_batch_size]
        nll, tokens = row_nll(model, encode_rows(tokenizer, chunk, formats, placeholder_id, config), prefix)
        for row, s, n in zip(chunk, nll.tolist(), tokens.tolist()):
            sums[row["persona"]] += s
            counts[row["persona"]] += n
    model.train(was_training)
    return {p: sums[p] / counts[p] for p in sorted(sums) if counts[p]}


# -- sampling --------------------------------------------------------------------------------------------------------


def sampling_config(model, tokenizer, config: EvalConfig) -> GenerationConfig:
    """Top-k sampling at the configured temperature; nothing else (no top-p, no repetition penalty)."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=True,
        top_k=config.top_k,
        top_p=1.0,
        temperature=config.temperature,
        repetition_penalty=1.0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        pad_token_id=pad,
    )


@torch.no_grad()
def sample_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    fmt: PromptFormat,
    placeholder_id: int,
    config: EvalConfig,
    seed: int,
    **generate_kwargs,
) -> list[str]:
    """One sampled answer per prompt (one left-padded batch), decoded without special tokens, on one line."""
    inputs = build_generation_inputs(
        tokenizer, list(prompts), fmt.text_persona, placeholder_id, fmt.instruction, fmt.max_prompt_tokens(config)
    )
    device = next(model.parameters()).device
    width = inputs["input_ids"].shape[1]
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        generation_config=sampling_config(model, tokenizer, config),
        **generate_kwargs,
    )  # (rows, width + new): every model here returns the prompt ids first
    return [" ".join(tokenizer.decode(row, skip_special_tokens=True).split()) for row in out[:, width:]]


# -- LoRA ------------------------------------------------------------------------------------------------------------


def train_lora(
    base, tokenizer, rows: Sequence[Row], formats, placeholder_id: int, config: EvalConfig, progress: bool = True
):
    """peft LoRA on a copy of ``base``, trained on ``rows`` (shuffled mini-batches). Returns (model, loss per step)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=config.lora_target_modules,
    )
    torch.manual_seed(config.seed)
    model = get_peft_model(copy.deepcopy(base), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lora_lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    order: list[int] = []
    curve = []
    model.train()
    for _ in tqdm(range(config.lora_steps), desc="LoRA", disable=not progress):
        if len(order) < config.lora_batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order.extend(epoch)
        picked, order = order[: config.lora_batch_size], order[config.lora_batch_size :]
        nll, tokens = row_nll(
            model, encode_rows(tokenizer, [rows[i] for i in picked], formats, placeholder_id, config)
        )
        loss = nll.sum() / tokens.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    model.eval()
    return model, curve


# -- soft prompt (SP) ------------------------------------------------------------------------------------------------


def sp_start(word_embeddings: torch.Tensor, num_tokens: int, seed: int, init: str = "SAMPLE_VOCAB") -> torch.Tensor:
    """A soft prompt's start (num_tokens, hidden) in float32, as peft draws it: the embeddings of ``num_tokens``
    random vocabulary tokens (``"SAMPLE_VOCAB"``, ``word_embeddings`` (vocab, hidden)) or N(0, 1) (``"RANDOM"``)."""
    generator = torch.Generator().manual_seed(seed)
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, word_embeddings.shape[0], (num_tokens,), generator=generator)
        return word_embeddings.detach()[ids.to(word_embeddings.device)].float()
    return torch.randn((num_tokens, word_embeddings.shape[1]), generator=generator)


class SoftPrompts:
    """peft prompt tuning on a copy of the base model; `fit` re-initialises and trains the prompt for one persona."""

    def __init__(self, base, config: EvalConfig) -> None:
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        self.config = config
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.sp_num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit[config.sp_init],
        )
        self.model = get_peft_model(copy.deepcopy(base), peft_config)
        self.embedding = self.model.prompt_encoder[self.model.active_adapter].embedding  # (virtual, hidden)
        self.word_embeddings = base.get_input_embeddings()

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.sp_num_virtual_tokens

    @staticmethod
    def seed_for(config: EvalConfig, persona: str) -> int:
        """The seed of a persona's prompt: ``config.seed + crc32(name)``, the same in every stage."""
        return config.seed + zlib.crc32(persona.encode("utf-8"))

    def reset(self, seed: int) -> None:
        """A fresh prompt, drawn as peft draws it (`sp_start`)."""
        weight = self.embedding.weight
        start = sp_start(self.word_embeddings.weight, weight.shape[0], seed, self.config.sp_init)
        with torch.no_grad():
            weight.copy_(start.to(weight.device))

    def fit(self, batch: Mapping[str, torch.Tensor], seed: int, progress: bool = False) -> list[float]:
        """Full-batch Adam (eps 1e-4) on one persona's training rows. Returns the loss before each step."""
        self.reset(seed)
        optimizer = torch.optim.Adam([self.embedding.weight], lr=self.config.sp_lr, eps=self.config.fit_eps)
        n = batch["input_ids"].shape[0]
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        chunk = self.config.fit_chunk_size
        curve = []
        self.model.eval()  # no dropout: the base model is frozen
        for _ in tqdm(range(self.config.sp_steps), desc="SP", disable=not progress, leave=False):
            optimizer.zero_grad()
            total = 0.0
            for start in range(0, n, chunk):
                part = {k: v[start : start + chunk] for k, v in batch.items()}
                nll, _ = row_nll(self.model, part, self.num_virtual_tokens)
                loss = nll.sum() / tokens
                loss.backward()
                total += loss.item()
            optimizer.step()
            curve.append(total)
        return curve


# -- Persona-Mux -----------------------------------------------------------------------------------------------------


def codebook_tensors(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook W (num_codes, tokens_per_code, hidden) and bias b (num_bias_tokens, hidden) of a Persona-Mux
    PeftModel."""
    layer = model.get_input_embeddings()
    adapter = model.active_adapter
    return layer.personamux_codebook[adapter], layer.personamux_bias[adapter]


def random_codebook_like(codebook: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian codes of the same shape, each rescaled to the norm of the learned code it replaces."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(codebook.shape, generator=generator, dtype=torch.float32)  # (codes, tokens, hidden)
    target = codebook.detach().float().cpu().flatten(1).norm(dim=1)  # (codes,)
    noise = noise * (target / noise.flatten(1).norm(dim=1).clamp(min=1e-12))[:, None, None]
    return noise.to(codebook.device, codebook.dtype)


def zero_mixtures(model, names: Sequence[str]) -> None:
    num_codes = model.peft_config[model.active_adapter].num_codes
    for name in names:
        model.set_mixture(name, torch.zeros(num_codes))
