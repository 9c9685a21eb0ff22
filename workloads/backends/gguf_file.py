"""A GGUF file's header, read by hand, and a slice of a model (its first layers) written from it.

Hand-written because ``gguf.GGUFReader`` maps every tokenizer string into numpy first
(30 s for Gemma 3's 262k-token vocabulary on a 2-core machine), and because the writer
copies the metadata byte for byte (``GGUFWriter`` would need every value decoded and typed
again). The planner (``cluster/shard_plan.py``) reads layouts with it; the shard speed
probe (``shard_speed.py``) writes slices with it. Format: github.com/ggml-org/ggml
docs/gguf.md (version 3: little-endian; keys, then tensor infos, then the data, aligned).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

__all__ = ["GGUFHeader", "read_header", "tensor_nbytes", "write_slice"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class Tensor:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    path: str
    version: int
    meta: dict  # key: value (an array's value is its length)
    tensors: list[Tensor]
    data_start: int
    #: key: (type, raw bytes of the value, array element type or None, array length) for the writer
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def alignment(self) -> int:
        return int(self.meta.get("general.alignment", 32))


def tensor_nbytes(dims: list[int], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def read_header(path: str | os.PathLike, limit: int = 64 * 2**20) -> GGUFHeader:
    """The header of a GGUF file (the header of any model sits in its first few MB)."""
    path = str(path)
    with open(path, "rb") as f:
        data = f.read(limit)
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("<Q")
        s = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(t):
        nonlocal pos
        if t in _SCALARS:
            return take(_SCALARS[t])
        if t == _STRING:
            return string()
        if t == _ARRAY:
            et, n = take("<I"), take("<Q")
            if et in _SCALARS:
                pos += n * struct.calcsize(_SCALARS[et])
            else:
                for _ in range(n):
                    value(et)
            return n
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old")
    meta, raw = {}, {}
    for _ in range(n_kv):
        key = string()
        t = take("<I")
        start = pos
        et = n = None
        if t == _ARRAY:
            et, n = struct.unpack_from("<IQ", data, pos)
        meta[key] = value(t)
        raw[key] = (t, data[start:pos], et, n)
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        tensors.append(Tensor(name, dims, take("<I"), take("<Q")))
    align = int(meta.get("general.alignment", 32))
    return GGUFHeader(path, version, meta, tensors, -(-pos // align) * align, raw)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_slice(src: str | os.PathLike, dst: str | os.PathLike, n_layer: int) -> str:
    """A GGUF of ``src``'s first ``n_layer`` layers with its input and output layers: the same
    tensors, types and metadata (``<arch>.block_count`` and per-layer arrays cut to
    ``n_layer``), so that llama.cpp runs it as a shorter model of the same shapes. The shard
    speed probe times slices of two lengths: the difference is what one layer costs."""
    h = read_header(src)
    arch = h.meta.get("general.architecture", "llama")
    old = int(h.meta[f"{arch}.block_count"])
    if not 1 <= n_layer <= old:
        raise ValueError(f"{src}: a slice of {n_layer} layers of a {old}-layer model")
    keep = [t for t in h.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n_layer]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", h.version, len(keep), len(h.raw)))
    for key, (t, raw, et, n) in h.raw.items():
        if key == f"{arch}.block_count":
            raw = struct.pack(_SCALARS[t], n_layer)
        elif t == _ARRAY and n == old and et in _SCALARS:  # per-layer values
            raw = struct.pack("<IQ", et, n_layer) + raw[12:12 + n_layer * struct.calcsize(_SCALARS[et])]
        out += _string(key) + struct.pack("<I", t) + raw
    align, offset, spans = h.alignment, 0, []
    for t in keep:
        out += _string(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
        out += struct.pack("<IQ", t.ggml_type, offset)
        nbytes = tensor_nbytes(t.dims, t.ggml_type)
        spans.append((h.data_start + t.offset, nbytes))
        offset += -(-nbytes // align) * align
    out += bytes(-len(out) % align)
    tmp = f"{dst}.part"
    with open(src, "rb") as f, open(tmp, "wb") as o:
        o.write(out)
        for start, nbytes in spans:
            f.seek(start)
            o.write(f.read(nbytes))
            o.write(bytes(-nbytes % align))
    os.replace(tmp, dst)
    return str(dst)
