"""What a persona's fit can gain inside a codebook's span: the quadratic model, and the codebook that maximises it.

Near the fits' start prompt, a persona's mean token loss is about ``L(x) = L0 + g.x + x.H.x / 2`` for a change ``x``
of the mixed tokens (``D = tokens_per_code * hidden`` numbers): ``g`` is the persona's gradient, ``H`` the curvature,
which this module takes as the empirical Fisher of the lines, ``sum_j G_j G_j^T / sum_j T_j`` (``G_j`` the gradient of
line j's summed NLL, ``T_j`` its tokens), pooled over many personas. A fit confined to a span ``Q`` (D, k) converges
to ``x = -Q A^-1 Q^T g`` with ``A = Q^T H Q`` and gains ``g_Q . A^-1 g_Q / 2`` on its training lines. On held-out
lines that step gains ``h_Q . A^-1 g_Q - g_Q . A^-1 g_Q / 2`` (``h`` their gradient): the part of ``g`` that is line
noise (covariance ``H / T``) adds ``k / 2T`` to the training gain and takes as much from the held-out one, so every
fitted number costs about ``1 / 2T`` nats of held-out loss at convergence, whatever the span.

What a span should hold is then the persona *signal*: the second moment of the personas' expected gradients,
``S = E_p[mu_p mu_p^T]``, estimated without the line noise from two disjoint halves of each persona's lines,
``(g_a g_b^T + g_b g_a^T) / 2`` (their noise is independent). The span of k codes with the largest expected
held-out gain, ``tr(A^-1 Q^T S Q) / 2 - k / 2T``, is that of the top k generalised eigenvectors of ``(S, H)``: the
*contrast codebook*. The principal directions of the raw persona gradients (`codebook_init.codebook_from_gradients`)
favour the steepest directions instead. Measured on the shipped codebook (docs/results.md, seventh pass), the
contrast codebook lost to them on unseen characters, as the model predicted from their gradients: the pretraining
characters' most signal per unit of curvature lies in flat directions that other plays' characters barely use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .prompt_gradients import LineGradients

CODE_SCALES = ("equal", "whiten")  # how a computed codebook's code norms are set
# dampings tried by cross-validation, in units of the curvature's mean eigenvalue (0: the converged fit)
DAMPING_FACTORS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)


def _flat(lines: LineGradients) -> torch.Tensor:
    return lines.gradients.flatten(1).double()  # (lines, D)


@dataclass
class Curvature:
    """``H = (1 - s) G^T G / T + s * m * I``: the empirical Fisher of the mean token loss (``G``: (lines, D) line
    gradients, ``T`` their tokens), shrunk toward its mean eigenvalue ``m`` by ``s``. Kept low-rank: never (D, D)."""

    lines: torch.Tensor  # (lines, D) float64
    tokens: int
    shrinkage: float
    _spectrum: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def mean_eigenvalue(self) -> float:
        return float((self.lines**2).sum()) / (self.tokens * self.lines.shape[1])

    @property
    def floor(self) -> float:
        """H's eigenvalue outside the lines' span, ``s * m``."""
        return self.shrinkage * self.mean_eigenvalue

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, r) orthonormal basis of the lines' span and H's eigenvalues there (r,), so that
        ``H = V diag(e) V^T + floor (I - V V^T)``. Computed once (an SVD of the lines)."""
        if self._spectrum is None:
            _, singular, vh = torch.linalg.svd(self.lines, full_matrices=False)
            keep = singular > singular[0] * 1e-8
            evals = (1 - self.shrinkage) * singular[keep] ** 2 / self.tokens + self.floor
            self._spectrum = (vh[keep].T, evals)
        return self._spectrum

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        """``basis^T H basis``, (k, k) for a (D, k) basis."""
        gb = self.lines @ basis  # (lines, k)
        return (1 - self.shrinkage) * gb.T @ gb / self.tokens + self.floor * basis.T @ basis

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H vectors`` for (D,) or (D, n) vectors."""
        return (1 - self.shrinkage) * self.lines.T @ (self.lines @ vectors) / self.tokens + self.floor * vectors

    def solve(self, vectors: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """``(H + damping I)^-1 vectors`` over every direction, for (D,) or (D, n) vectors."""
        if self.floor + damping <= 0:
            raise ValueError(
                "Solving over every direction needs `shrinkage` > 0 or `damping` > 0: the line Fisher is singular."
            )
        basis, evals = self.spectrum()
        inside = basis.T @ vectors  # (r,) or (r, n)
        scale = (evals + damping).reshape(-1, *[1] * (vectors.dim() - 1))
        return basis @ (inside / scale) + (vectors - basis @ inside) / (self.floor + damping)


def curvature(lines: LineGradients, shrinkage: float = 0.2) -> Curvature:
    """The lines' curvature, shrunk by ``shrinkage`` in [0, 1] (with fewer lines than D the Fisher is singular)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"`shrinkage` must be in [0, 1], got {shrinkage!r}.")
    return Curvature(_flat(lines), max(int(lines.tokens.sum()), 1), shrinkage)


