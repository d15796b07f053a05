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

from dataclasses import dataclass

import torch

from .prompt_gradients import LineGradients

CODE_SCALES = ("equal", "whiten")  # how a computed codebook's code norms are set


def _flat(lines: LineGradients) -> torch.Tensor:
    return lines.gradients.flatten(1).double()  # (lines, D)


@dataclass
class Curvature:
    """``H = (1 - s) G^T G / T + s * m * I``: the empirical Fisher of the mean token loss (``G``: (lines, D) line
    gradients, ``T`` their tokens), shrunk toward its mean eigenvalue ``m`` by ``s``. Kept low-rank: never (D, D)."""

    lines: torch.Tensor  # (lines, D) float64
    tokens: int
    shrinkage: float

    @property
    def mean_eigenvalue(self) -> float:
        return float((self.lines**2).sum()) / (self.tokens * self.lines.shape[1])

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        """``basis^T H basis``, (k, k) for a (D, k) basis."""
        gb = self.lines @ basis  # (lines, k)
        s = self.shrinkage
        return (1 - s) * gb.T @ gb / self.tokens + s * self.mean_eigenvalue * basis.T @ basis

    def solve(self, vector: torch.Tensor) -> torch.Tensor:
        """``H^-1 vector`` over every direction (Woodbury; needs shrinkage > 0)."""
        if self.shrinkage <= 0:
            raise ValueError("Solving over every direction needs `shrinkage` > 0: the line Fisher is singular.")
        g, shift, c = self.lines, self.shrinkage * self.mean_eigenvalue, (1 - self.shrinkage) / self.tokens
        inner = shift * torch.eye(g.shape[0], dtype=g.dtype) + c * g @ g.T  # (lines, lines)
        return (vector - c * g.T @ torch.linalg.solve(inner, g @ vector)) / shift


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
    # the signal lies in the span of the line gradients, where H is (1 - s) G^T G / T + s m: work in that span
    _, singular, vh = torch.linalg.svd(curv.lines, full_matrices=False)
    basis = vh[singular > singular[0] * 1e-8].T  # (D, r) orthonormal
    evals = (1 - shrinkage) * singular[: basis.shape[1]] ** 2 / curv.tokens + shrinkage * curv.mean_eigenvalue
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
        extra = torch.linalg.qr(extra.T).Q.T / (shrinkage * curv.mean_eigenvalue) ** 0.5  # unit curvature too
        directions = torch.cat([directions, extra])
    share = float(top.clamp(min=0).sum() / ratio.clamp(min=0).sum().clamp(min=1e-30))
    norms = directions.norm(dim=1, keepdim=True)
    directions = directions / norms.mean() if scale == "whiten" else directions / norms
    shape = lines.gradients.shape[1:]
    return (directions * code_norm).float().reshape(num_codes, *shape), share


@torch.no_grad()
def quadratic_gains(
    codes: torch.Tensor | None, curv: Curvature, train: torch.Tensor, test: torch.Tensor
) -> tuple[float, float]:
    """Training and held-out gain of the converged fit in the span of ``codes`` under the quadratic model.

    ``codes``: (num_codes, tokens_per_code, hidden), or None for every direction (free prompt); ``train``,
    ``test``: one persona's mean-token-loss gradients on its training and held-out lines (D numbers, any shape).
    """
    g, h = train.flatten().double(), test.flatten().double()  # (D,)
    if codes is None:
        step = -curv.solve(g)  # (D,)
        curved = -g  # H step
    else:
        u, singular, _ = torch.linalg.svd(codes.detach().flatten(1).double().T, full_matrices=False)
        basis = u[:, singular > singular[0] * 1e-6]  # (D, k) orthonormal; a code already in the span adds nothing
        coefficients = -torch.linalg.solve(curv.project(basis), basis.T @ g)  # (k,)
        step, curved = basis @ coefficients, -basis @ (basis.T @ g)
    half_curvature = step @ curved / 2  # step . H step / 2 (inside the span, H step = -g there)
    return float(-(g @ step + half_curvature)), float(-(h @ step + half_curvature))
