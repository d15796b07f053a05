"""`run_evaluation`: train and score every method on one split, stage by stage, caching each finished stage.

Stages (each a JSON file under ``<output_dir>/stages/``; a finished one is read back instead of recomputed, so an
interrupted run continues where it stopped):

``base_icl`` → ``lora`` → ``sp`` → ``codebook`` (only when pretraining here) → ``pm_zero`` → ``pm_adam`` →
``pm_fisher`` → ``random_codebook`` → ``pm_embedding`` → ``judge`` → ``who_said_it``; then `report` writes
results.json, results.md and the plots from the stages.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..collator import PersonaMuxCollator
from ..models import shakespeare_codebook_dir
from ..persona_files import list_persona_files
from .common import collect_generations
from .config import EvalConfig, load_config
from .data import Split, make_split, name_persona, tiny_model_texts
from .judge import Judge
from .loading import load_causal_lm
from .methods import (
    PromptFormat,
    SoftPrompts,
    codebook_tensors,
    encode_rows,
    mux_format,
    persona_losses,
    plain_format,
    random_codebook_like,
    sample_answers,
    train_lora,
    zero_mixtures,
)
from .metrics import WhoSaidIt, count_parameters, discrimination_context, generated_is_caught, text_bytes

logger = logging.getLogger(__name__)

STAGES_DIRNAME = "stages"
FINGERPRINT_NAME = "config_fingerprint.json"
TEXT_PERSONAS_NAME = "text_personas.json"
PRETRAIN_INFO_NAME = "personamux_pretrain.json"  # written by `personamux pretrain` beside a codebook


def _finite_or_none(data: Any) -> Any:
    """NaN/inf -> None, recursively, so that results.json is strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(v) for v in data]
    return data


def _write_json(path: Path, data: Any) -> None:
    """Atomic write, so that an interrupted run never leaves half a file. NaN is written as null."""
    data = _finite_or_none(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StageCache:
    """Finished stages as ``stages/<name>.json``; valid only for the config fingerprint they were made with."""

    def __init__(self, output_dir: Path, fingerprint: str, overwrite: bool = False) -> None:
        self.directory = output_dir / STAGES_DIRNAME
        marker = self.directory / FINGERPRINT_NAME
        if overwrite:  # everything a run derived from its config; codebook/ is rebuilt by its stage when needed
            for derived in (self.directory, output_dir / "artifacts", output_dir / "models"):
                shutil.rmtree(derived, ignore_errors=True)
            (output_dir / TEXT_PERSONAS_NAME).unlink(missing_ok=True)
        elif marker.is_file():
            previous = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint")
            if previous != fingerprint:
                raise ValueError(
                    f"{self.directory} holds stages of another config (fingerprint {previous}, this one "
                    f"{fingerprint}). Pass --overwrite to discard them, or choose another --output_dir."
                )
        _write_json(marker, {"fingerprint": fingerprint})

    def get(self, name: str) -> dict | None:
        path = self.directory / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, name: str, data: dict) -> None:
        _write_json(self.directory / f"{name}.json", data)


def _file_size(path: Path) -> int:
    return path.stat().st_size


