"""`run_evaluation`: train and score every method on one split, stage by stage, caching each finished stage.

Stages (each a JSON file under ``<output_dir>/stages/``; a finished one is read back instead of recomputed, so an
interrupted run continues where it stopped):

``base_icl`` → ``lora`` → ``sp`` → ``codebook`` (only when pretraining here) → ``pm_zero`` → ``pm_adam`` →
``pm_fisher`` → ``pm_lbfgs`` → ``random_codebook`` → ``headroom`` → ``data_efficiency`` → ``subnetwork`` →
``pm_embedding`` → ``judge`` → ``who_said_it``; then `results` assembles results.json from the stages and
`report` writes it with results.md and the plots.

Files by job: `cache` (run plan, stage cache), `stages/` (the stages, as mixins of `Evaluation`: baselines,
Persona-Mux, embedding, subnetwork, judging), `results` (assembly), `report` (rendering); `common` holds what runner
and report share.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import PRETRAIN_INFO_NAME, TEXT_PERSONAS_NAME, finite_or_none, is_codebook_dir, read_json, write_json
from ..models import shakespeare_codebook_dir
from ..persona_files import list_persona_files
from .cache import StageCache, plan
from .common import collect_generations
from .config import EvalConfig, load_config
from .data import Split, make_split, name_persona, tiny_model_texts
from .loading import load_causal_lm
from .methods import PromptFormat, plain_format, sample_answers
from .stages.baselines import BaselineStages
from .stages.embedding import EmbeddingStage
from .stages.judging import JudgeStages
from .stages.personamux import PersonaMuxStages
from .stages.subnetwork import SubnetworkStage

logger = logging.getLogger(__name__)


class Evaluation(BaselineStages, PersonaMuxStages, EmbeddingStage, SubnetworkStage, JudgeStages):
    """One run: the split, the models (loaded lazily, so that a resumed run loads only what it still needs), stages."""

    def __init__(self, config: EvalConfig, overwrite: bool = False) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(self.out, config, overwrite)
        self.seconds: dict[str, float] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.split: Split = make_split(config)
        self.personas = self.split.personas
        self._base = None
        self._tokenizer = None
        self._text_personas: dict[str, str] | None | bool = False  # False: not resolved yet
        self.loaded_personamux = None
        self.learned_codebook: torch.Tensor | None = None
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
        logger.info(
            "Plan: %s example passes with backward, %s forward-only, %s generations, %s judge sequences (%s).",
            f"{self.plan['total']['backward']:,}",
            f"{self.plan['total']['forward']:,}",
            f"{self.plan['total']['generations']:,}",
            f"{self.plan['total']['judge_sequences']:,}",
            {k: v for k, v in self.plan.items() if k != "total"},
        )
        if self.config.only_headroom:
            stages = {}
            if self.codebook_dir == self.out / "codebook":
                stages["codebook"] = self.stage("codebook", self.codebook_stage)
            stages["headroom"] = self.stage("headroom", self.headroom_stage)
            return stages
        if self.config.subnetwork_sparsities and not (self.cache.get("subnetwork") or {}).get("done"):
            self.check_subnetwork_model()
        stages = {
            "base_icl": self.stage("base_icl", self.base_icl_stage),
            "lora": self.stage("lora", self.lora_stage),
            "sp": self.stage("sp", self.sp_stage),
        }
        if self.codebook_dir == self.out / "codebook":
            stages["codebook"] = self.stage("codebook", self.codebook_stage)
        stages["pm_zero"] = self.stage("pm_zero", self.pm_zero_stage)
        stages["pm_adam"] = self.stage("pm_adam", lambda p, s: self.pm_fit_stage("adam", False))
        stages["pm_fisher"] = self.stage("pm_fisher", lambda p, s: self.pm_fit_stage("fisher", False))
        if self.config.lbfgs_steps:
            stages["pm_lbfgs"] = self.stage("pm_lbfgs", lambda p, s: self.pm_fit_stage("lbfgs", False))
        stages["random_codebook"] = self.stage(
            "random_codebook", lambda p, s: self.pm_fit_stage(self.config.random_codebook_method, True)
        )
        if self.config.headroom:
            stages["headroom"] = self.stage("headroom", self.headroom_stage)
        if self.config.data_efficiency_sizes:
            from .data_efficiency import fitted_rows, run_data_efficiency

            sizes, fits = self.config.data_efficiency_sizes, self.config.data_efficiency_fits
            done = fitted_rows(stages)
            stages["data_efficiency"] = self.stage(
                "data_efficiency", lambda p, s: run_data_efficiency(self, sizes, fits, partial=p, save=s, fitted=done)
            )
        if self.config.subnetwork_sparsities:
            fitted = stages["pm_fisher"]["mixtures"]
            stages["subnetwork"] = self.stage("subnetwork", lambda p, s: self.subnetwork_stage(fitted, p, s))
        self.free_models()
        stages["pm_embedding"] = self.stage(
            "pm_embedding", lambda p, s: self.pm_embedding_stage(stages["pm_fisher"]["mixtures"])
        )
        generations = collect_generations(stages, self.split, self.config)
        stages["judge"] = self.stage("judge", lambda p, s: self.judge_stage(generations, p, s))
        stages["who_said_it"] = self.stage("who_said_it", lambda p, s: self.who_said_it_stage(generations))
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
        if self.loaded_personamux is not None:
            return self.loaded_personamux.base_model.adapter_config().placeholder_token_id
        return self.base()[0].get_input_embeddings().weight.shape[0] - 1

    def free_models(self) -> None:
        self._base = self.loaded_personamux = None
        gc.collect()

    def _resolve_codebook(self) -> Path:
        config = self.config
        if config.codebook == "pretrain":
            return self.out / "codebook"
        if config.codebook == "auto":
            shipped = shakespeare_codebook_dir()
            usable = config.model_name_or_path is None and config.dataset == "shakespeare"
            if usable and is_codebook_dir(shipped):
                directory = shipped
            else:
                return self.out / "codebook"
        else:
            directory = Path(config.codebook)
            if not is_codebook_dir(directory):
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
        info = read_json(directory / PRETRAIN_INFO_NAME)
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
            info = read_json(self.codebook_dir / PRETRAIN_INFO_NAME)
            mode = "describe" if info.get("text_personas") else "none"
            shipped = self.codebook_dir / TEXT_PERSONAS_NAME
            if mode == "describe" and shipped.is_file():
                known = read_json(shipped)
        everyone = sorted({r["persona"] for r in self.split.pretrain} | set(self.personas))
        if mode == "none":
            result = None
        elif mode == "name":
            result = {p: name_persona(p) for p in everyone}
        elif mode == "describe":
            result = self._describe(everyone, known)
        else:
            result = read_json(Path(mode))
            missing = [p for p in self.personas if p not in result]
            if missing:
                raise ValueError(f"{mode} has no text persona for unseen personas {missing[:5]}.")
        self._text_personas = result
        return result

    def _describe(self, personas: list[str], known: dict[str, str]) -> dict[str, str]:
        from datasets import Dataset

        from ..data import describe_personas

        cache = self.out / TEXT_PERSONAS_NAME
        existing = read_json(cache)
        if any(p not in existing for p in known):
            write_json(cache, {**known, **existing}, indent=1)
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
            from .headroom_report import write_headroom_outputs

            return write_headroom_outputs(stages["headroom"], Path(config.output_dir), command or " ".join(sys.argv))
        results = _results(config, evaluation, stages, start, command)
    finally:
        torch.set_num_threads(threads)
    return results


def _results(config: EvalConfig, evaluation: Evaluation, stages: dict, start: float, command: str | None) -> dict:
    from .report import write_outputs
    from .results import build_results

    results = build_results(
        config,
        stages,
        evaluation.split,
        plan=evaluation.plan,
        stage_seconds=evaluation.seconds,
        wall_seconds=time.perf_counter() - start,
        command=command if command is not None else " ".join(sys.argv),
    )
    results = finite_or_none(results)  # what results.json holds
    write_outputs(results, stages["generations"], Path(config.output_dir))
    return results
