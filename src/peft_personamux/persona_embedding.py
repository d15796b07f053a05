"""Personas from external embeddings (paper §5, data-driven personas).

Any vector that describes a persona (a recommender's user vector, a sentence embedding of its text persona, the
mean embedding of a few of its lines) can be mapped to a mixture vector without fitting: `EmbeddingMap` is a ridge
regression ``m = (e - e_mean) @ weight + m_mean`` fitted on personas that already have mixtures (the pretraining
personas of a codebook), with its regularisation chosen by exact leave-one-out error.

    embeddings = {name: vector for name, vector in ...}            # personas registered on the codebook
    embedding_map = fit_embedding_map(model, embeddings)            # or EmbeddingMap.fit(E, M)
    persona_from_embedding(model, "users/new_user", vector, embedding_map)   # zero-shot persona
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .persona_files import PersonaFileError, atomic_save
from .tuner.model import PersonaMuxModel, as_tuner, persona_method

FORMAT = "personamux-embedding-map/1"


@dataclass
class EmbeddingMap:
    """Ridge map from an embedding (embedding_dim,) to a mixture vector (num_codes,)."""

    weight: torch.Tensor  # (embedding_dim, num_codes)
    embedding_mean: torch.Tensor  # (embedding_dim,)
    mixture_mean: torch.Tensor  # (num_codes,)
    alpha: float  # ridge penalty chosen by leave-one-out error
    loo_error: float  # mean squared leave-one-out error of the mixtures at `alpha`
    mean_loo_error: float  # the same for predicting the mean mixture (no embedding): the bar the map must beat
    names: list[str] = field(default_factory=list)  # personas it was fitted on
    codebook_fingerprint: str | None = None  # codebook the mixtures belong to

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def num_codes(self) -> int:
        return self.weight.shape[1]

    @classmethod
    def fit(
        cls,
        embeddings: torch.Tensor,
        mixtures: torch.Tensor,
        alphas: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        codebook_fingerprint: str | None = None,
    ) -> EmbeddingMap:
        """Ridge regression of ``mixtures`` (n, num_codes) on ``embeddings`` (n, embedding_dim), n >= 3.

        ``alphas``: penalties to choose from by exact leave-one-out error (default: 25 values spanning 1e-4 to 1e2
        times the largest squared singular value of the centred embeddings, so the choice does not depend on the
        embedding's scale). The intercept is not penalised.
        """
        x = torch.as_tensor(embeddings).detach().double().cpu()
        y = torch.as_tensor(mixtures).detach().double().cpu()
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"`embeddings` (n, embedding_dim) and `mixtures` (n, num_codes) must be 2-D with the same n, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        n = x.shape[0]
        if n < 3:
            raise ValueError(f"An embedding map needs at least 3 personas with mixtures, got {n}.")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("`embeddings` and `mixtures` must be finite.")
        if names is not None and len(names) != n:
            raise ValueError(f"`names` has {len(names)} entries for {n} personas.")
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean  # (n, e), (n, c)
        u, s, vt = torch.linalg.svd(xc, full_matrices=False)  # u (n, r), s (r,), vt (r, e)
        keep = s > s.max() * 1e-10 if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
        u, s, vt = u[:, keep], s[keep], vt[keep]
        top = float(s.max() ** 2) if s.numel() else 1.0
        if alphas is None:
            alphas = [top * 10.0**k for k in torch.linspace(-4, 2, 25).tolist()]
        alphas = [float(a) for a in alphas]
        if not alphas or any(not a > 0 for a in alphas):
            raise ValueError(f"`alphas` must be positive penalties, got {alphas!r}.")
        uty = u.T @ yc  # (r, c)
        # centring adds 1/n to every leverage; leave-one-out residual = residual / (1 - leverage), exactly
        mean_residual = yc / (1.0 - 1.0 / n)
        mean_loo = float((mean_residual**2).sum(1).mean())
        best = None
        for alpha in alphas:
            shrink = s**2 / (s**2 + alpha)  # (r,)
            fitted = u @ (shrink[:, None] * uty)  # (n, c)
            leverage = (u**2 @ shrink) + 1.0 / n  # (n,)
            loo = ((yc - fitted) / (1.0 - leverage)[:, None]) ** 2
            error = float(loo.sum(1).mean())
            if best is None or error < best[1]:
                best = (alpha, error)
        alpha, error = best
        weight = vt.T @ ((s / (s**2 + alpha))[:, None] * uty)  # (e, c)
        dtype = torch.float32
        return cls(
            weight=weight.to(dtype),
            embedding_mean=x_mean.to(dtype),
            mixture_mean=y_mean.to(dtype),
            alpha=alpha,
            loo_error=error,
            mean_loo_error=mean_loo,
            names=list(names) if names is not None else [],
            codebook_fingerprint=codebook_fingerprint,
        )

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mixture vectors (..., num_codes) for embeddings (..., embedding_dim)."""
        e = torch.as_tensor(embeddings).detach().float().cpu()
        if e.shape[-1] != self.embedding_dim:
            raise ValueError(f"Embeddings must have {self.embedding_dim} features, got shape {tuple(e.shape)}.")
        if not torch.isfinite(e).all():
            raise ValueError("Embeddings must be finite.")
        return (e - self.embedding_mean) @ self.weight + self.mixture_mean

    def save(self, path: str | os.PathLike) -> str:
        """Write the map as one safetensors file (tensors + JSON metadata); returns the path."""
        path = Path(path)
        metadata = {
            "format": FORMAT,
            "alpha": repr(self.alpha),
            "loo_error": repr(self.loo_error),
            "mean_loo_error": repr(self.mean_loo_error),
            "names": json.dumps(self.names),
            "codebook_fingerprint": self.codebook_fingerprint or "",
        }
        tensors = {
            "weight": self.weight.contiguous(),
            "embedding_mean": self.embedding_mean.contiguous(),
            "mixture_mean": self.mixture_mean.contiguous(),
        }
        atomic_save(tensors, metadata, str(path))
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingMap:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No embedding map at {path}.")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise PersonaFileError(f"{path} is not an embedding map (format {metadata.get('format')!r}).")
        tensors = load_file(str(path))
        return cls(
            weight=tensors["weight"],
            embedding_mean=tensors["embedding_mean"],
            mixture_mean=tensors["mixture_mean"],
            alpha=float(metadata["alpha"]),
            loo_error=float(metadata["loo_error"]),
            mean_loo_error=float(metadata["mean_loo_error"]),
            names=json.loads(metadata["names"]),
            codebook_fingerprint=metadata["codebook_fingerprint"] or None,
        )


@persona_method
def fit_embedding_map(
    model, embeddings: Mapping[str, torch.Tensor], alphas: Sequence[float] | None = None
) -> EmbeddingMap:
    """`EmbeddingMap` from ``{persona: embedding}`` of personas registered on ``model`` (their current mixtures)."""
    if not embeddings:
        raise ValueError("`embeddings` must map at least 3 registered personas to vectors, got an empty mapping.")
    tuner = as_tuner(model)
    names = list(embeddings)
    unknown = [n for n in names if n not in tuner.personas]
    if unknown:
        raise ValueError(f"Personas without a mixture on this model: {unknown[:5]}. Register or load them first.")
    x = torch.stack([torch.as_tensor(embeddings[n]).detach().float().cpu().reshape(-1) for n in names])
    y = torch.stack([tuner.get_mixture(n).float().cpu() for n in names])  # (n, num_codes)
    return EmbeddingMap.fit(x, y, alphas, names, tuner.codebook_fingerprint())


@persona_method
def persona_from_embedding(
    model, name: str, embedding: torch.Tensor, embedding_map: EmbeddingMap, exist_ok: bool = False
) -> str:
    """Register persona ``name`` with the mixture the map predicts for ``embedding`` (no fitting). Returns name."""
    tuner = as_tuner(model)
    num_codes = tuner.adapter_config().num_codes
    if embedding_map.num_codes != num_codes:
        raise ValueError(
            f"The embedding map predicts {embedding_map.num_codes} weights; this codebook has {num_codes} codes."
        )
    fingerprint = embedding_map.codebook_fingerprint
    if fingerprint and fingerprint != tuner.codebook_fingerprint():
        raise ValueError(
            f"The embedding map was fitted on mixtures of codebook {fingerprint}, not this one "
            f"({tuner.codebook_fingerprint()}): refit it on this codebook's personas."
        )
    mixture = embedding_map(torch.as_tensor(embedding).reshape(-1))  # (num_codes,)
    tuner.add_persona(name, mixture=mixture, exist_ok=exist_ok)  # writes the mixture, also over an existing one
    return name


@torch.no_grad()
def embed_texts(
    model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128, progress: bool = False
) -> torch.Tensor:
    """Mean-pooled last hidden states of the frozen base model, (len(texts), hidden) in float32 on CPU.

    A sentence embedding that needs no extra model: e.g. ``embed_texts(model, tok, lines).mean(0)`` embeds a persona
    by a few of its lines. ``model`` may be a plain transformers model or one wrapped by Persona-Mux (the soft prompt
    is not used).
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("`texts` must be a non-empty list of strings.")
    backbone = _base_model(model).base_model  # transformers: the decoder without its LM head
    device = next(backbone.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embed texts", disable=not progress or len(starts) < 2):
        ids = [
            tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] or [pad]
            for t in texts[start : start + batch_size]
        ]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)  # (b, width)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)  # right padding
        hidden = backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()  # (b, width, hidden)
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (b, hidden)
        out.append(pooled.cpu())
    return torch.cat(out)


def _base_model(model):
    """The transformers model under a PeftModel / PersonaMuxModel (or ``model`` itself)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if isinstance(model, PersonaMuxModel):
        model = model.model
    return model