class Evaluation:
    """One run: the split, the models (loaded lazily, so that a resumed run loads only what it still needs), stages."""

    def __init__(self, config: EvalConfig, overwrite: bool = False) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out, config.fingerprint(), overwrite)
        self.seconds: dict[str, float] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.split: Split = make_split(config)
        self.personas = self.split.personas
        self._base = None
        self._tokenizer = None
        self._text_personas: dict[str, str] | None | bool = False  # False: not resolved yet
        self._personamux = None
        self._learned_codebook: torch.Tensor | None = None
        self.codebook_dir = self._resolve_codebook()

    # -- stages ------------------------------------------------------------------------------------------------------

    def stage(self, name: str, compute: Callable[[dict, Callable[[dict], None]], dict]) -> dict:
        """Cached result of stage ``name``, or ``compute(partial, save)``; ``save`` keeps progress inside a stage."""
        cached = self.cache.get(name) or {}
        if cached.get("done"):
            logger.info("Stage %s: finished earlier, read from %s.", name, self.cache.directory)
            self.seconds[name] = cached.get("seconds", 0.0)
            return cached
        logger.info("Stage %s: running%s.", name, " (continuing)" if cached else "")
        start = time.perf_counter()
        spent = cached.pop("seconds", 0.0)

        def save(partial: dict) -> None:
            self.cache.put(name, {**partial, "done": False, "seconds": spent + time.perf_counter() - start})

        result = compute(cached, save)
        result.update(done=True, seconds=spent + time.perf_counter() - start)
        self.cache.put(name, result)
        self.seconds[name] = result["seconds"]
        return result

    def run(self) -> dict[str, dict]:
        """Run (or read back) every stage; returns them by name."""
        self.cache.put("data", {**self.split.summary(), "done": True})
        self.plan = plan(self.config, self.split, pretrain_here=self.codebook_dir == self.out / "codebook")
        if self.config.only_headroom:
            stages = {}
            if self.codebook_dir == self.out / "codebook":
                stages["codebook"] = self.stage("codebook", self._pretrain_codebook)
            stages["headroom"] = self.stage("headroom", lambda p, s: self._headroom())
            return stages
        logger.info(
            "Plan: %s example passes with backward, %s forward-only, %s generations, %s judge sequences (%s).",
            f"{self.plan['total']['backward']:,}",
            f"{self.plan['total']['forward']:,}",
            f"{self.plan['total']['generations']:,}",
            f"{self.plan['total']['judge_sequences']:,}",
            {k: v for k, v in self.plan.items() if k != "total"},
        )
        stages = {
            "base_icl": self.stage("base_icl", self._base_icl),
            "lora": self.stage("lora", self._lora),
            "sp": self.stage("sp", self._soft_prompts),
        }
        if self.codebook_dir == self.out / "codebook":
            stages["codebook"] = self.stage("codebook", self._pretrain_codebook)
        stages["pm_zero"] = self.stage("pm_zero", self._pm_zero)
        stages["pm_adam"] = self.stage("pm_adam", lambda p, s: self._pm_fit("adam", False))
        stages["pm_fisher"] = self.stage("pm_fisher", lambda p, s: self._pm_fit("fisher", False))
        stages["random_codebook"] = self.stage(
            "random_codebook", lambda p, s: self._pm_fit(self.config.random_codebook_method, True)
        )
        if self.config.headroom:
            stages["headroom"] = self.stage("headroom", lambda p, s: self._headroom())
        if self.config.data_efficiency_sizes:
            from .data_efficiency import run_data_efficiency

            stages["data_efficiency"] = self.stage(
                "data_efficiency", lambda p, s: run_data_efficiency(self, self.config.data_efficiency_sizes)
            )
        self._free_models()
        stages["pm_embedding"] = self.stage(
            "pm_embedding", lambda p, s: self._pm_embedding(stages["pm_fisher"]["mixtures"])
        )
        generations = collect_generations(stages, self.split, self.config)
        stages["judge"] = self.stage("judge", lambda p, s: self._judge(generations, p, s))
        stages["who_said_it"] = self.stage("who_said_it", lambda p, s: self._who_said_it(generations))
        stages["generations"] = generations
        return stages

    # -- models and prompts ------------------------------------------------------------------------------------------

    def base(self):
        if self._base is None:
            texts = tiny_model_texts(self.split, self.config.instruction)
            self._base, self._tokenizer = load_causal_lm(
                self.config.model_name_or_path, "base", self.config.dtype, self.out / "models", texts, self.config.seed
            )
            self._base.to(self.device)
        return self._base, self._tokenizer

    @property
    def tokenizer(self):
        return self.base()[1]

    @property
    def placeholder_id(self) -> int:
        """Only Persona-Mux prompts carry the placeholder; the others never contain it (any valid id will do)."""
        if self._personamux is not None:
            return self._personamux.peft_config[self._personamux.active_adapter].placeholder_token_id
        return self.base()[0].get_input_embeddings().weight.shape[0] - 1

    def _free_models(self) -> None:
        self._base = self._personamux = None
        gc.collect()

    def _resolve_codebook(self) -> Path:
        config = self.config
        if config.codebook == "pretrain":
            return self.out / "codebook"
        if config.codebook == "auto":
            shipped = shakespeare_codebook_dir()
            usable = config.model_name_or_path is None and config.dataset == "shakespeare"
            if usable and (shipped / "adapter_config.json").is_file():
                directory = shipped
            else:
                return self.out / "codebook"
        else:
            directory = Path(config.codebook)
            if not (directory / "adapter_config.json").is_file():
                raise ValueError(
                    f"`codebook` {directory} has no adapter_config.json: pass a folder written by `personamux "
                    "pretrain`, 'auto' or 'pretrain'."
                )
        leaked = sorted(set(list_persona_files(directory)) & set(self.personas))
        if leaked:
            raise ValueError(
                f"The codebook in {directory} was pretrained on {leaked[:5]}, which this split treats as unseen: use "
                "the codebook's split (pretrain_fraction, split_seed, min_lines) or `codebook: pretrain`."
            )
        info_path = directory / PRETRAIN_INFO_NAME
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        if info.get("instruction", config.instruction) != config.instruction:
            logger.warning(
                "The codebook was pretrained with instruction %r, not %r.", info["instruction"], config.instruction
            )
        logger.info("Codebook: %s.", directory)
        return directory

    def text_personas(self) -> dict[str, str] | None:
        """Text persona of every persona of the split, or None (the prompt then has the instruction only)."""
        if self._text_personas is not False:
            return self._text_personas
        mode = self.config.text_personas
        known: dict[str, str] = {}
        if mode == "auto":
            info_path = self.codebook_dir / PRETRAIN_INFO_NAME
            info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
            mode = "describe" if info.get("text_personas") else "none"
            shipped = self.codebook_dir / TEXT_PERSONAS_NAME
            if mode == "describe" and shipped.is_file():
                known = json.loads(shipped.read_text(encoding="utf-8"))
        everyone = sorted({r["persona"] for r in self.split.pretrain} | set(self.personas))
        if mode == "none":
            result = None
        elif mode == "name":
            result = {p: name_persona(p) for p in everyone}
        elif mode == "describe":
            result = self._describe(everyone, known)
        else:
            result = json.loads(Path(mode).read_text(encoding="utf-8"))
            missing = [p for p in self.personas if p not in result]
            if missing:
                raise ValueError(f"{mode} has no text persona for unseen personas {missing[:5]}.")
        self._text_personas = result
        return result

    def _describe(self, personas: list[str], known: dict[str, str]) -> dict[str, str]:
        from datasets import Dataset

        from ..data import describe_personas

        cache = self.out / TEXT_PERSONAS_NAME
        existing = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
        if any(p not in existing for p in known):
            _write_json(cache, {**known, **existing})
        base, tokenizer = self.base()
        rows = self.split.pretrain + self.split.train  # never the test lines
        return describe_personas(base, tokenizer, Dataset.from_list(rows), cache, personas=personas)

    def text_persona(self, persona: str) -> str | None:
        return (self.text_personas() or {}).get(persona)

    def plain_formats(self, personas, icl: bool = False) -> dict[str, PromptFormat]:
        return {
            p: plain_format(self.config.instruction, self.text_persona(p), self.icl_lines(p) if icl else ())
            for p in personas
        }

    def icl_lines(self, persona: str) -> list[str]:
        lines = [r["response"] for r in self.split.rows_of("train", persona)]
        return random.Random(f"icl-{self.config.seed}-{persona}").sample(lines, self.config.icl_examples)

    def generation_rows(self, persona: str) -> list[dict[str, str]]:
        return self.split.rows_of("test", persona)[: self.config.num_generations]

    def sampling_seed(self, persona: str) -> int:
        return self.config.generation_seed + zlib.crc32(persona.encode("utf-8"))

    def generate(self, model, fmt: PromptFormat, persona: str, one_by_one: bool = False, **kwargs) -> list[dict]:
        """Sampled answers to the persona's generation prompts (one batch, or ``one_by_one`` without padding)."""
        rows = self.generation_rows(persona)
        prompts = [r["prompt"] for r in rows]
        seed = self.sampling_seed(persona)
        args = (model, self.tokenizer)
        rest = (fmt, self.placeholder_id, self.config)
        if one_by_one:
            texts = [sample_answers(*args, [p], *rest, seed + j, **kwargs)[0] for j, p in enumerate(prompts)]
        else:
            texts = sample_answers(*args, prompts, *rest, seed, **kwargs)
        return [{"prompt": r["prompt"], "reference": r["response"], "text": t} for r, t in zip(rows, texts)]

    # -- baselines ---------------------------------------------------------------------------------------------------

    def _base_icl(self, partial: dict, save) -> dict:
        base, tokenizer = self.base()
        out = {}
        for method, icl in (("base", False), ("icl", True)):
            formats = self.plain_formats(self.personas, icl)
            losses = persona_losses(base, tokenizer, self.split.test, formats, self.placeholder_id, self.config)
            generations = {
                p: self.generate(base, formats[p], p) for p in tqdm(self.personas, desc=f"{method}: generate")
            }
            per_persona_bytes = {
                p: text_bytes(self.text_persona(p), *(self.icl_lines(p) if icl else ())) for p in self.personas
            }
            out[method] = {
                "heldout_loss": {"1.0": losses},
                "generations": {"1.0": generations},
                "params_global": 0,
                "params_per_persona": 0,
                "bytes_global": 0,
                "bytes_per_persona": per_persona_bytes,
            }
        return out

    def _lora(self, partial: dict, save) -> dict:
        base, tokenizer = self.base()
        rows = self.split.pretrain + self.split.train
        formats = self.plain_formats(sorted({r["persona"] for r in rows}))
        start = time.perf_counter()
        model, curve = train_lora(base, tokenizer, rows, formats, self.placeholder_id, self.config)
        train_seconds = time.perf_counter() - start
        losses = persona_losses(model, tokenizer, self.split.test, formats, self.placeholder_id, self.config)
        generations = {p: self.generate(model, formats[p], p) for p in tqdm(self.personas, desc="LoRA: generate")}
        directory = self.out / "artifacts" / "lora"
        model.save_pretrained(directory)
        result = {
            "heldout_loss": {"1.0": losses},
            "generations": {"1.0": generations},
            "params_global": int(model.get_nb_trainable_parameters()[0]),
            "params_per_persona": 0,
            "bytes_global": _file_size(directory / "adapter_model.safetensors"),
            "bytes_per_persona": {p: text_bytes(self.text_persona(p)) for p in self.personas},
            "fit": {
                "curve": curve,
                "steps": self.config.lora_steps,
                "example_passes": self.config.lora_steps * self.config.lora_batch_size,
                "seconds": train_seconds,
                "train_examples": len(rows),
            },
        }
        del model
        gc.collect()
        return result

    def _soft_prompts(self, partial: dict, save) -> dict:
        base, tokenizer = self.base()
        done: dict[str, dict] = partial.get("personas", {})
        prompts = SoftPrompts(base, self.config)
        nv = prompts.num_virtual_tokens
        for persona in tqdm(self.personas, desc="SP: personas"):
            if persona in done:
                continue
            formats = self.plain_formats([persona])
            train = self.split.rows_of("train", persona)
            test = self.split.rows_of("test", persona)
            batch = encode_rows(tokenizer, train, formats, self.placeholder_id, self.config)
            seed = self.config.seed + zlib.crc32(persona.encode("utf-8"))
            prompts.reset(seed)
            test_before = persona_losses(prompts.model, tokenizer, test, formats, self.placeholder_id, self.config, nv)
            start = time.perf_counter()
            curve = prompts.fit(batch, seed)
            seconds = time.perf_counter() - start
            train_after = persona_losses(
                prompts.model, tokenizer, train, formats, self.placeholder_id, self.config, nv
            )
            test_after = persona_losses(prompts.model, tokenizer, test, formats, self.placeholder_id, self.config, nv)
            directory = self.out / "artifacts" / "sp" / persona
            prompts.model.save_pretrained(directory)
            done[persona] = {
                "train_loss_before": curve[0],
                "train_loss_after": train_after[persona],
                "test_loss_before": test_before[persona],
                "test_loss_after": test_after[persona],
                "curve": curve,
                "seconds": seconds,
                "example_passes": self.config.sp_steps * len(train),
                "bytes": _file_size(directory / "adapter_model.safetensors"),
                # one prompt at a time: peft prompt tuning drops position ids, so left padding would sit between
                # the virtual tokens and the prompt
                "generations": self.generate(prompts.model, formats[persona], persona, one_by_one=True),
            }
            save({"personas": done})
        params = count_parameters(prompts.embedding.weight)
        del prompts
        gc.collect()
        return {
            "personas": done,
            "heldout_loss": {"1.0": {p: done[p]["test_loss_after"] for p in self.personas}},
            "generations": {"1.0": {p: done[p]["generations"] for p in self.personas}},
            "params_global": 0,
            "params_per_persona": params,
            "bytes_global": 0,
            "bytes_per_persona": {p: done[p]["bytes"] + text_bytes(self.text_persona(p)) for p in self.personas},
        }

    # -- Persona-Mux -------------------------------------------------------------------------------------------------

    def _pretrain_codebook(self, partial: dict, save) -> dict:
        from datasets import Dataset
        from peft import get_peft_model

        from ..training import CodebookTrainingArguments, pretrain_codebook
        from ..tuner import PersonaMuxConfig

        config = self.config
        base, tokenizer = self.base()
        if not self.split.pretrain:
            raise ValueError("The pretraining split is empty: nothing to pretrain a codebook on.")
        peft_config = PersonaMuxConfig(
            task_type="CAUSAL_LM",
            num_codes=config.num_codes,
            tokens_per_code=config.tokens_per_code,
            num_bias_tokens=config.num_bias_tokens,
        )
        model = get_peft_model(copy.deepcopy(base), peft_config)
        args = CodebookTrainingArguments(
            output_dir=str(self.codebook_dir),
            num_train_epochs=config.codebook_epochs,
            warmup_epochs=config.codebook_warmup_epochs,
            per_device_train_batch_size=config.codebook_batch_size,
            learning_rate=config.codebook_lr,
            adam_epsilon=config.fit_eps,
            max_prompt_tokens=config.max_prompt_tokens,
            max_response_tokens=config.max_response_tokens,
            instruction=config.instruction,
            save_strategy="no",
            logging_steps=5,
            report_to="none",
            seed=config.seed,
            use_cpu=self.device.type == "cpu",
        )
        start = time.perf_counter()
        trainer = pretrain_codebook(
            model, tokenizer, Dataset.from_list(self.split.pretrain), args, self.text_personas()
        )
        seconds = time.perf_counter() - start
        _write_json(
            self.codebook_dir / PRETRAIN_INFO_NAME,
            {
                "instruction": config.instruction,
                "max_prompt_tokens": config.max_prompt_tokens,
                "max_response_tokens": config.max_response_tokens,
                "text_personas": self.text_personas() is not None,
                "personas": len(model.personas),
                "examples": len(self.split.pretrain),
            },
        )
        curve = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        steps = trainer.state.global_step
        del model, trainer
        gc.collect()
        return {
            "directory": str(self.codebook_dir),
            "curve": curve,
            "steps": steps,
            "seconds": seconds,
            "example_passes": int(round(config.codebook_epochs * len(self.split.pretrain))),
        }

    def personamux(self):
        """The codebook on a copy of the base model, with a (zero) row for every unseen persona."""
        if self._personamux is None:
            from peft import PeftModel

            base, _ = self.base()
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(self.codebook_dir))
            model.add_personas(self.personas, exist_ok=True)
            model.to(self.device)
            self._personamux = model
            self._learned_codebook = codebook_tensors(model)[0].detach().clone()
        return self._personamux

    def _eval_kwargs(self) -> dict:
        c = self.config
        return {
            "batch_size": c.eval_batch_size,
            "text_personas": self.text_personas(),
            "instruction": c.instruction,
            "max_prompt_tokens": c.max_prompt_tokens,
            "max_response_tokens": c.max_response_tokens,
        }

    def _pm_losses(self, rows, bias_scale: float) -> dict[str, float]:
        from datasets import Dataset

        from ..training import evaluate_loss

        model = self.personamux()
        return evaluate_loss(
            model, self.tokenizer, Dataset.from_list(rows), self.personas, bias_scale, **self._eval_kwargs()
        )

    def mux_collator_kwargs(self) -> dict:
        """How Persona-Mux rows are formatted here (text personas, instruction, token limits)."""
        c = self.config
        return {
            "text_personas": self.text_personas(),
            "instruction": c.instruction,
            "max_prompt_tokens": c.max_prompt_tokens,
            "max_response_tokens": c.max_response_tokens,
        }

    def mux_collator(self, model) -> PersonaMuxCollator:
        return PersonaMuxCollator.for_model(model, self.tokenizer, **self.mux_collator_kwargs())

    def _headroom(self) -> dict:
        from .headroom import HeadroomSettings, run_headroom

        base, tokenizer = self.base()
        c = self.config
        settings = HeadroomSettings.from_config(c)
        return run_headroom(
            base,
            tokenizer,
            self.codebook_dir,
            self.personas,
            self.split.train,
            self.split.test,
            self.mux_collator_kwargs(),
            settings,
            self.device,
            pretrain_rows=self.split.pretrain,
        )

    def _pm_zero(self, partial: dict, save) -> dict:
        """Losses with every mixture at zero: the starting point of every fit (W does not matter there)."""
        zero_mixtures(self.personamux(), self.personas)
        return {"train": self._pm_losses(self.split.train, 1.0), "test": self._pm_losses(self.split.test, 1.0)}

    def _pm_fit(self, method: str, random_codebook: bool) -> dict:
        from ..fitting import fit_mixtures

        config = self.config
        model = self.personamux()
        codebook, bias = codebook_tensors(model)
        if random_codebook:
            with torch.no_grad():
                codebook.copy_(random_codebook_like(self._learned_codebook, config.seed))
        try:
            zero_mixtures(model, self.personas)
            batch = {k: v.to(self.device) for k, v in self.mux_collator(model)(self.split.train).items()}
            fit = fit_mixtures(
                model,
                batch,
                method=method,
                steps=config.fit_steps if method == "adam" else config.fisher_steps,
                lr=config.fit_lr,
                eps=config.fit_eps,
                damping=config.fisher_damping,
                chunk_size=config.fit_chunk_size,
                bias_scale=1.0,
            )
            train_after = self._pm_losses(self.split.train, 1.0)
            scales = [1.0] if random_codebook else config.bias_scales
            heldout = {str(float(s)): self._pm_losses(self.split.test, s) for s in scales}
            generations = {}
            for scale in scales:
                generations[str(float(scale))] = {
                    p: self.generate(
                        model,
                        mux_format(config.instruction, self.text_persona(p)),
                        p,
                        persona_ids=[p] * len(self.generation_rows(p)),
                        bias_scale=scale,
                    )
                    for p in tqdm(self.personas, desc=f"Persona-Mux ({method}) bias {scale:g}: generate")
                }
            name = f"random_codebook_{method}" if random_codebook else f"personamux_{method}"
            directory = self.out / "artifacts" / name
            files = {p: Path(model.save_persona(p, directory)) for p in self.personas}
            mixtures = {p: model.get_mixture(p).tolist() for p in self.personas}
        finally:
            if random_codebook:
                with torch.no_grad():
                    codebook.copy_(self._learned_codebook)
        return {
            "fit": {
                "method": method,
                "steps": len(fit.losses) - (1 if method == "fisher" else 0),
                "curve": fit.losses,
                "example_passes": fit.example_passes,
                "seconds": fit.seconds,
                "train_examples": len(self.split.train),
            },
            "train_loss_after": train_after,
            "heldout_loss": heldout,
            "generations": generations,
            "mixtures": mixtures,
            "params_global": count_parameters(codebook, bias),
            "params_per_persona": int(codebook.shape[0]),
            "bytes_global": _file_size(self.codebook_dir / "adapter_model.safetensors"),
            "bytes_per_persona": {p: _file_size(f) + text_bytes(self.text_persona(p)) for p, f in files.items()},
        }

    def _pm_embedding(self, fitted: dict[str, list[float]]) -> dict:
        """Zero-shot personas (issue 5, paper §5): a ridge map from an embedding of a persona's lines (mean-pooled
        base-model states of ``num_train`` lines) to its mixture, fitted on the codebook's pretraining personas and
        applied to the unseen ones; held-out loss at bias 1 beside the mean pretraining mixture (no embedding)."""
        from ..persona_embedding import EmbeddingMap, embed_texts
        from ..persona_files import read_persona_file
        from .data import load_rows

        config = self.config
        model = self.personamux()
        num_codes = model.peft_config[model.active_adapter].num_codes
        files = list_persona_files(self.codebook_dir)
        if len(files) < 3:
            return {"skipped": f"the codebook has {len(files)} persona files; a map needs at least 3"}
        fingerprint = model.base_model.codebook_fingerprint()
        known = dict(read_persona_file(path, num_codes, fingerprint) for path in files.values())  # name -> (codes,)
        lines: dict[str, list[str]] = {}
        for row in load_rows(config):
            if row["persona"] in known:
                lines.setdefault(row["persona"], []).append(row["response"])
        names = sorted(p for p in known if len(lines.get(p, ())) >= 1)
        if len(names) < 3:
            return {"skipped": f"only {len(names)} codebook personas have lines in `dataset`"}
        rng = random.Random(f"embedding-{config.seed}")
        texts = {p: rng.sample(lines[p], min(config.num_train, len(lines[p]))) for p in names}
        texts.update({p: [r["response"] for r in self.split.rows_of("train", p)] for p in self.personas})
        base, tokenizer = self.base()
        order = names + list(self.personas)
        flat = [line for p in order for line in texts[p]]
        vectors = iter(embed_texts(base, tokenizer, flat, batch_size=config.eval_batch_size, progress=True))
        embedded = {p: torch.stack([next(vectors) for _ in texts[p]]).mean(0) for p in order}  # (hidden,) each
        embedding_map = EmbeddingMap.fit(
            torch.stack([embedded[p] for p in names]),
            torch.stack([known[p] for p in names]),
            names=names,
            codebook_fingerprint=fingerprint,
        )
        embedding_map.save(self.out / "artifacts" / "embedding_map.safetensors")
        predicted = {p: embedding_map(embedded[p]) for p in self.personas}
        mean = torch.stack([known[p] for p in names]).mean(0)  # (codes,)
        fitted = {p: torch.tensor(m) for p, m in fitted.items()}
        heldout = {}
        distance = {"zero": {p: float(fitted[p].norm()) for p in self.personas}}  # L2 distance to the fisher fit
        for key, mixtures in (("embedding", predicted), ("mean_mixture", dict.fromkeys(self.personas, mean))):
            for p in self.personas:
                model.set_mixture(p, mixtures[p])
            heldout[key] = self._pm_losses(self.split.test, 1.0)
            distance[key] = {p: float((mixtures[p] - fitted[p]).norm()) for p in self.personas}
        zero_mixtures(model, self.personas)
        return {
            "heldout_loss": heldout,
            "distance_to_fitted": distance,
            "mixtures": {"embedding": {p: m.tolist() for p, m in predicted.items()}, "mean_mixture": mean.tolist()},
            "map": {
                "pretraining_mixture_norm": float(torch.stack([known[p] for p in names]).norm(dim=1).mean()),
                "personas": len(names),
                "embedding_dim": embedding_map.embedding_dim,
                "lines_per_persona": config.num_train,
                "alpha": embedding_map.alpha,
                "loo_error": embedding_map.loo_error,
                "mean_loo_error": embedding_map.mean_loo_error,
            },
        }

    # -- judge and who-said-it ---------------------------------------------------------------------------------------

    def discrimination_trials(self, persona: str) -> list[dict[str, list[str]]]:
        """Per generation prompt: real lines the judge reads first, and real candidates beside the generated one."""
        config = self.config
        train = [r["response"] for r in self.split.rows_of("train", persona)]
        test = [r["response"] for r in self.split.rows_of("test", persona)]
        trials = []
        for j in range(len(self.generation_rows(persona))):
            rng = random.Random(f"discrimination-{config.seed}-{persona}-{j}")
            context = rng.sample(train, config.discrimination_context_lines)
            pool = [line for i, line in enumerate(test) if i != j]  # not the real answer to the same prompt
            rng.shuffle(pool)
            spare = [line for line in train if line not in context]
            rng.shuffle(spare)
            trials.append({"context": context, "real": (pool + spare)[: config.discrimination_real_candidates]})
        return trials

    def _judge(self, generations: dict, partial: dict, save) -> dict:
        config = self.config
        texts = tiny_model_texts(self.split, config.instruction)
        model, tokenizer = load_causal_lm(
            config.judge_model, "judge", config.dtype, self.out / "models", texts, config.seed + 1
        )
        judge = Judge(model.to(self.device), tokenizer, config.judge_batch_size)
        trials = partial.get("trials") or {p: self.discrimination_trials(p) for p in self.personas}
        if "real" not in partial:
            pairs = [
                (discrimination_context(t["context"]), line)
                for p in self.personas
                for t in trials[p]
                for line in t["real"]
            ]
            scores = iter(judge.continuation_nll(pairs, progress=True))
            partial["real"] = {p: [[next(scores) for _ in t["real"]] for t in trials[p]] for p in self.personas}
            partial["trials"] = trials
            save(partial)
        methods = partial.setdefault("methods", {})
        for method, by_persona in tqdm(generations.items(), desc="judge: methods"):
            if method in methods:
                continue
            prompts, outputs, pairs = [], [], []
            for p in self.personas:
                for j, g in enumerate(by_persona[p]):
                    prompts.append(g["prompt"])
                    outputs.append(g["text"])
                    pairs.append((discrimination_context(trials[p][j]["context"]), g["text"]))
            losses = iter(judge.generation_loss(prompts, outputs))
            in_context = iter(judge.continuation_nll(pairs))
            entry: dict[str, dict] = {"generation_loss": {}, "candidate_nll": {}, "caught": {}}
            for p in self.personas:
                n = len(by_persona[p])
                entry["generation_loss"][p] = [next(losses) for _ in range(n)]
                entry["candidate_nll"][p] = [next(in_context) for _ in range(n)]
                entry["caught"][p] = [
                    generated_is_caught(partial["real"][p][j], entry["candidate_nll"][p][j]) for j in range(n)
                ]
            methods[method] = entry
            save(partial)
        del judge, model
        gc.collect()
        return partial

    def _who_said_it(self, generations: dict) -> dict:
        train = self.split.train
        classifier = WhoSaidIt(self.config.who_said_it_c, self.config.seed).fit(
            [r["response"] for r in train], [r["persona"] for r in train]
        )
        out = {}
        for method, by_persona in generations.items():
            texts = [g["text"] for p in self.personas for g in by_persona[p]]
            labels = [p for p in self.personas for _ in by_persona[p]]
            out[method] = classifier.accuracy_per_label(texts, labels)
        out["_all_test_lines"] = classifier.accuracy_per_label(
            [r["response"] for r in self.split.test], [r["persona"] for r in self.split.test]
        )
        return {"accuracy": out, "chance": 1.0 / len(self.personas)}