def persona_halves(lines: LineGradients) -> tuple[torch.Tensor, torch.Tensor]:
    """(personas, D) each: mean-token-loss gradients of two disjoint halves (alternate lines) of every persona's
    lines; personas with fewer than 2 lines are skipped."""
    g, tokens, ids = _flat(lines), lines.tokens.double(), lines.persona_ids
    halves: tuple[list, list] = ([], [])
    for persona in sorted(set(ids.tolist())):
        rows = (ids == persona).nonzero()[:, 0]
        if len(rows) < 2:
            continue
        for out, half in zip(halves, (rows[0::2], rows[1::2])):
            out.append(g[half].sum(0) / tokens[half].sum().clamp(min=1))
    if not halves[0]:
        raise ValueError("The persona signal needs at least one persona with 2 or more lines.")
    return torch.stack(halves[0]), torch.stack(halves[1])


@torch.no_grad()
def contrast_codebook(
    lines: LineGradients,
    num_codes: int,
    code_norm: float,
    shrinkage: float = 0.2,
    scale: str = "whiten",
    seed: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Codebook (num_codes, tokens_per_code, hidden) of the top generalised eigenvectors of (signal, curvature).

    The signal is ``S = mean_p (a_p b_p^T + b_p a_p^T) / 2`` over the personas' two halves (`persona_halves`): their
    line noise is independent, so S estimates ``E_p[mu_p mu_p^T]`` without it. Returns the codebook and the share of
    the positive signal-to-curvature eigenvalues its codes hold. ``scale``: ``"whiten"`` gives every code the same
    curvature (mean norm ``code_norm``), ``"equal"`` the norm ``code_norm`` each. ``shrinkage`` as in `curvature`.
    With fewer independent line gradients than codes, the rest are random directions outside their span (no signal
    there), drawn with ``seed``.
    """
    if scale not in CODE_SCALES:
        raise ValueError(f"`scale` must be one of {CODE_SCALES}, got {scale!r}.")
    curv = curvature(lines, shrinkage)
    basis, evals = curv.spectrum()  # the signal lies in the span of the line gradients: work there
    a, b = (half @ basis for half in persona_halves(lines))  # (personas, r) each
    signal = (a.T @ b + b.T @ a) / (2 * a.shape[0])  # (r, r)
    inv_sqrt = evals.clamp(min=evals.max() * 1e-12).rsqrt()  # (r,)
    ratio, vecs = torch.linalg.eigh(inv_sqrt[:, None] * signal * inv_sqrt[None, :])  # ascending
    top, vecs = ratio.flip(0)[:num_codes], vecs.flip(1)[:, :num_codes]
    directions = (basis @ (inv_sqrt[:, None] * vecs)).T  # (k, D), each with unit curvature
    if directions.shape[0] < num_codes:
        if shrinkage <= 0:
            raise ValueError(
                f"Only {directions.shape[0]} independent line gradients for {num_codes} codes: the rest need "
                "`shrinkage` > 0 (the lines give no curvature outside their span)."
            )
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        extra = torch.randn(num_codes - len(directions), basis.shape[0], dtype=basis.dtype, generator=generator)
        extra -= extra @ basis @ basis.T
        extra = torch.linalg.qr(extra.T).Q.T / curv.floor**0.5  # unit curvature too
        directions = torch.cat([directions, extra])
    share = float(top.clamp(min=0).sum() / ratio.clamp(min=0).sum().clamp(min=1e-30))
    norms = directions.norm(dim=1, keepdim=True)
    directions = directions / norms.mean() if scale == "whiten" else directions / norms
    shape = lines.gradients.shape[1:]
    return (directions * code_norm).float().reshape(num_codes, *shape), share


@torch.no_grad()
def quadratic_gain_rows(
    codes: torch.Tensor | None, curv: Curvature, train: torch.Tensor, test: torch.Tensor, damping: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out gains (n,) each of n fits in the span of ``codes`` under the quadratic model.

    ``codes``: (num_codes, tokens_per_code, hidden), or None for every direction (free prompt); ``train``, ``test``:
    (n, ...) mean-token-loss gradients of each fit's training and held-out lines. ``damping`` >= 0: the fit stops at
    ``x = -(A + damping I)^-1 g`` (A: H in the span), the model's early stopping; 0 is convergence.
    """
    if damping < 0:
        raise ValueError(f"`damping` must be >= 0, got {damping!r}.")
    g, h = train.flatten(1).double().T, test.flatten(1).double().T  # (D, n) each
    if codes is None:
        step = -curv.solve(g, damping)  # (D, n)
        curved = (step * curv.apply(step)).sum(0)  # (n,) step.H.step
    else:
        u, singular, _ = torch.linalg.svd(codes.detach().flatten(1).double().T, full_matrices=False)
        basis = u[:, singular > singular[0] * 1e-6]  # (D, k) orthonormal; a code already in the span adds nothing
        inner = curv.project(basis)  # (k, k)
        coefficients = -torch.linalg.solve(inner + damping * torch.eye(len(inner), dtype=inner.dtype), basis.T @ g)
        step, curved = basis @ coefficients, (coefficients * (inner @ coefficients)).sum(0)  # (D, n), (n,)
    return -((g * step).sum(0) + curved / 2), -((h * step).sum(0) + curved / 2)


@torch.no_grad()
def quadratic_steps(codes: torch.Tensor, curv: Curvature, train: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """Mixture changes (n, num_codes) of n fits in the span of ``codes`` under the quadratic model: the weights ``w``
    with ``x = W^T w`` minimising ``g.x + x.H.x / 2 + damping / 2 * |x|^2``, i.e.
    ``w = -(Q^T H Q + damping Q^T Q)^-1 Q^T g`` (Q: (D, num_codes) the flattened codes, linearly independent).

    ``codes``: (num_codes, tokens_per_code, hidden); ``train``: (n, ...) mean-token-loss gradients. The step
    `quadratic_gain_rows` scores, in the codes' own coordinates: what a converged (or damped) fit adds to a mixture.
    """
    if damping < 0:
        raise ValueError(f"`damping` must be >= 0, got {damping!r}.")
    q = codes.detach().flatten(1).double().T  # (D, num_codes)
    g = train.flatten(1).double().T  # (D, n)
    inner = curv.project(q) + damping * q.T @ q  # (num_codes, num_codes)
    return -torch.linalg.solve(inner, q.T @ g).T  # (n, num_codes)


def quadratic_gains(
    codes: torch.Tensor | None, curv: Curvature, train: torch.Tensor, test: torch.Tensor
) -> tuple[float, float]:
    """`quadratic_gain_rows` of one persona's converged fit: ``train``, ``test`` are D numbers (any shape)."""
    gains = quadratic_gain_rows(codes, curv, train.reshape(1, -1), test.reshape(1, -1))
    return float(gains[0][0]), float(gains[1][0])


@torch.no_grad()
def cross_validated_damping(
    codes: torch.Tensor | None, curv: Curvature, lines: LineGradients, dampings: Sequence[float], folds: int = 5
) -> dict[int, float]:
    """Per persona row of ``lines``: the damping (of ``dampings``) whose fit on all but one of ``folds`` alternate
    folds of its lines gains most on the fold left out, on average (quadratic model). Personas with fewer lines than
    folds are skipped."""
    if folds < 2:
        raise ValueError(f"`folds` must be >= 2, got {folds!r}.")
    if not dampings:
        raise ValueError("`dampings` must hold at least one value.")
    g, tokens, ids = _flat(lines), lines.tokens.double(), lines.persona_ids
    personas, fit, held = [], [], []  # fit, held: (personas * folds, D) mean-token gradients
    for persona in sorted(set(ids.tolist())):
        rows = (ids == persona).nonzero()[:, 0]
        if len(rows) < folds:
            continue
        personas.append(persona)
        for fold in range(folds):
            out = torch.zeros(len(rows), dtype=torch.bool)
            out[fold::folds] = True
            fit.append(g[rows[~out]].sum(0) / tokens[rows[~out]].sum().clamp(min=1))
            held.append(g[rows[out]].sum(0) / tokens[rows[out]].sum().clamp(min=1))
    if not personas:
        raise ValueError(f"Cross-validation needs a persona with at least {folds} lines.")
    fit_, held_ = torch.stack(fit), torch.stack(held)
    scores = torch.stack(
        [quadratic_gain_rows(codes, curv, fit_, held_, d)[1].reshape(-1, folds).mean(1) for d in dampings]
    )  # (dampings, personas)
    best = scores.argmax(0)
    return {persona: float(dampings[int(b)]) for persona, b in zip(personas, best)}


@torch.no_grad()
def cross_validated_gains(
    codes: torch.Tensor | None,
    curv: Curvature,
    lines: LineGradients,
    test: Mapping[int, torch.Tensor],
    factors: Sequence[float] = DAMPING_FACTORS,
    folds: int = 5,
) -> dict[int, tuple[float, float]]:
    """Per persona row of ``lines``: the held-out gain (``test``: row -> its held-out lines' mean-token-loss
    gradient) of its fit on all its lines, damped as `cross_validated_damping` picks among ``factors`` x the mean
    eigenvalue, and that factor."""
    unit = curv.mean_eigenvalue
    dampings = [f * unit for f in factors]
    chosen = cross_validated_damping(codes, curv, lines, dampings, folds)
    means = lines.persona_means()
    out = {}
    for row, damping in chosen.items():
        _, held = quadratic_gain_rows(codes, curv, means[row][None], test[row][None], damping)
        picked = min(range(len(factors)), key=lambda i: abs(float(dampings[i]) - damping))
        out[row] = (float(held[0]), factors[picked])  # the factor itself: damping / unit may differ in the last bit
    return out
