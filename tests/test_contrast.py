"""The quadratic model of a fit and the contrast codebook (`peft_personamux.contrast`), as pure functions."""

from __future__ import annotations

import pytest
import torch

from peft_personamux.codebook_init import codebook_from_gradients
from peft_personamux.contrast import (
    contrast_codebook,
    cross_validated_damping,
    curvature,
    persona_halves,
    quadratic_gain_rows,
    quadratic_gains,
    quadratic_steps,
)
from peft_personamux.prompt_gradients import LineGradients

SHAPE = (2, 6)  # (tokens_per_code, hidden): D = 12


def steep_noise_lines(personas: int = 40, lines: int = 4, seed: int = 0) -> tuple[LineGradients, torch.Tensor]:
    """Line gradients whose persona signal lies along a flat direction while line noise is 30x larger along a steep
    one: the principal directions of persona means chase the noise, the contrast codebook finds the signal."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=generator)).Q  # orthonormal columns
    steep, signal = basis[:, 0], basis[:, 1]
    rows, ids = [], []
    for p in range(personas):
        mu = torch.randn((), generator=generator) * signal  # this persona's expected line gradient
        for _ in range(lines):
            noise = 30 * torch.randn((), generator=generator) * steep + 0.1 * basis[:, 2:] @ torch.randn(
                10, generator=generator
            )
            rows.append(mu + noise)
            ids.append(p)
    gradients = torch.stack(rows).reshape(-1, *SHAPE)
    return LineGradients(gradients, torch.ones(len(rows), dtype=torch.long), torch.tensor(ids)), signal


def cosine(code: torch.Tensor, direction: torch.Tensor) -> float:
    return float((code.flatten() @ direction).abs() / code.norm() / direction.norm())


def test_contrast_codebook_finds_the_persona_signal_that_principal_directions_miss():
    lines, signal = steep_noise_lines()
    contrast, share = contrast_codebook(lines, num_codes=1, code_norm=1.0, shrinkage=0.05)
    pca, _ = codebook_from_gradients(lines.persona_means(), num_codes=1, code_norm=1.0)
    assert cosine(contrast[0], signal) > 0.95
    assert cosine(pca[0], signal) < 0.3  # the steep noise dominates the persona means' variance
    assert 0.5 < share <= 1.0


def test_whitened_contrast_codes_have_equal_curvature():
    lines, _ = steep_noise_lines()
    codes, _ = contrast_codebook(lines, num_codes=3, code_norm=2.0, shrinkage=0.1, scale="whiten")
    curv = curvature(lines, 0.1)
    flat = codes.flatten(1).double()
    per_code = torch.stack([curv.project(c[:, None])[0, 0] for c in flat])  # c.H.c
    torch.testing.assert_close(per_code / per_code.mean(), torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(flat.norm(dim=1).mean(), torch.tensor(2.0, dtype=torch.float64))
    equal, _ = contrast_codebook(lines, num_codes=3, code_norm=2.0, shrinkage=0.1, scale="equal")
    torch.testing.assert_close(equal.flatten(1).norm(dim=1), torch.full((3,), 2.0))


def test_quadratic_gains_match_the_dense_formula():
    lines, _ = steep_noise_lines(personas=6)
    curv = curvature(lines, shrinkage=0.3)
    dense = curv.project(torch.eye(12, dtype=torch.float64))  # (D, D)
    torch.testing.assert_close(dense, dense.T)
    g, h = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)

    def expected(basis):
        step = -basis @ torch.linalg.solve(basis.T @ dense @ basis, basis.T @ g)
        quad = step @ dense @ step / 2
        return float(-(g @ step + quad)), float(-(h @ step + quad))

    assert quadratic_gains(None, curv, g, h) == pytest.approx(expected(torch.eye(12, dtype=torch.float64)))
    codes = torch.randn(3, *SHAPE)
    repeated = torch.cat([codes, codes[:1] + codes[1:2]])  # a code already in the span adds nothing
    basis = torch.linalg.qr(codes.flatten(1).double().T).Q
    assert quadratic_gains(repeated, curv, g, h) == pytest.approx(expected(basis))
    # on its own training lines the converged fit always gains; a span's gain never exceeds the full one's
    assert 0 < quadratic_gains(codes, curv, g, h)[0] <= quadratic_gains(None, curv, g, h)[0]


def test_damped_gains_match_the_dense_formula_and_apply_and_solve_are_inverse():
    lines, _ = steep_noise_lines(personas=6)
    curv = curvature(lines, shrinkage=0.3)
    dense = curv.project(torch.eye(12, dtype=torch.float64))  # (D, D)
    vectors = torch.randn(12, 3, dtype=torch.float64)
    torch.testing.assert_close(curv.apply(vectors), dense @ vectors)
    torch.testing.assert_close(curv.solve(curv.apply(vectors) + 0.5 * vectors, damping=0.5), vectors)
    g, h = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    codes = torch.randn(3, *SHAPE)
    for span, basis in ((None, torch.eye(12, dtype=torch.float64)), (codes, torch.linalg.qr(codes.flatten(1).T).Q)):
        basis = basis.double()
        inner = basis.T @ dense @ basis
        step = -basis @ torch.linalg.solve(inner + 0.7 * torch.eye(len(inner), dtype=inner.dtype), basis.T @ g.T)
        quad = (step * (dense @ step)).sum(0) / 2  # (4,)
        train, test = quadratic_gain_rows(span, curv, g, h, damping=0.7)
        torch.testing.assert_close(train, -((g.T * step).sum(0) + quad))
        torch.testing.assert_close(test, -((h.T * step).sum(0) + quad))
    # damping shrinks the step: the training gain falls, monotonically
    gains = [float(quadratic_gain_rows(None, curv, g[:1], h[:1], d)[0]) for d in (0.0, 0.1, 1.0, 10.0)]
    assert gains == sorted(gains, reverse=True) and gains[-1] > 0


def test_cross_validation_damps_noise_and_not_signal():
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(12, generator=generator)
    noise = torch.randn(2, 40, 12, generator=generator)  # persona 0: line noise only; persona 1: a strong signal
    rows = torch.cat([noise[0], noise[1] + 20 * direction])
    lines = LineGradients(
        rows.reshape(-1, *SHAPE), torch.ones(80, dtype=torch.long), torch.arange(2).repeat_interleave(40)
    )
    curv = curvature(LineGradients(noise.reshape(-1, *SHAPE), torch.ones(80), torch.zeros(80)), 0.2)  # H ~ I
    dampings = [0.0, 1.0, 100.0, 1e6]
    chosen = cross_validated_damping(None, curv, lines, dampings)
    assert chosen[0] >= 100.0  # fitting noise only loses on the left-out fold
    assert chosen[1] <= 1.0
    with pytest.raises(ValueError, match="folds"):
        cross_validated_damping(None, curv, lines, dampings, folds=1)
    with pytest.raises(ValueError, match="at least 5 lines"):
        cross_validated_damping(
            None, curv, LineGradients(rows[:3].reshape(-1, *SHAPE), torch.ones(3), torch.zeros(3)), dampings
        )
    with pytest.raises(ValueError, match="damping"):
        quadratic_gain_rows(None, curv, rows[:1], rows[:1], damping=-1.0)


def test_contrast_codebook_with_few_lines_pads_with_directions_outside_their_span():
    lines, _ = steep_noise_lines(personas=2, lines=2)  # 4 line gradients for 6 codes
    codes, _ = contrast_codebook(lines, num_codes=6, code_norm=1.0, seed=0)
    again, _ = contrast_codebook(lines, num_codes=6, code_norm=1.0, seed=0)
    torch.testing.assert_close(codes, again)  # seeded: a resumed run rebuilds the same span
    span = torch.linalg.qr(lines.gradients.flatten(1).T).Q  # (D, 4)
    extra = codes.flatten(1)[4:]
    assert (extra @ span).abs().max() < 1e-4 * extra.norm()
    assert torch.linalg.matrix_rank(codes.flatten(1)) == 6


def test_persona_halves_split_each_persona_and_skip_single_lines():
    gradients = torch.arange(5 * 12, dtype=torch.float32).reshape(5, *SHAPE)
    lines = LineGradients(gradients, torch.tensor([1, 1, 1, 2, 1]), torch.tensor([0, 0, 0, 1, 2]))
    a, b = persona_halves(lines)
    assert a.shape == b.shape == (1, 12)  # personas 1 and 2 have a single line each
    flat = gradients.flatten(1).double()
    torch.testing.assert_close(a[0], (flat[0] + flat[2]) / 2)
    torch.testing.assert_close(b[0], flat[1])


def test_contrast_validation():
    lines, _ = steep_noise_lines(personas=2, lines=2)
    with pytest.raises(ValueError, match="shrinkage"):
        curvature(lines, 1.5)
    with pytest.raises(ValueError, match="scale"):
        contrast_codebook(lines, num_codes=1, code_norm=1.0, scale="unit")
    with pytest.raises(ValueError, match="shrinkage"):
        contrast_codebook(lines, num_codes=6, code_norm=1.0, shrinkage=0.0)  # 4 lines for 6 codes
    with pytest.raises(ValueError, match="shrinkage"):
        curvature(lines, 0.0).solve(torch.zeros(12, dtype=torch.float64))
    curvature(lines, 0.0).solve(torch.zeros(12, dtype=torch.float64), damping=1.0)  # damping alone makes it regular
    single = LineGradients(lines.gradients[:2], lines.tokens[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 or more lines"):
        persona_halves(single)


def test_quadratic_steps_are_the_scored_step_in_code_coordinates():
    lines, _ = steep_noise_lines()
    curv = curvature(lines, 0.2)
    codes = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))  # not orthonormal
    g = lines.persona_means()
    train = torch.stack([g[0], g[1]])  # (2, *SHAPE)
    dense = curv.apply(torch.eye(12, dtype=torch.float64))  # (D, D) H
    for damping in (0.0, 0.5):
        w = quadratic_steps(codes, curv, train, damping)  # (2, 3)
        x = w @ codes.flatten(1).double()  # (2, D) the steps
        flat = train.flatten(1).double()
        gain = -((flat * x).sum(1) + ((x @ dense) * x).sum(1) / 2)
        expected, _ = quadratic_gain_rows(codes, curv, train, train, damping)
        torch.testing.assert_close(gain, expected)
        # the step is stationary for the damped objective inside the span
        residual = codes.flatten(1).double() @ (flat + x @ dense + damping * x).T  # (3, 2)
        torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="damping"):
        quadratic_steps(codes, curv, train, -1.0)
