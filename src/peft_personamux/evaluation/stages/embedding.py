"""Evaluation stage ``pm_embedding``: zero-shot personas from an embedding of their lines (issue 5, paper §5)."""

from __future__ import annotations

import random

import torch

from ...persona_files import list_persona_files
from ..methods import zero_mixtures


class EmbeddingStage:
    """Mixed into `runner.Evaluation`: the stage ``pm_embedding``."""

    def pm_embedding_stage(self, fitted: dict[str, list[float]]) -> dict:
        """Zero-shot personas (issue 5, paper §5): a ridge map from an embedding of a persona's lines (mean-pooled
        base-model states of ``num_train`` lines) to its mixture, fitted on the codebook's pretraining personas and
        applied to the unseen ones; held-out loss at bias 1 beside the mean pretraining mixture (no embedding)."""
        from ...persona_embedding import EmbeddingMap, embed_texts
        from ...persona_files import read_persona_file
        from ..data import load_rows

        config = self.config
        model = self.personamux()
        num_codes = model.base_model.adapter_config().num_codes
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
            heldout[key] = self.pm_losses(self.split.test, 1.0)
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
