"""Metric functions, pure and small: spread over personas, paired comparisons of methods, the discrimination game,
the who-said-it classifier.

Every metric is computed per unseen persona first and then summarised over personas (`summarize`), so the spread
says how much the method's quality varies from one persona to the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def _finite(values: Sequence[float | None]) -> np.ndarray:
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return array[np.isfinite(array)]


def summarize(values: Sequence[float | None], confidence: float = 0.95) -> dict[str, float | int | None]:
    """Mean, standard deviation (ddof=1), min, max and a Student-t confidence interval of the mean over personas.

    Non-finite values (None, NaN: a persona without a score) are left out; ``n`` counts the rest. With fewer than
    two values the spread is undefined and reported as None (JSON null), never as a made-up number.
    """
    from scipy import stats

    array = _finite(values)
    n = int(array.size)
    if n == 0:
        return {
            "mean": None,
            "std": None,
            "ci_low": None,
            "ci_high": None,
            "ci95": None,
            "min": None,
            "max": None,
            "n": 0,
        }
    mean = float(array.mean())
    out: dict[str, float | int | None] = {"mean": mean, "min": float(array.min()), "max": float(array.max()), "n": n}
    if n < 2:
        return {**out, "std": None, "ci_low": None, "ci_high": None, "ci95": None}
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n))
    return {**out, "std": std, "ci_low": mean - half, "ci_high": mean + half, "ci95": half}


# -- paired comparisons -----------------------------------------------------------------------------------------------


def paired_difference(
    a: dict[str, float | None], b: dict[str, float | None], personas: Sequence[str]
) -> dict[str, float | int | None]:
    """``a - b`` per persona (e.g. held-out loss of a method minus a reference's), summarised over the personas that
    have both values, and ``lower``: on how many of them ``a`` is below ``b``."""
    diffs = [
        float(a[p]) - float(b[p])
        for p in personas
        if a.get(p) is not None and b.get(p) is not None and math.isfinite(a[p]) and math.isfinite(b[p])
    ]
    return {**summarize(diffs), "lower": sum(d < 0 for d in diffs)}


def gain_ratio(
    reference: dict[str, float | None],
    a: dict[str, float | None],
    b: dict[str, float | None],
    personas: Sequence[str],
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | int | str | None]:
    """Mean gain of ``a`` over ``reference`` divided by the mean gain of ``b`` (lower loss is a gain), over the
    personas all three score, with a 95% percentile-bootstrap interval over personas (paired resamples).

    ``ratio`` is None when ``b`` gains nothing on average (the ratio would be meaningless); the interval
    (``ci_low``, ``ci_high``) is None then and with fewer than two personas. A resample in which ``b`` gains nothing
    has an unbounded ratio of ``a``'s sign: an interval end that is unbounded is the string ``"+inf"`` or ``"-inf"``
    (results.json stays strict JSON), and ``unbounded_share`` says how many resamples were.
    """
    keep = [p for p in personas if all(d.get(p) is not None and math.isfinite(d[p]) for d in (reference, a, b))]
    out: dict[str, float | int | str | None] = {
        "ratio": None,
        "ci_low": None,
        "ci_high": None,
        "n": len(keep),
        "unbounded_share": None,
    }
    if not keep:
        return out
    gain_a = np.array([reference[p] - a[p] for p in keep])  # (n,)
    gain_b = np.array([reference[p] - b[p] for p in keep])  # (n,)
    if gain_b.mean() <= 0 or not math.isfinite(gain_a.mean() / gain_b.mean()):
        return out
    out["ratio"] = float(gain_a.mean() / gain_b.mean())
    if len(keep) < 2:
        return out
    rows = np.random.default_rng(seed).integers(0, len(keep), size=(resamples, len(keep)))  # (resamples, n)
    mean_a, mean_b = gain_a[rows].mean(axis=1), gain_b[rows].mean(axis=1)  # (resamples,)
    positive = mean_b > 0
    ratios = np.where(positive, mean_a / np.where(positive, mean_b, 1.0), np.where(mean_a > 0, np.inf, -np.inf))
    ends = np.quantile(ratios, 0.025, method="lower"), np.quantile(ratios, 0.975, method="higher")
    out["ci_low"], out["ci_high"] = (float(e) if np.isfinite(e) else ("+inf" if e > 0 else "-inf") for e in ends)
    out["unbounded_share"] = float(1.0 - positive.mean())
    return out


# -- discrimination --------------------------------------------------------------------------------------------------


def pick_fake(nlls: Sequence[float]) -> int:
    """Index of the candidate the judge calls fake: the least likely one (highest mean token NLL).

    A candidate without a score (NaN: it has no tokens, e.g. an empty generation) is the most suspicious. Ties go to
    the first candidate.
    """
    array = np.array([np.inf if v is None or not math.isfinite(v) else float(v) for v in nlls], dtype=float)
    if array.size == 0:
        raise ValueError("`nlls` must hold at least one candidate's score.")
    return int(np.argmax(array))


def generated_is_caught(real_nlls: Sequence[float], generated_nll: float) -> bool:
    """Did the judge pick the generated candidate as the fake one among the real candidates and it?

    The generated candidate goes last, so a tie with a real line counts in its favour (not caught).
    """
    return pick_fake([*real_nlls, generated_nll]) == len(real_nlls)


def discrimination_trial(
    score: Callable[[str, Sequence[str]], Sequence[float]],
    context_lines: Sequence[str],
    real_candidates: Sequence[str],
    generated: str,
) -> bool:
    """One round of the game: ``score(context, candidates)`` gives each candidate's mean token NLL after a context
    made of real lines of the persona; returns True when the generated line is the least likely one."""
    nlls = list(score(discrimination_context(context_lines), [*real_candidates, generated]))
    return generated_is_caught(nlls[:-1], nlls[-1])


def discrimination_context(lines: Sequence[str]) -> str:
    """What the judge reads before each candidate: real lines of one persona, as a list."""
    return "Lines spoken by one character:\n" + "".join(f"- {line}\n" for line in lines) + "- "


# -- who said it -----------------------------------------------------------------------------------------------------


class WhoSaidIt:
    """TF-IDF (word 1-2-grams and character 2-5-grams) + logistic regression over persona names.

    Trained on real lines of the unseen personas; applied to a method's generations, its accuracy says how much of
    each persona's own way of speaking the generations carry (chance is 1 / number of personas).
    """

    def __init__(self, c: float = 10.0, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, make_pipeline

        features = FeatureUnion(
            [
                ("words", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
                ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
            ]
        )
        self.pipeline = make_pipeline(features, LogisticRegression(C=c, max_iter=2000, random_state=seed))
        self.labels: list[str] = []

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> WhoSaidIt:
        if len(texts) != len(labels):
            raise ValueError(f"Got {len(texts)} texts for {len(labels)} labels.")
        if len(set(labels)) < 2:
            raise ValueError(f"Who-said-it needs lines of at least 2 personas, got {sorted(set(labels))}.")
        self.pipeline.fit(list(texts), list(labels))
        self.labels = sorted(set(labels))
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not self.labels:
            raise RuntimeError("Call fit() first.")
        return [str(p) for p in self.pipeline.predict([t if t.strip() else " " for t in texts])]

    def accuracy_per_label(self, texts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
        """Per true label, the share of its texts predicted as that label."""
        predicted = self.predict(texts)
        hits: dict[str, list[bool]] = {}
        for p, t in zip(predicted, labels):
            hits.setdefault(t, []).append(p == t)
        return {label: float(np.mean(h)) for label, h in sorted(hits.items())}


# -- sizes -----------------------------------------------------------------------------------------------------------


def count_parameters(*tensors) -> int:
    """Number of scalars in the given tensors."""
    return int(sum(t.numel() for t in tensors))


def text_bytes(*texts: str | None) -> int:
    """UTF-8 size of the texts a prompt-only method has to store per persona."""
    return sum(len(t.encode("utf-8")) for t in texts if t)


def identification_summary(matrix: list[list[float]], personas: list[str]) -> dict:
    """Likelihood identification from ``matrix[i][j]``, the loss of persona i's held-out lines under persona j's
    mixture or mask: the argmin per row, its accuracy against chance, and the own-persona advantage (mean loss under
    the others' minus under its own; None with one persona)."""
    predicted = [min(range(len(row)), key=row.__getitem__) for row in matrix]
    if len(matrix) < 2:  # no other persona to compare with
        gaps = [None] * len(matrix)
    else:
        gaps = [(sum(row) - row[i]) / (len(row) - 1) - row[i] for i, row in enumerate(matrix)]
    return {
        "loss_matrix": matrix,
        "predicted": [personas[j] for j in predicted],
        "accuracy": sum(int(j == i) for i, j in enumerate(predicted)) / len(personas),
        "chance": 1 / len(personas),
        "own_mask_advantage": gaps,
    }


def ratio_cell(ratio: dict) -> str:
    """``4.72x (3.46 to 8.37x)`` from `metrics.gain_ratio`'s dict; an unbounded interval end is ∞."""
    if ratio["ratio"] is None:
        return "—"
    if ratio["ci_low"] is None:
        return f"{ratio['ratio']:.2f}x"
    low, high = (
        {"+inf": "∞", "-inf": "-∞"}[end] if isinstance(end, str) else f"{end:.2f}"
        for end in (ratio["ci_low"], ratio["ci_high"])
    )
    return f"{ratio['ratio']:.2f}x ({low} to {high}x)"
