"""Evaluation stages of the baselines: the base model (text persona + instruction), ICL, LoRA, soft prompts."""

from __future__ import annotations

import gc
import time

from tqdm.auto import tqdm

from ...files import ADAPTER_WEIGHTS_NAME
from ..common import file_size
from ..methods import SoftPrompts, encode_rows, persona_losses, train_lora
from ..metrics import count_parameters, text_bytes


class BaselineStages:
    """Mixed into `runner.Evaluation`: the stages ``base_icl``, ``lora`` and ``sp``."""

    def base_icl_stage(self, partial: dict, save) -> dict:
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

    def lora_stage(self, partial: dict, save) -> dict:
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
            "bytes_global": file_size(directory / ADAPTER_WEIGHTS_NAME),
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

    def sp_stage(self, partial: dict, save) -> dict:
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
            seed = SoftPrompts.seed_for(self.config, persona)
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
                "bytes": file_size(directory / ADAPTER_WEIGHTS_NAME),
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
