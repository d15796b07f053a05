"""Amazon reviews -> personas that are clusters of users with similar purchase histories (``amazon/cluster_<k>``).

The paper embeds purchase sequences with SASRec; this loader uses a simpler, training-free item embedding:
positive PMI of item co-occurrence within ``window`` positions of users' time-ordered review sequences, reduced by a
truncated SVD (item vector = ``U * sqrt(S)``, the usual word-embedding recipe). A user is the mean of their unit item
vectors; users are clustered by spherical k-means (cosine similarity, k-means++ seeding). Everything is numpy.

Reviews are JSONL lines in the Amazon Reviews 2023 layout with ``user_id``, ``parent_asin``, ``title`` (of the
review), ``text`` and ``timestamp``. An example is one review: ``prompt`` lists the titles of the user's previous
``history`` items (``"Previously reviewed: A; B; C"``), ``response`` is the review title and text. Item titles come
from ``meta_path`` (the ``meta_<category>.jsonl`` file: ``parent_asin``, ``title``) when given, else the title of the
user's own review of that item stands in; with ``meta_path`` the prompt also names the item being reviewed.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from datasets import Dataset

from .common import check_positive, normalize_whitespace, to_dataset, truncate
from .errors import DataFileNotFoundError, DataFormatError

logger = logging.getLogger(__name__)

REVIEW_FIELDS = {"user_id": str, "parent_asin": str, "title": str, "text": str, "timestamp": (int, float)}
_TAG_RE = re.compile(r"<[^>]+>")  # review text carries HTML line breaks (<br />)
_DENSE_SVD_MAX_ITEMS = 2048


def _clean(text: str) -> str:
    return normalize_whitespace(html.unescape(_TAG_RE.sub(" ", text)))


def _read_jsonl(path: Path, fields: dict[str, type | tuple[type, ...]], what: str) -> list[dict]:
    if not path.is_file():
        raise DataFileNotFoundError(path, f"a JSONL file of {what} with fields {sorted(fields)}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, number, f"one JSON object ({what}) per line", e.msg) from e
            if not isinstance(record, dict):
                raise DataFormatError(path, number, f"one JSON object ({what}) per line", type(record).__name__)
            bad = [
                name
                for name, kind in fields.items()
                if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool)
            ]
            if bad:
                raise DataFormatError(
                    path,
                    number,
                    f"fields {sorted(fields)} ({what})",
                    f"missing or mistyped {bad} in {line.strip()[:80]!r}",
                )
            records.append(record)
    return records


def item_cooccurrence_ppmi(
    sequences: list[np.ndarray], num_items: int, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive PMI of items seen within ``window`` positions of each other, as COO ``(rows, cols, values)``."""
    pairs = [
        np.stack([seq[:-offset], seq[offset:]])
        for seq in sequences
        for offset in range(1, min(window, len(seq) - 1) + 1)
    ]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    left, right = np.concatenate(pairs, axis=1)
    keep = left != right
    rows, cols = np.concatenate([left[keep], right[keep]]), np.concatenate([right[keep], left[keep]])  # symmetric
    keys, counts = np.unique(rows * num_items + cols, return_counts=True)
    rows, cols = keys // num_items, keys % num_items
    marginal = np.bincount(rows, weights=counts, minlength=num_items)
    pmi = np.log(counts * counts.sum() / (marginal[rows] * marginal[cols]))
    positive = pmi > 0
    return rows[positive], cols[positive], pmi[positive]


