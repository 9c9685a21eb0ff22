"""Embedding models through sentence-transformers (default: all-MiniLM-L6-v2 from a package)."""
from __future__ import annotations

import numpy as np

from . import InputError
from ._source import resolve_source


class EmbeddingModel:
    kind = "embed"

    def __init__(self, model, name: str):
        self.model, self.name = model, name
        self.nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.max_seq_length = model.max_seq_length
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = dim()

    def count_tokens(self, texts: list[str]) -> list[int]:
        enc = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in enc]

    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = False, truncate: bool = False,
               offset: int = 0) -> np.ndarray:
        """Vectors for ``texts``; ``offset`` is the index of ``texts[0]`` in the caller's list (for errors)."""
        if not truncate:
            # Every token of a subword tokenizer covers at least one byte of the text, so a
            # text of B bytes has at most B + (a few special) tokens: only texts that long
            # are tokenized here (a second full tokenization pass costs ~15% throughput).
            limit = self.max_seq_length - 4
            suspects = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) > limit]
            counts = self.count_tokens([texts[i] for i in suspects]) if suspects else []
            for i, n in zip(suspects, counts):
                if n > self.max_seq_length:
                    raise InputError(
                        f"text {offset + i} is {n} tokens; model {self.name!r} reads at most {self.max_seq_length} "
                        f"and would silently cut the rest. Split the text, or pass truncate=True to accept that."
                    )
        out = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=normalize,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.model = None


def prepare() -> None:
    """Import the library before the host measures memory, so the import is not counted."""
    import sentence_transformers  # noqa: F401


def load(spec, device: str = "cpu", threads: int = 1, name: str = "model") -> EmbeddingModel:
    from sentence_transformers import SentenceTransformer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's log is no place for a per-load progress bar
    path = resolve_source(spec.source)
    model = SentenceTransformer(str(path), device=device, local_files_only=True, **spec.options)
    model.eval()
    return EmbeddingModel(model, name=name)
