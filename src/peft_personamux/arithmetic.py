"""Persona arithmetic: blends of mixture vectors and a 2-D map of all personas."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch

from .tuner.model import persona_method


@persona_method
def blend_personas(model, weights: dict[str, float], name: str | None = None) -> str:
    """Register a persona whose mixture is ``sum(w * m_name)``; returns its name (default ``blend/<hash>``)."""
    if not weights:
        raise ValueError("`weights` must name at least one persona, got an empty dict.")
    mixture = None
    for persona, weight in weights.items():
        if not isinstance(weight, (int, float)) or weight != weight:
            raise ValueError(f"Blend weight for {persona!r} must be a number, got {weight!r}.")
        term = model.get_mixture(persona) * float(weight)
        mixture = term if mixture is None else mixture + term
    if name is None:
        key = ",".join(f"{k}={float(v):g}" for k, v in sorted(weights.items()))
        name = "blend/" + hashlib.sha256(key.encode()).hexdigest()[:8]
    model.add_persona(name, mixture=mixture, exist_ok=True)
    model.set_mixture(name, mixture)
    return name


def persona_pca(model, names: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """Names and their 2-D PCA coordinates (num_personas, 2) of the mixture vectors."""
    names = list(names) if names is not None else model.personas
    if len(names) < 2:
        raise ValueError(f"A persona map needs at least 2 personas, got {len(names)}.")
    table = torch.stack([model.get_mixture(n).float().cpu() for n in names])  # (num_personas, num_codes)
    centered = table - table.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    coords = centered @ v[:2].T  # (num_personas, <=2)
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1])], 1)
    return names, coords


@persona_method
def persona_map(
    model, path: str | os.PathLike = "persona_map.png", names: Sequence[str] | None = None, max_labels: int = 80
) -> str:
    """Write a PNG of the personas' mixture vectors projected on their first two principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, coords = persona_pca(model, names)
    groups = sorted({n.split("/")[0] for n in names})
    colour = {g: plt.cm.tab20(i % 20) for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(9, 7))
    ax.scatter(coords[:, 0], coords[:, 1], s=14, c=[colour[n.split("/")[0]] for n in names])
    step = max(1, len(names) // max_labels)
    for i in range(0, len(names), step):
        ax.annotate(names[i], coords[i].tolist(), fontsize=6, alpha=0.8)
    ax.set(title=f"Persona map: {len(names)} mixture vectors (PCA)", xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
