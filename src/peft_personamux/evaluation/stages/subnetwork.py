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

from ...subnetwork import Granularity, SubnetworkBank, SubnetworkConfig, apply_weight_mask, collect_statistics
from ...subnetwork.calibrate import calibrate_subnetwork
from ...subnetwork.evaluate import general_loss
from ...subnetwork.statistics import unwrap_model
from ..common import SUBNETWORK_VARIANTS, subnetwork_key
from ..methods import codebook_tensors, mux_format, persona_losses
from ..metrics import count_parameters

WEIGHT, CHANNEL, COMBINED = SUBNETWORK_VARIANTS


def identification_summary(matrix: list[list[float]], personas: list[str]) -> dict:
    """``matrix[i][j]``: loss of persona i's held-out lines under persona j's mask; accuracy of argmin vs chance,
    and the own-mask advantage (mean loss under the others' masks minus under the own)."""
    predicted = [min(range(len(row)), key=row.__getitem__) for row in matrix]
    gaps = [
        sum(v for j, v in enumerate(row) if j != i) / max(len(row) - 1, 1) - row[i] for i, row in enumerate(matrix)
    ]
    return {
        "loss_matrix": matrix,
        "predicted": [personas[j] for j in predicted],
        "accuracy": sum(int(j == i) for i, j in enumerate(predicted)) / len(personas),
        "chance": 1 / len(personas),
        "own_mask_advantage": gaps,
    }


