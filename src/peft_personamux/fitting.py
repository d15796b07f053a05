"""Fitting mixture vectors for new personas (stage 2): the paper's recipe and a fast second-order method.

Only ``num_codes`` (64) numbers per persona are fitted, all other weights frozen, so second-order steps are cheap:

* ``"adam"`` — the paper's recipe: full batch, 100 steps, Adam (lr 1e-3, eps 1e-4), from zeros.
* ``"lbfgs"`` — L-BFGS with a strong-Wolfe line search on the full-batch loss: ``steps`` iterations, at most
  ``1.25 * steps`` loss + gradient evaluations, ending at the best point evaluated. The objective is
  deterministic (no dropout, full batch), the setting L-BFGS is made for, and it needs no learning rate, so the
  same call fits 64 weights and 4,608 free prompt numbers alike.
* ``"fisher"`` (default, 6 steps) — Levenberg–Marquardt steps preconditioned by the empirical Fisher of the
  per-example gradients. The soft prompt is expanded per row, so giving every row its own copy of the mixture
  vector makes one backward pass return all per-example gradients ``G`` (examples, num_codes). The step solves
  ``(F + λ·mean(diag F)·I) Δ = -g`` with ``F = GᵀG · tokens``; each persona keeps its own λ, which shrinks after
  a step that lowers that persona's loss and grows (the step is dropped) after one that does not. Trial points are
  evaluated with gradients, so an accepted step costs one pass over the examples.

Both count *example passes* (one example through forward and backward; a forward-only pass counts as one too) so
that their costs can be compared; see ``benchmarks/fit_speed.py``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .loss import FAST, LossOptions, PrefixCache, response_nll
from .tuner.model import as_tuner

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of fitting: per-step training loss, example passes used and wall time."""

    method: str
    losses: list[float] = field(default_factory=list)
    persona_curves: dict[int, list[float]] = field(default_factory=dict)  # table row -> its mean token loss per step
    example_passes: int = 0
    seconds: float = 0.0


def _row_losses(
    tuner,
    batch: dict,
    mixtures: torch.Tensor,
    bias_scale: float,
    chunk_size: int,
    index: torch.Tensor | None = None,
    copies: bool = False,
    options: LossOptions = FAST,
    prefix_cache: PrefixCache | None = None,
):
    """Yield (row slice, summed token NLL per row (rows,), token counts (rows,), row mixtures) chunk by chunk.

    ``mixtures`` is per row (rows, num_codes), or per persona when ``index`` maps rows to personas; indexing per
    chunk keeps each chunk's graph separate, so chunks can be backpropagated one by one. ``copies=True`` gives each
    row its own leaf copy of its mixture, whose ``.grad`` after backward is that example's gradient.
    """
    n = batch["input_ids"].shape[0]
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        chunk = {k: batch[k][sl] for k in ("input_ids", "attention_mask", "labels", "persona_ids")}
        used = chunk["attention_mask"].any(0).nonzero()  # columns any row of the chunk attends to
        width = int(used.max()) + 1 if len(used) else chunk["input_ids"].shape[1]  # cut trailing (right) padding
        chunk.update({k: chunk[k][:, :width] for k in ("input_ids", "attention_mask", "labels")})
        rows_mix = mixtures[sl] if index is None else mixtures[index[sl]]  # (rows, num_codes)
        if copies:
            rows_mix = rows_mix.detach().clone().requires_grad_(True)
        # rows indexed from one per-persona mixture may share their soft prompt's forward; leaf copies may not
        shared = index is not None and not copies
        nll, tokens = response_nll(tuner, chunk, bias_scale, rows_mix, options, prefix_cache, shared)  # (rows,) x 2
        yield sl, nll, tokens, rows_mix


def mean_persona_mixture(model) -> torch.Tensor:
    """Mean mixture (num_codes,) of the persona files beside the model's codebook (its pretraining personas).

    A starting point for new personas that is not the zero mixture: there the mixed tokens are zero vectors, the
    singular point of the model's first RMSNorm (``x / sqrt(mean(x^2) + eps)``), where the loss is steep in scale
    and flat in direction and fits crawl.
    """
    from .persona_files import read_persona_file

    files = model.available_persona_files()
    if not files:
        raise ValueError(
            "`fit_start='mean'` needs persona files beside the codebook (its pretraining personas); this model's "
            "codebook folder has none. Use fit_start='zero'."
        )
    config = model.peft_config[model.active_adapter]
    fingerprint = model.codebook_fingerprint()
    rows = [read_persona_file(path, config.num_codes, fingerprint)[1].float() for path in files.values()]
    return torch.stack(rows).mean(0)  # (num_codes,)


