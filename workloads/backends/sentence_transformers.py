"""Embedding models through sentence-transformers (default: all-MiniLM-L6-v2 from a package)."""
from __future__ import annotations

import numpy as np

from .base import InputError
from .sources import local_path, resolve_source


class TextTooLong(InputError):
    """A text longer than the embedding model reads (it would be cut silently)."""

    def __init__(self, index: int, tokens: int, model: str, max_len: int):
        self.index, self.tokens, self.model, self.max_len = index, tokens, model, max_len
        super().__init__(f"text {index} is {tokens} tokens; model {model!r} reads at most {max_len} and would "
                         "silently cut the rest. Split the text, or pass truncate=True to accept that.")

    def __reduce__(self):
        return (type(self), (self.index, self.tokens, self.model, self.max_len))


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
            _check_lengths(texts, self.name, self.max_seq_length, self.count_tokens, offset)
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


def _check_lengths(texts: list[str], name: str, max_len: int, count, offset: int = 0) -> None:
    """``InputError`` for the first text longer than the model reads.

    Every token of a subword tokenizer covers at least one byte of the text, so a text of B
    bytes has at most B + (a few special) tokens: only texts that long are tokenized here (a
    second full tokenization pass would cost ~15% throughput).
    """
    suspects = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) > max_len - 4]
    counts = count([texts[i] for i in suspects]) if suspects else []
    for i, n in zip(suspects, counts):
        if n > max_len:
            raise TextTooLong(offset + i, n, name, max_len)


_tokenizers: dict = {}


def precheck(spec, texts: list[str], name: str, truncate: bool = False, offset: int = 0) -> bool:
    """Refuse a text longer than the model reads before any model work, with the model's
    own tokenizer (``tokenizer.json``, loaded alone in a few ms); False when the model
    folder is not on this machine or has no such file (nothing checked)."""
    if truncate:
        return True
    path = local_path(spec.source)
    if path is None or not (path / "tokenizer.json").is_file():
        return False
    if not any(len(t.encode("utf-8")) > 4 for t in texts):  # cheap exit for tiny inputs
        return True
    entry = _tokenizers.get(str(path))
    if entry is None:
        import json

        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        max_len = None
        cfg = path / "sentence_bert_config.json"
        if cfg.is_file():
            max_len = json.loads(cfg.read_text()).get("max_seq_length")
        if max_len is None:
            return False
        entry = _tokenizers[str(path)] = (tok, int(max_len))
    tok, max_len = entry
    _check_lengths(texts, name, max_len, lambda ts: [len(e.ids) for e in tok.encode_batch(ts)], offset)
    return True