class SubnetworkStage:
    """Mixed into `runner.Evaluation`: the stage ``subnetwork``."""

    def subnetwork_config(self) -> SubnetworkConfig:
        c = self.config
        return SubnetworkConfig(
            statistic=c.subnetwork_statistic, max_length=c.max_prompt_tokens + c.max_response_tokens
        )

    def subnetwork_stage(self, fitted_mixtures: dict[str, list[float]], partial: dict, save) -> dict:
        """Every subnetwork row; ``fitted_mixtures`` (the pm_fisher stage's) are the soft prompts of the combined
        rows. Resumable per persona's statistics and per sparsity."""
        config = self.config
        base, tokenizer = self.base()
        mux = self.personamux()
        with torch.no_grad():
            for p in self.personas:
                mux.set_mixture(p, torch.tensor(fitted_mixtures[p]))
        inner = unwrap_model(mux)  # the base LM under the soft prompt: its own Linear modules, its own hooks
        sub_config = self.subnetwork_config()
        plain = self.plain_formats(self.personas)
        test = {p: self.split.rows_of("test", p) for p in self.personas}
        out = partial or {"methods": {}, "statistics_seconds": {}, "identification": {}, "general": {}}

        def score(model, rows) -> dict[str, float]:
            return persona_losses(model, tokenizer, rows, plain, self.placeholder_id, config)

        out["general"].setdefault("base", general_loss(base, tokenizer))
        stats, seconds = {}, out["statistics_seconds"]
        for p in tqdm(self.personas, desc="subnetwork: calibrate"):
            start = time.perf_counter()
            stats[p] = collect_statistics(base, tokenizer, self.split.rows_of("train", p), sub_config, progress=False)
            seconds.setdefault(p, time.perf_counter() - start)  # a resumed run keeps the first measurement
        for sparsity in config.subnetwork_sparsities:
            if all(subnetwork_key(v, sparsity) in out["methods"] for v in SUBNETWORK_VARIANTS):
                continue
            rows = self._sparsity_rows(sparsity, stats, (base, inner, mux), score, test, sub_config, out)
            out["methods"].update(rows)
            save(out)
        return out

    def _sparsity_rows(self, sparsity, stats, models, score, test, sub_config, out) -> dict[str, dict]:
        """The three rows at one sparsity (``models``: the base LM, the LM under the soft prompt, the Persona-Mux
        model); identification matrices go into ``out``."""
        config, personas, tokenizer = self.config, self.personas, self.tokenizer
        base, inner, mux = models
        plain = self.plain_formats(personas)
        num_codes = mux.base_model.adapter_config().num_codes
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
            masks = {}
            for p in tqdm(personas, desc=f"subnetwork {variant} @{sparsity:g}"):
                start = time.perf_counter()
                masks[p] = calibrate_subnetwork(
                    base, tokenizer, [], p, config=cfg, statistics=stats[p], progress=False
                )
                build = time.perf_counter() - start
                entry = entries[variant]
                entry["seconds_per_persona"][p] = out["statistics_seconds"][p] + build
                entry["bytes_per_persona"][p] = masks[p].packed_bytes
                entry["params_per_persona"] = masks[p].num_bits
                if granularity == Granularity.CHANNEL:
                    bank.add(masks[p])
                    mux_bank.add(masks[p])
                with self._masked(base, bank, masks[p], granularity):
                    entry["heldout_loss"]["1.0"][p] = score(base, test[p])[p]
                    entry["generations"]["1.0"][p] = self.generate(base, plain[p], p)
                    entry["general_loss"][p] = general_loss(base, tokenizer)
            matrix = []  # matrix[i][j]: persona i's held-out lines under persona j's mask
            for p in tqdm(personas, desc=f"subnetwork {variant} @{sparsity:g}: identification"):
                row = []
                for q in personas:
                    with self._masked(base, bank, masks[q], granularity):
                        row.append(score(base, test[p])[p])
                matrix.append(row)
            out["identification"][subnetwork_key(variant, sparsity)] = identification_summary(matrix, personas)
            del masks
        combined = entries[COMBINED]
        combined["params_global"] = count_parameters(*codebook_tensors(mux))  # the codebook and bias tokens
        combined["params_per_persona"] = entries[CHANNEL]["params_per_persona"] + num_codes
        matrix = [[0.0] * len(personas) for _ in personas]
        for j, q in enumerate(tqdm(personas, desc=f"subnetwork {COMBINED} @{sparsity:g}")):
            combined["bytes_per_persona"][q] = entries[CHANNEL]["bytes_per_persona"][q] + 4 * num_codes
            combined["seconds_per_persona"][q] = entries[CHANNEL]["seconds_per_persona"][q]
            combined["general_loss"][q] = entries[CHANNEL]["general_loss"][q]  # plain text: the soft prompt is off
            with mux_bank.apply(q):
                for i, p in enumerate(personas):  # persona p's lines, persona q's mask and mixture
                    matrix[i][j] = self.pm_losses_of(test[p], q)
                combined["heldout_loss"]["1.0"][q] = matrix[j][j]
                n = len(self.generation_rows(q))
                fmt = mux_format(config.instruction, self.text_persona(q))
                combined["generations"]["1.0"][q] = self.generate(mux, fmt, q, persona_ids=[q] * n, bias_scale=1.0)
        out["identification"][subnetwork_key(COMBINED, sparsity)] = identification_summary(matrix, personas)
        for entry in entries.values():
            entry["general_loss_mean"] = sum(entry["general_loss"].values()) / len(personas)
        return {subnetwork_key(v, sparsity): entry for v, entry in entries.items()}

    def pm_losses_of(self, rows: list[dict], persona: str) -> float:
        """Loss of ``rows`` (any persona's lines) under ``persona``'s mixture and text persona, at bias 1."""
        from datasets import Dataset

        from ...training import evaluate_loss

        relabelled = Dataset.from_list([{**r, "persona": persona} for r in rows])
        return evaluate_loss(self.personamux(), self.tokenizer, relabelled, [persona], 1.0, **self.eval_kwargs())[
            persona
        ]

    @staticmethod
    def _masked(base, bank: SubnetworkBank, mask, granularity: Granularity):
        return apply_weight_mask(base, mask) if granularity == Granularity.WEIGHT else bank.apply(mask.name)