def mean_token_loss(model, batch: dict, bias_scale: float | None = None, chunk_size: int = 16) -> float:
    """Mean token loss of ``batch`` with the personas' current mixtures (no gradients)."""
    tuner = as_tuner(model)
    scale = tuner.bias_scale if bias_scale is None else bias_scale
    table = tuner.mixture_table()
    with torch.no_grad():
        mixtures = table[batch["persona_ids"]]
        total, tokens = 0.0, 0
        for _, nll, count, _ in _row_losses(tuner, batch, mixtures, scale, chunk_size):
            total, tokens = total + float(nll.sum()), tokens + int(count.sum())
    return total / max(tokens, 1)


def fit_mixtures(
    model,
    batch: dict,
    method: str = "fisher",
    steps: int | None = None,
    lr: float = 1e-3,
    eps: float = 1e-4,
    damping: float = 1e-3,
    chunk_size: int = 16,
    bias_scale: float | None = None,
    progress: bool = True,
    options: LossOptions = FAST,
    prompt_penalty: float = 0.0,
) -> FitResult:
    """Fit the mixture vectors of the personas in ``batch["persona_ids"]`` (W and b stay frozen).

    ``batch`` holds ``input_ids``, ``attention_mask``, ``labels`` (-100 outside responses) and ``persona_ids``
    (rows of the persona table) for *all* training examples (full batch). Several personas fit at once; each row
    of the table only sees its own examples. Results are written into the persona table. ``options`` picks the
    loss shortcuts (`loss.LossOptions`; the text before the soft prompt is computed once for all steps).
    ``prompt_penalty`` (adam and lbfgs): adds ``penalty / 2 * |W (m - m0)|^2`` to each persona's mean token loss,
    the squared change of its mixed tokens from the start ``m0`` (an early stop's ridge; `contrast` picks it).
    """
    tuner = as_tuner(model)
    scale = tuner.bias_scale if bias_scale is None else bias_scale
    if method not in ("adam", "fisher", "lbfgs"):
        raise ValueError(f"`method` must be 'adam', 'fisher' or 'lbfgs', got {method!r}.")
    steps = steps if steps is not None else {"adam": 100, "fisher": 6, "lbfgs": 20}[method]
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if prompt_penalty < 0 or (prompt_penalty and method == "fisher"):
        raise ValueError(f"`prompt_penalty` must be >= 0 and needs method 'adam' or 'lbfgs', got {prompt_penalty!r}.")
    table = tuner.mixture_table()
    persona_rows = batch["persona_ids"].to(table.device)
    rows = sorted(set(persona_rows.tolist()))
    params = table.detach()[rows].clone().float().requires_grad_(method != "fisher")  # (personas, num_codes)
    anchor = params.detach().clone()  # the start, m0
    if prompt_penalty:
        codebook = tuner.personamux_layer.personamux_codebook[tuner.current_adapter].detach().float()  # (codes, k, d)
    index = torch.tensor([rows.index(r) for r in persona_rows.tolist()], device=table.device)  # example -> persona
    result = FitResult(method)
    cache = PrefixCache()
    start = time.perf_counter()
    n = batch["input_ids"].shape[0]
    # L-BFGS may evaluate several times per iteration (line search); ``budget`` bounds its loss evaluations
    budget = math.ceil(1.25 * steps)
    evaluations = {"adam": steps, "fisher": steps + 1, "lbfgs": budget}[method]  # full passes over the batch, at most

    # inserting the soft prompt adds only -100 labels, so the collator's labels count the loss's tokens
    row_tokens = (batch["labels"][:, 1:] != -100).sum(-1).float().to(table.device)  # (examples,)
    num_tokens = max(int(row_tokens.sum()), 1)  # the loss is the mean over these tokens

    def evaluate(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed token NLL (examples,) and per-example gradients of the mean loss (examples, codes)."""
        result.example_passes += n
        per_example = torch.zeros(n, p.shape[1], device=table.device)
        nll = torch.zeros(n, device=table.device)
        for sl, row_nll, _ in _grad_chunks(
            tuner, batch, p, index, scale, chunk_size, per_example, num_tokens, options, cache
        ):
            nll[sl] = row_nll
            bar.update(sl.stop - sl.start)
        return nll, per_example

    def persona_losses(nll: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(rows), device=nll.device).index_add_(0, index, nll)  # (personas,)

    persona_tokens = persona_losses(row_tokens).clamp(min=1)  # (personas,)

    def record(summed: torch.Tensor) -> None:
        for k, value in enumerate((summed / persona_tokens).tolist()):
            result.persona_curves.setdefault(rows[k], []).append(value)

    def full_batch_loss() -> float:
        """Mean token loss over all examples at ``params``; leaves its gradient in ``params.grad``."""
        loss_value = 0.0
        step_nll = torch.zeros(n, device=table.device)
        for sl, nll, _, _ in _row_losses(tuner, batch, params, scale, chunk_size, index, False, options, cache):
            loss = nll.sum() / num_tokens
            loss.backward()
            loss_value += loss.item()
            step_nll[sl] = nll.detach()
            bar.update(sl.stop - sl.start)
        if prompt_penalty:  # each persona's term, weighted by its share of the tokens like its loss
            moved = torch.einsum("pc,ckd->pkd", params - anchor, codebook)  # (personas, tokens_per_code, hidden)
            weights = persona_tokens / num_tokens  # (personas,)
            penalty = prompt_penalty / 2 * (weights * moved.pow(2).sum((1, 2))).sum()
            penalty.backward()
            loss_value += penalty.item()
        record(persona_losses(step_nll))
        result.losses.append(loss_value)
        result.example_passes += n
        bar.set_postfix(loss=f"{loss_value:.4f}")
        return loss_value

    was_training = tuner.training
    tuner.eval()  # no dropout while fitting 64 numbers
    bar = tqdm(total=n * evaluations, desc=f"fit ({method})", unit="row", disable=not progress)  # one tick per row
    try:
        if method == "lbfgs":
            # the fit ends at the best point it evaluated (a line search cut off by the budget leaves a trial point)
            optimizer = torch.optim.LBFGS(
                [params],
                lr=1.0,
                max_iter=steps,
                max_eval=budget,
                history_size=20,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-9,
                tolerance_change=1e-9,
            )
            best = {"loss": math.inf, "params": params.detach().clone()}

            def closure() -> torch.Tensor:
                if len(result.losses) >= budget:
                    raise _BudgetSpent
                optimizer.zero_grad()
                loss = full_batch_loss()
                if loss < best["loss"]:
                    best.update(loss=loss, params=params.detach().clone())
                return torch.tensor(loss)

            try:
                optimizer.step(closure)
            except _BudgetSpent:
                pass
            with torch.no_grad():
                params.copy_(best["params"])
        elif method == "adam":
            optimizer = torch.optim.Adam([params], lr=lr, eps=eps)
            for _ in range(steps):
                optimizer.zero_grad()
                full_batch_loss()  # the loss at the parameters before this step
                optimizer.step()
        else:
            # one damping factor per persona: their losses are independent sums, so each accepts its own steps
            lam = torch.full((len(rows),), damping, device=table.device)
            nll, per_example = evaluate(params)
            losses = persona_losses(nll)
            result.losses.append(float(losses.sum()) / num_tokens)
            record(losses)
            for _ in range(steps):
                step = torch.zeros_like(params)
                for k in range(len(rows)):
                    g_k = per_example[index == k]  # (examples of persona k, num_codes): gradients of the mean loss
                    # empirical Fisher of the mean token loss (each row's gradient sums its tokens' gradients)
                    fisher = g_k.T @ g_k * num_tokens
                    eye = torch.eye(fisher.shape[0], device=fisher.device)
                    damped = fisher + lam[k] * (fisher.diagonal().mean() + 1e-12) * eye
                    step[k] = -torch.linalg.solve(damped, g_k.sum(0))
                # the trial is evaluated with gradients: an accepted step (the usual case) then costs one pass
                trial_nll, trial_grads = evaluate(params + step)
                trial_losses = persona_losses(trial_nll)
                better = trial_losses < losses  # (personas,)
                params = torch.where(better[:, None], params + step, params)
                losses = torch.where(better, trial_losses, losses)
                accepted = better[index]  # (examples,)
                per_example = torch.where(accepted[:, None], trial_grads, per_example)
                lam = torch.where(better, (lam / 3).clamp(min=1e-4), lam * 10)
                result.losses.append(float(losses.sum()) / num_tokens)
                record(losses)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    finally:  # an error leaves the table untouched, the model in its mode and no bar open
        bar.close()
        tuner.train(was_training)
    with torch.no_grad():
        table[rows] = params.detach().to(table.dtype)
    result.seconds = time.perf_counter() - start
    logger.info(
        "fitted %d persona(s) with %s: loss %.4f -> %.4f, %d example passes, %.1f s",
        len(rows),
        method,
        result.losses[0],
        result.losses[-1],
        result.example_passes,
        result.seconds,
    )
    return result


class _BudgetSpent(Exception):
    """Raised inside the L-BFGS closure once the evaluation budget is spent."""


def _grad_chunks(tuner, batch, params, index, scale, chunk_size, per_example, num_tokens, options, cache):
    """Like ``_row_losses`` but also fills ``per_example`` with each row's gradient of the mean loss."""
    chunks = _row_losses(tuner, batch, params, scale, chunk_size, index, True, options, cache)
    for sl, nll, counts, rows_mix in chunks:
        (nll.sum() / num_tokens).backward()
        per_example[sl] = rows_mix.grad
        yield sl, nll.detach(), counts
