"""Nearest passages by cosine similarity (a CPU-tier job: a matrix product and a sort)."""
from __future__ import annotations

from importlib.resources import files

import numpy as np


def load_corpus() -> list[str]:
    """The small corpus shipped with the project (one passage per line)."""
    text = files("workloads").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int = 3) -> dict:
    """Indices and cosine scores of the ``k`` passages nearest each query, best first."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    c = np.asarray(corpus, dtype=np.float32)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query vectors have {q.shape[1]} dimensions but the corpus has {c.shape[1]}; embed both with the same model")
    if not 0 < k <= len(c):
        raise ValueError(f"k must be between 1 and {len(c)} (the corpus size), got {k}")
    qn = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12)
    scores = qn @ cn.T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {"indices": idx, "scores": np.take_along_axis(scores, idx, axis=1)}


def nearest_passages(query: np.ndarray, vectors: np.ndarray, passages: list[str], k: int = 3) -> list[str]:
    """The ``k`` passages nearest one query vector, best first (for pipeline prompts)."""
    if len(passages) != len(np.asarray(vectors)):
        raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors; embed the same passages you search")
    hits = top_k(query, vectors, k=int(k))
    return [passages[i] for i in hits["indices"][0]]