def _sparse_matmul(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """``M @ dense`` for the square COO matrix ``M``."""
    out = np.zeros_like(dense)
    for j in range(dense.shape[1]):
        out[:, j] = np.bincount(rows, weights=values * dense[cols, j], minlength=dense.shape[0])
    return out


def truncated_svd_embedding(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_items: int, dim: int, seed: int = 0
) -> np.ndarray:
    """Item vectors ``U[:, :dim] * sqrt(S[:dim])`` of a symmetric COO matrix; randomized SVD for large ones."""
    dim = min(dim, num_items)
    if num_items <= _DENSE_SVD_MAX_ITEMS:
        matrix = np.zeros((num_items, num_items))
        matrix[rows, cols] = values
        u, s, _ = np.linalg.svd(matrix)
    else:  # Halko et al. 2011, with power iterations; M is symmetric so M^T Q = M Q
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(_sparse_matmul(rows, cols, values, rng.standard_normal((num_items, dim + 10))))
        for _ in range(4):
            q, _ = np.linalg.qr(_sparse_matmul(rows, cols, values, q))
        u_small, s, _ = np.linalg.svd(_sparse_matmul(rows, cols, values, q).T, full_matrices=False)
        u = q @ u_small
    return u[:, :dim] * np.sqrt(s[:dim])  # (num_items, dim)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def spherical_kmeans(x: np.ndarray, num_clusters: int, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """Cluster the rows of ``x`` by cosine similarity; returns labels ``(n,)`` in ``[0, num_clusters)``."""
    x = _normalize_rows(np.asarray(x, dtype=np.float64))
    n = len(x)
    if not 1 <= num_clusters <= n:
        raise ValueError(f"`num_clusters` must be between 1 and the number of points ({n}), got {num_clusters}.")
    rng = np.random.default_rng(seed)
    centers = np.empty((num_clusters, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    distance = 1.0 - x @ centers[0]  # cosine distance to the nearest chosen center (k-means++ seeding)
    for k in range(1, num_clusters):
        weights = np.clip(distance, 0.0, None)
        index = rng.choice(n, p=weights / weights.sum()) if weights.sum() > 0 else rng.integers(n)
        centers[k] = x[index]
        distance = np.minimum(distance, 1.0 - x @ centers[k])
    labels = np.full(n, -1)
    for _ in range(max_iter):
        similarity = x @ centers.T  # (n, num_clusters)
        new_labels = similarity.argmax(axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        sums = np.stack([np.bincount(labels, weights=x[:, d], minlength=num_clusters) for d in range(x.shape[1])], 1)
        sizes = np.bincount(labels, minlength=num_clusters)
        worst_fit = iter(np.argsort(similarity[np.arange(n), labels]))
        for k in np.flatnonzero(sizes == 0):  # re-seed an empty cluster with a badly fitting point
            sums[k] = x[next(worst_fit)]
        centers = _normalize_rows(sums)
    return labels


def load_amazon_reviews(
    path: str | os.PathLike,
    num_clusters: int = 100,
    seed: int = 0,
    min_reviews: int = 5,
    meta_path: str | os.PathLike | None = None,
    history: int = 3,
    embedding_dim: int = 64,
    window: int = 5,
    max_chars: int = 400,
) -> Dataset:
    """Reviews of users with at least ``min_reviews`` reviews, one persona per user cluster: ``amazon/cluster_<k>``.

    Args:
        path: reviews JSONL (``user_id``, ``parent_asin``, ``title``, ``text``, ``timestamp``).
        num_clusters: number of user clusters (personas); at most the number of users kept.
        seed: seeds the SVD (large catalogues) and k-means; same seed, same clusters.
        min_reviews: users with fewer reviews are dropped (their history is too short to place them).
        meta_path: optional item metadata JSONL (``parent_asin``, ``title``) for item titles in the prompt.
        history: how many previous items the prompt lists.
        embedding_dim: item embedding size (SVD rank).
        window: items within this many positions of each other in a user's sequence count as co-occurring.
        max_chars: responses are cut at a word boundary to at most this many characters.

    Clusters are numbered by size, ``cluster_0`` the largest.
    """
    for name, value in [
        ("num_clusters", num_clusters),
        ("min_reviews", min_reviews),
        ("history", history),
        ("embedding_dim", embedding_dim),
        ("window", window),
        ("max_chars", max_chars),
    ]:
        check_positive(name, value)
    reviews_path = Path(path)
    reviews = _read_jsonl(reviews_path, REVIEW_FIELDS, "reviews")
    item_titles: dict[str, str] = {}
    if meta_path is not None:
        for record in _read_jsonl(Path(meta_path), {"parent_asin": str, "title": str}, "item metadata"):
            item_titles[record["parent_asin"]] = _clean(record["title"])

    by_user: dict[str, list[tuple[float, int, dict]]] = defaultdict(list)
    for order, review in enumerate(reviews):
        by_user[review["user_id"]].append((review["timestamp"], order, review))
    users = sorted(u for u, seq in by_user.items() if len(seq) >= min_reviews)
    if len(users) < num_clusters:
        raise ValueError(
            f"`num_clusters` ({num_clusters}) exceeds the {len(users)} users with at least `min_reviews` "
            f"({min_reviews}) reviews in {reviews_path}; lower num_clusters or min_reviews."
        )
    histories = [[review for _, _, review in sorted(by_user[u], key=lambda t: t[:2])] for u in users]
    item_ids = {asin: i for i, asin in enumerate(sorted({r["parent_asin"] for h in histories for r in h}))}
    sequences = [np.array([item_ids[r["parent_asin"]] for r in h]) for h in histories]

    rows, cols, values = item_cooccurrence_ppmi(sequences, len(item_ids), window)
    items = _normalize_rows(truncated_svd_embedding(rows, cols, values, len(item_ids), embedding_dim, seed))
    user_vectors = np.stack([items[seq].mean(axis=0) for seq in sequences])  # (num_users, dim)
    labels = spherical_kmeans(user_vectors, num_clusters, seed=seed)
    sizes = np.bincount(labels, minlength=num_clusters)
    rank = np.empty(num_clusters, dtype=int)
    rank[np.lexsort((np.arange(num_clusters), -sizes))] = np.arange(num_clusters)  # cluster_0 is the largest

    examples = []
    for label, user_reviews in zip(labels, histories):
        persona = f"amazon/cluster_{rank[label]}"
        titles = [item_titles.get(r["parent_asin"]) or _clean(r["title"]) for r in user_reviews]
        for t, review in enumerate(user_reviews):
            previous = "; ".join(title for title in titles[max(0, t - history) : t] if title) or "nothing yet"
            prompt = f"Previously reviewed: {previous}"
            if review["parent_asin"] in item_titles:
                prompt += f"\nNow reviewing: {item_titles[review['parent_asin']]}"
            response = "\n".join(part for part in (_clean(review["title"]), _clean(review["text"])) if part)
            if response:
                examples.append(
                    {"persona": persona, "prompt": prompt, "response": truncate(response, max_chars), "group": persona}
                )
    logger.info(
        "Amazon from %s: %d reviews, %d users with >= %d reviews, %d items, %d clusters (sizes %d..%d users), "
        "%d examples.",
        reviews_path,
        len(reviews),
        len(users),
        min_reviews,
        len(item_ids),
        num_clusters,
        sizes.min(),
        sizes.max(),
        len(examples),
    )
    return to_dataset(examples)
