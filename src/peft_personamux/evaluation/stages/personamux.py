"""Evaluation stages of Persona-Mux: the codebook (when pretrained here), zero mixtures, the fits (adam, fisher, on a
random codebook), the headroom study; and the Persona-Mux model they share."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...collator import PersonaMuxCollator
from ...files import ADAPTER_WEIGHTS_NAME, PRETRAIN_INFO_NAME, write_json
from ..common import file_size
from ..methods import codebook_tensors, mux_format, random_codebook_like, zero_mixtures
from ..metrics import count_parameters, text_bytes

logger = logging.getLogger(__name__)


class PersonaMuxStages:
    """Mixed into `runner.Evaluation`: the stages ``codebook``, ``pm_zero``, ``pm_adam``, ``pm_fisher``,
    ``random_codebook`` and ``headroom``."""

    loaded_personamux = None  # the Persona-Mux model, once `personamux()` built it
    learned_codebook: torch.Tensor | None = None  # W as loaded (the random-codebook stage swaps it and back)

    def codebook_stage(self, partial: dict, save) -> dict:
        from datasets import Dataset
        from peft import get_peft_model

        from ...training import CodebookTrainingArguments, pretrain_codebook
        from ...tuner import PersonaMuxConfig

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
        write_json(
            self.codebook_dir / PRETRAIN_INFO_NAME,
            {
                "instruction": config.instruction,
                "max_prompt_tokens": config.max_prompt_tokens,
                "max_response_tokens": config.max_response_tokens,
                "text_personas": self.text_personas() is not None,
                "personas": len(model.personas),
                "examples": len(self.split.pretrain),
            },
            indent=1,
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
        if self.loaded_personamux is None:
            from peft import PeftModel

            base, _ = self.base()
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(self.codebook_dir))
            model.add_personas(self.personas, exist_ok=True)
            model.to(self.device)
            self.loaded_personamux = model
            self.learned_codebook = codebook_tensors(model)[0].detach().clone()
        return self.loaded_personamux

    def eval_kwargs(self) -> dict:
        c = self.config
        return {
            "batch_size": c.eval_batch_size,
            "text_personas": self.text_personas(),
            "instruction": c.instruction,
            "max_prompt_tokens": c.max_prompt_tokens,
            "max_response_tokens": c.max_response_tokens,
        }

    def pm_losses(self, rows, bias_scale: float) -> dict[str, float]:
        from datasets import Dataset

        from ...training import evaluate_loss

        model = self.personamux()
        return evaluate_loss(
            model, self.tokenizer, Dataset.from_list(rows), self.personas, bias_scale, **self.eval_kwargs()
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

    def headroom_stage(self, partial: dict, save) -> dict:
        from ..headroom import HeadroomSettings, run_headroom

        base, tokenizer = self.base()
        c = self.config
        settings = HeadroomSettings.from_config(c, self.device)
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
            partial=partial,
            save=save,
        )

    def fit_each_from_mean(self, model, batch: dict):
        """``lbfgs_steps`` of L-BFGS for each persona on its own rows (`headroom.fit_each`), from the mean
        pretraining mixture (zero when the codebook folder has no persona files). Returns a `fitting.FitResult`
        (its curve: the mean over personas at each loss evaluation) and the start's name."""
        from ...fitting import FitResult
        from ..headroom import HeadroomSettings, fit_each, pretraining_mean_mixture

        config = self.config
        mean = pretraining_mean_mixture(model)
        if mean is None:
            logger.warning("The codebook folder has no persona files: the lbfgs fits start at the zero mixture.")
        settings = dataclasses.replace(
            HeadroomSettings.from_config(config, self.device), method="lbfgs", steps=config.lbfgs_steps
        )
        start = torch.zeros(codebook_tensors(model)[0].shape[0]) if mean is None else mean  # (num_codes,)
        out = fit_each(
            model, batch, self.personas, settings, "lbfgs", start, desc="Persona-Mux (lbfgs from mean): fit"
        )
        curves = [out["curves"][p] for p in self.personas]
        width = min(map(len, curves), default=0)
        merged = FitResult(
            "lbfgs",
            losses=[sum(c[i] for c in curves) / len(curves) for i in range(width)],  # mean over personas
            persona_curves={model.persona_index(p): out["curves"][p] for p in self.personas},
            example_passes=out["example_passes"],
            seconds=out["seconds"],
        )
        return merged, "zero" if mean is None else "mean"

    def pm_zero_stage(self, partial: dict, save) -> dict:
        """Losses with every mixture at zero: the starting point of every fit (W does not matter there)."""
        zero_mixtures(self.personamux(), self.personas)
        return {"train": self.pm_losses(self.split.train, 1.0), "test": self.pm_losses(self.split.test, 1.0)}

    @contextlib.contextmanager
    def random_codebook(self, model) -> Iterator[None]:
        """``model``'s codebook swapped for the ablation's random one (`methods.random_codebook_like`: the same
        shape and code norms), the learned one restored after."""
        codebook, _ = codebook_tensors(model)
        with torch.no_grad():
            codebook.copy_(random_codebook_like(self.learned_codebook, self.config.seed))
        try:
            yield
        finally:
            with torch.no_grad():
                codebook.copy_(self.learned_codebook)

    def fit_unseen(self, model, batch: dict, method: str):
        """Fit every unseen persona's mixture on ``batch`` as the row of ``method`` does: 'lbfgs' from the mean
        pretraining mixture (`fit_each_from_mean`), 'adam' and 'fisher' from the current (zero) mixtures. Returns a
        `fitting.FitResult` and the start's name."""
        from ...fitting import fit_mixtures

        if method == "lbfgs":
            return self.fit_each_from_mean(model, batch)
        config = self.config
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
        return fit, "zero"

    def pm_fit_stage(self, method: str, random_codebook: bool) -> dict:
        config = self.config
        model = self.personamux()
        codebook, bias = codebook_tensors(model)
        with self.random_codebook(model) if random_codebook else contextlib.nullcontext():
            zero_mixtures(model, self.personas)
            batch = {k: v.to(self.device) for k, v in self.mux_collator(model)(self.split.train).items()}
            fit, start = self.fit_unseen(model, batch, method)
            train_after = self.pm_losses(self.split.train, 1.0)
            scales = [1.0] if random_codebook else config.bias_scales
            heldout = {str(float(s)): self.pm_losses(self.split.test, s) for s in scales}
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
        steps = {"adam": config.fit_steps, "fisher": config.fisher_steps, "lbfgs": config.lbfgs_steps}[method]
        return {
            "fit": {
                "method": method,
                "start": start,
                "steps": steps,
                "curve": fit.losses,
                "curves": {p: fit.persona_curves.get(model.persona_index(p), []) for p in self.personas},
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
            "bytes_global": file_size(self.codebook_dir / ADAPTER_WEIGHTS_NAME),
            "bytes_per_persona": {p: file_size(f) + text_bytes(self.text_persona(p)) for p, f in files.items()},
        }
