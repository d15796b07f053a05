"""Evaluation stage ``subnetwork``: training-free persona masks (issue 11) on the same split and metrics as
Persona-Mux.

Per unseen persona, channel statistics of its training lines (forward passes only) give, at each of
``subnetwork_sparsities``: the faithful weight mask (``weight_mask@s``), the servable channel mask
(``channel_mask@s``) and the channel mask on top of the persona's fitted Persona-Mux mixture
(``channel_mask+soft_prompt@s``, the ``pm_fisher`` mixtures). Each row gets held-out loss and generations (so the
judge and who-said-it stages score it like every other method), bytes and seconds per persona, likelihood
identification (each persona's held-out lines under every persona's mask) and the loss on a generic,
non-Shakespeare text (`subnetwork.general_text`): a mask that only breaks the model shows there.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from tqdm.auto import tqdm

from ...files import ADAPTER_WEIGHTS_NAME
from ...subnetwork import (
    ChannelLayout,
    Granularity,
    SubnetworkBank,
    SubnetworkConfig,
    apply_weight_mask,
    calibrate_subnetwork,
    collect_statistics,
)
from ...subnetwork.evaluate import general_loss
from ...subnetwork.statistics import unwrap_model
from ..common import SUBNETWORK_VARIANTS, file_size, subnetwork_key
from ..methods import codebook_tensors, mux_format, persona_losses
from ..metrics import count_parameters, identification_summary, text_bytes

WEIGHT, CHANNEL, COMBINED = SUBNETWORK_VARIANTS


class SubnetworkStage:
    """Mixed into `runner.Evaluation`: the stage ``subnetwork``."""

    def subnetwork_config(self) -> SubnetworkConfig:
        c = self.config
        return SubnetworkConfig(
            statistic=c.subnetwork_statistic, max_length=c.max_prompt_tokens + c.max_response_tokens
        )

    def check_subnetwork_model(self) -> None:
        """Fail before the first stage, not hours later, when the base model cannot take channel masks."""
        try:
            ChannelLayout.of(self.base()[0])
        except ValueError as error:
            raise ValueError(
                f"`subnetwork_sparsities` {self.config.subnetwork_sparsities} asks for subnetwork rows, but {error} "
                "Set `subnetwork_sparsities` to [] in the config to leave those rows out."
            ) from None

    def subnetwork_stage(self, fitted_mixtures: dict[str, list[float]], partial: dict, save) -> dict:
        """Every subnetwork row; ``fitted_mixtures`` (the pm_fisher stage's) are the soft prompts of the combined
        rows. Saved after each sparsity (a resumed run recomputes the statistics: forward passes only)."""
        config = self.config
        base, tokenizer = self.base()
        mux = self.personamux()
        with torch.no_grad():
            for p in self.personas:
                mux.set_mixture(p, torch.tensor(fitted_mixtures[p]))
        inner = unwrap_model(mux)  # the base LM under the soft prompt: its own Linear modules, its own hooks
        sub_config = self.subnetwork_config()
        plain = self.plain_formats(self.personas)
        out = partial or {"methods": {}, "statistics_seconds": {}, "identification": {}, "general": {}}

        def score(model, rows) -> dict[str, float]:
            return persona_losses(model, tokenizer, rows, plain, self.placeholder_id, config)

        if "base" not in out["general"]:
            out["general"]["base"] = general_loss(base, tokenizer)
        stats, seconds = {}, out["statistics_seconds"]
        for p in tqdm(self.personas, desc="subnetwork: calibrate"):
            start = time.perf_counter()
            stats[p] = collect_statistics(base, tokenizer, self.split.rows_of("train", p), sub_config, progress=False)
            seconds.setdefault(p, time.perf_counter() - start)  # a resumed run keeps the first measurement
        for sparsity in config.subnetwork_sparsities:
            if all(subnetwork_key(v, sparsity) in out["methods"] for v in SUBNETWORK_VARIANTS):
                continue
            rows = self._sparsity_rows(sparsity, stats, (base, inner, mux), score, sub_config, out)
            out["methods"].update(rows)
            save(out)
        return out

    def _sparsity_rows(self, sparsity, stats, models, score, sub_config, out) -> dict[str, dict]:
        """The three rows at one sparsity (``models``: the base LM, the LM under the soft prompt, the Persona-Mux
        model). Every persona's held-out lines are scored under every persona's mask; the diagonal is the row's
        held-out loss, the matrix goes to ``out["identification"]``."""
        config, personas, tokenizer = self.config, self.personas, self.tokenizer
        base, inner, mux = models
        plain = self.plain_formats(personas)
        num_codes = mux.base_model.adapter_config().num_codes
        fisher = self.cache.get("pm_fisher") or {}
        fit_seconds = (fisher.get("fit") or {}).get("seconds", 0.0) / len(personas)  # all personas fitted at once
        entries = {
            v: {
                "heldout_loss": {"1.0": {}},
                "generations": {"1.0": {}},
                "params_global": 0,
                "bytes_global": 0,
                "bytes_per_persona": {},
                "seconds_per_persona": {},
                "general_loss": {},
            }
            for v in SUBNETWORK_VARIANTS
        }
        bank, mux_bank = SubnetworkBank(base), SubnetworkBank(inner)
        for granularity, variant in ((Granularity.WEIGHT, WEIGHT), (Granularity.CHANNEL, CHANNEL)):
            cfg = dataclasses.replace(sub_config, granularity=granularity, sparsity=sparsity)
            entry = entries[variant]
            columns = {}  # columns[q][p]: persona p's held-out loss under persona q's mask
            for q in tqdm(personas, desc=f"subnetwork {variant} @{sparsity:g}"):
                start = time.perf_counter()
                mask = calibrate_subnetwork(base, tokenizer, [], q, config=cfg, statistics=stats[q], progress=False)
                entry["seconds_per_persona"][q] = out["statistics_seconds"][q] + time.perf_counter() - start
                entry["bytes_per_persona"][q] = mask.packed_bytes
                entry["params_per_persona"] = mask.num_bits  # one bit per masked unit
                if granularity == Granularity.CHANNEL:
                    bank.add(mask)
                    mux_bank.add(mask)
                with self._masked(base, bank, mask, granularity):
                    columns[q] = score(base, self.split.test)
                    entry["generations"]["1.0"][q] = self.generate(base, plain[q], q)
                    entry["general_loss"][q] = general_loss(base, tokenizer)
                entry["heldout_loss"]["1.0"][q] = columns[q][q]
            matrix = [[columns[q][p] for q in personas] for p in personas]  # (personas, personas): lines x mask
            out["identification"][subnetwork_key(variant, sparsity)] = identification_summary(matrix, personas)
        combined = entries[COMBINED]
        codebook, bias = codebook_tensors(mux)
        combined["params_global"] = count_parameters(codebook, bias)
        combined["bytes_global"] = file_size(self.codebook_dir / ADAPTER_WEIGHTS_NAME)
        combined["params_per_persona"] = entries[CHANNEL]["params_per_persona"] + num_codes  # bits + 64 floats
        columns = {}
        for q in tqdm(personas, desc=f"subnetwork {COMBINED} @{sparsity:g}"):
            mask_bytes = entries[CHANNEL]["bytes_per_persona"][q]
            combined["bytes_per_persona"][q] = mask_bytes + 4 * num_codes + text_bytes(self.text_persona(q))
            combined["seconds_per_persona"][q] = entries[CHANNEL]["seconds_per_persona"][q] + fit_seconds
            combined["general_loss"][q] = entries[CHANNEL]["general_loss"][q]  # plain text: the soft prompt is off
            with mux_bank.apply(q):
                columns[q] = {p: self.pm_loss_under(q, p) for p in personas}
                n = len(self.generation_rows(q))
                fmt = mux_format(config.instruction, self.text_persona(q))
                combined["generations"]["1.0"][q] = self.generate(mux, fmt, q, persona_ids=[q] * n, bias_scale=1.0)
            combined["heldout_loss"]["1.0"][q] = columns[q][q]
        matrix = [[columns[q][p] for q in personas] for p in personas]  # (personas, personas): lines x mask+mixture
        out["identification"][subnetwork_key(COMBINED, sparsity)] = identification_summary(matrix, personas)
        return {subnetwork_key(v, sparsity): entry for v, entry in entries.items()}

    def pm_loss_under(self, persona: str, owner: str) -> float:
        """Loss of ``owner``'s held-out lines under ``persona``'s mixture, at bias 1, the prompt keeping ``owner``'s
        text persona (only the mixture and the mask are swapped, as in the other identification matrices)."""
        from datasets import Dataset

        from ...training import evaluate_loss

        kwargs = self.eval_kwargs()
        if kwargs["text_personas"] is not None:
            own = self.text_persona(owner)
            kwargs["text_personas"] = {persona: own} if own else None
        rows = Dataset.from_list([{**r, "persona": persona} for r in self.split.rows_of("test", owner)])
        return evaluate_loss(self.personamux(), self.tokenizer, rows, [persona], 1.0, **kwargs)[persona]

    @staticmethod
    def _masked(base, bank: SubnetworkBank, mask, granularity: Granularity):
        return apply_weight_mask(base, mask) if granularity == Granularity.WEIGHT else bank.apply(mask.name)