def plan(config: EvalConfig, split: Split, pretrain_here: bool) -> dict[str, dict[str, int]]:
    """What a run costs, counted before it starts: example passes with backward (training) and forward-only
    (scoring) per stage, generations and judge sequences. Multiply by the seconds per pass of the machine."""
    c = config
    u, n, t = len(split.personas), len(split.train), len(split.test)
    g = sum(min(c.num_generations, len(split.rows_of("test", p))) for p in split.personas)
    scales = len(c.bias_scales)
    fisher = {"backward": c.fisher_steps * n + n, "forward": c.fisher_steps * n}  # a trial and a new gradient a step
    adam = {"backward": c.fit_steps * n, "forward": 0}
    random_fit = adam if c.random_codebook_method == "adam" else fisher
    stages = {
        "base_icl": {"backward": 0, "forward": 2 * t, "generations": 2 * g},
        "lora": {"backward": c.lora_steps * c.lora_batch_size, "forward": t, "generations": g},
        "sp": {"backward": c.sp_steps * n, "forward": 2 * t + n, "generations": g},
        "codebook": {
            "backward": int(c.codebook_epochs * len(split.pretrain)) if pretrain_here else 0,
            "forward": 0,
            "generations": 0,
        },
        "pm_zero": {"backward": 0, "forward": n + t, "generations": 0},
        "pm_adam": {**adam, "forward": adam["forward"] + n + scales * t, "generations": scales * g},
        "pm_fisher": {**fisher, "forward": fisher["forward"] + n + scales * t, "generations": scales * g},
        "random_codebook": {**random_fit, "forward": random_fit["forward"] + n + t, "generations": g},
    }
    stages["pm_embedding"] = {"backward": 0, "forward": 2 * t, "generations": 0}  # + embedding lines, forward only
    methods = 4 + 2 * scales + 1 + 1  # rows of the table and the real lines
    judge = {"backward": 0, "forward": 0, "generations": 0, "judge_sequences": 2 * methods * g}
    judge["judge_sequences"] += g * c.discrimination_real_candidates
    stages["judge"] = judge
    total = {k: sum(s.get(k, 0) for s in stages.values()) for k in ("backward", "forward", "generations")}
    total["judge_sequences"] = judge["judge_sequences"]
    total["personas"] = u
    return {**stages, "total": total}


def run_evaluation(
    config: EvalConfig | dict | str | os.PathLike, overwrite: bool = False, command: str | None = None
) -> dict:
    """Train and score every method on one split; write results.json, results.md and plots to ``output_dir``.

    ``config``: an `EvalConfig`, a dict of its fields, or a JSON file. Finished stages are cached in
    ``output_dir/stages`` and read back by a later call with the same config (``overwrite`` discards them). Returns
    the content of results.json.
    """
    if isinstance(config, dict):
        config = EvalConfig(**config)
    elif not isinstance(config, EvalConfig):
        config = load_config(config)
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        start = time.perf_counter()
        evaluation = Evaluation(config, overwrite)
        stages = evaluation.run()
        if config.only_headroom:
            return _headroom_outputs(stages["headroom"], Path(config.output_dir), command)
        results = _results(config, evaluation, stages, start, command)
    finally:
        torch.set_num_threads(threads)
    return results


def _results(config: EvalConfig, evaluation: Evaluation, stages: dict, start: float, command: str | None) -> dict:
    from .report import build_results, write_outputs

    results = build_results(
        config,
        stages,
        evaluation.split,
        plan=evaluation.plan,
        stage_seconds=evaluation.seconds,
        wall_seconds=time.perf_counter() - start,
        command=command if command is not None else " ".join(sys.argv),
    )
    results = _finite_or_none(results)  # what results.json holds
    write_outputs(results, stages["generations"], Path(config.output_dir))
    return results


def _headroom_outputs(headroom: dict, output_dir: Path, command: str | None) -> dict:
    """``only_headroom``: headroom.json, headroom.md (its tables) and headroom_curves.png."""
    from .headroom_report import headroom_markdown, plot_headroom, plot_identification

    headroom = _finite_or_none(headroom)
    _write_json(output_dir / "headroom.json", headroom)
    plot_headroom(headroom, output_dir / "headroom_curves.png")
    plot_identification(headroom, output_dir / "identification.png")
    lines = ["# Headroom", "", f"Command: `{command or ' '.join(sys.argv)}`", "", *headroom_markdown(headroom)]
    (output_dir / "headroom.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return headroom
