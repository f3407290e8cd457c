"""nn.Embedding / nn.EmbeddingBag with a packed table: each row quantized (integer formats of the
format table, per row or in groups along it), and a lookup that gathers the packed rows it needs
and decodes only those with the core's dequantize kernel (AVX-512 / AVX2 / scalar). The table
stays packed in memory; `.weight` dequantizes it on access, for code that inspects it.
.half() / .to(dtype) change the dtype the rows are decoded to; the packed table keeps its own."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import get_format, num_groups
from .compute_dtype import KeepsPackedDtypes
from .lazy_weight import lazy_weight
from .layer_errors import errors_name_layer


def _lowbit():
    from ..ops import lowbit  # the ops package imports nn: load on first use

    return lowbit


def _check_padding_idx(padding_idx, num_embeddings: int, kind: str) -> None:
    """None or a row index (torch stores a negative one as its positive twin)."""
    if padding_idx is not None and (type(padding_idx) is not int or not 0 <= padding_idx < num_embeddings):
        raise ValueError(f"{kind}: padding_idx must be None or a row in 0..{num_embeddings - 1}, got {padding_idx!r}")


class _PackedTable(KeepsPackedDtypes):
    action = "quantized"

    def _init_table(self, num_embeddings: int, embedding_dim: int, fmt: str, group_size: int, device=None) -> None:
        spec = get_format(fmt)
        if not fmt.startswith(("int", "uint")):
            raise ValueError(f"{type(self).__name__}: format must be an integer format (int8, uint4, ...), got {fmt!r}")
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"{type(self).__name__}: group_size must be a positive int, got {group_size!r}")
        group_size = min(group_size, embedding_dim)  # one group wider than the row is per row
        self.num_embeddings, self.embedding_dim, self.fmt, self.group_size = num_embeddings, embedding_dim, fmt, group_size
        groups = num_groups(embedding_dim, group_size)  # the last one short where group_size does not divide
        self.register_buffer("qweight", torch.zeros(num_embeddings, spec.packed_cols(embedding_dim),
                                                    dtype=spec.code_dtype, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, groups, device=device))
        self.register_buffer("zero_points", torch.zeros(num_embeddings, groups, dtype=torch.uint8, device=device)
                             if spec.has_zero_point else None)

    def _fill(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise ValueError("embedding table contains NaN or Inf")
        q, scales, zps, _ = _lowbit().quantize_lowbit(w, self.fmt, self.group_size)
        self.qweight.copy_(q)
        self.scales.copy_(scales)
        if zps is not None:
            self.zero_points.copy_(zps)

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows [len(index), dim] in the compute dtype for a 1-D int64 index."""
        zps = self.zero_points.index_select(0, index) if self.zero_points is not None else None
        return _lowbit().dequantize_lowbit(self.qweight.index_select(0, index), self.scales.index_select(0, index),
                                           zps, None, self.fmt, self.group_size, self.embedding_dim,
                                           dtype=self.compute_dtype)

    def _check_ids(self, ids) -> torch.Tensor:
        kind = type(self).__name__
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{kind}: expected a tensor of indices, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{kind}: indices must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"{kind}: index out of range [0, {self.num_embeddings}) "
                             f"(got min {int(ids.min())}, max {int(ids.max())})")
        return ids.to(torch.int64)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table [num_embeddings, embedding_dim] (a fresh tensor on each access,
        its values computed when used, lazy_weight.py)."""
        dtype, device = self.compute_dtype, self.qweight.device  # as of this read, as the linears' weight
        return lazy_weight(lambda: self._rows(torch.arange(self.num_embeddings, device=device)).to(dtype),
                           (self.num_embeddings, self.embedding_dim), dtype, device)

    @classmethod
    def replaces(cls, mod: nn.Module, spec: dict) -> bool:
        """Whether `mod` is the float table a saved spec was made from (io.load)."""
        return (type(mod) is cls.float_type and (mod.num_embeddings, mod.embedding_dim) == (
            spec["num_embeddings"], spec["embedding_dim"])
            and getattr(mod, "mode", None) == spec.get("mode"))  # a bag's reduction too

    def dense_bytes(self) -> int:
        return 4 * self.num_embeddings * self.embedding_dim

    def describe(self) -> str:
        g, dim = self.group_size, self.embedding_dim
        if g == dim:
            return f"{self.fmt} per-row"
        return f"{self.fmt} g{g}" + (f" (last group {dim % g})" if dim % g else "")

    def _spec(self) -> dict:
        return {"kind": self.kind, "format": self.fmt, "group_size": self.group_size,
                "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                # the keys every saved layer has (io.py); an embedding has no bias
                "in_features": self.num_embeddings, "out_features": self.embedding_dim, "bias": False}


class QuantizedEmbedding(_PackedTable):
    """A lookup table like nn.Embedding(num_embeddings, embedding_dim, padding_idx) holding packed rows."""

    kind = "quantized_embedding"
    float_type = nn.Embedding

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str = "int8", group_size: Optional[int] = None,
                 padding_idx: Optional[int] = None, device=None):
        super().__init__()
        _check_padding_idx(padding_idx, num_embeddings, "QuantizedEmbedding")
        self._init_table(num_embeddings, embedding_dim, fmt, group_size or embedding_dim, device)
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, group_size: Optional[int] = None) -> "QuantizedEmbedding":
        if emb.max_norm is not None:
            raise ValueError("max_norm renormalizes the table in place at lookup; a packed table cannot")
        mod = cls(emb.num_embeddings, emb.embedding_dim, fmt, group_size, emb.padding_idx, device=emb.weight.device)
        mod._fill(emb.weight)
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with errors_name_layer(self):
            ids = self._check_ids(ids)
            return self._rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["format"], spec["group_size"],
                   spec.get("padding_idx"), device=device)

    def spec(self) -> dict:
        return {**self._spec(), "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.describe()}"


class QuantizedEmbeddingBag(_PackedTable):
    """nn.EmbeddingBag (sum / mean / max, offsets, per_sample_weights) over a packed table: the
    rows a batch uses are decoded once, then reduced by torch's embedding_bag."""

    kind = "quantized_embedding_bag"
    float_type = nn.EmbeddingBag

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str = "int8", group_size: Optional[int] = None,
                 mode: str = "mean", include_last_offset: bool = False, padding_idx: Optional[int] = None,
                 device=None):
        super().__init__()
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"QuantizedEmbeddingBag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
        _check_padding_idx(padding_idx, num_embeddings, "QuantizedEmbeddingBag")
        self._init_table(num_embeddings, embedding_dim, fmt, group_size or embedding_dim, device)
        self.mode, self.include_last_offset, self.padding_idx = mode, bool(include_last_offset), padding_idx

    @classmethod
    def from_embedding(cls, bag: nn.EmbeddingBag, fmt: str, group_size: Optional[int] = None) -> "QuantizedEmbeddingBag":
        if bag.max_norm is not None:
            raise ValueError("max_norm renormalizes the table in place at lookup; a packed table cannot")
        mod = cls(bag.num_embeddings, bag.embedding_dim, fmt, group_size, bag.mode, bag.include_last_offset,
                  bag.padding_idx, device=bag.weight.device)
        mod._fill(bag.weight)
        return mod

    def forward(self, ids: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        with errors_name_layer(self):
            ids = self._check_ids(ids)
            used, local = torch.unique(ids, return_inverse=True)
            padding = None
            if self.padding_idx is not None:
                hit = (used == self.padding_idx).nonzero()
                padding = int(hit[0]) if hit.numel() else None
            return F.embedding_bag(local, self._rows(used), offsets, mode=self.mode,
                                   per_sample_weights=per_sample_weights,
                                   include_last_offset=self.include_last_offset, padding_idx=padding)

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["format"], spec["group_size"], spec["mode"],
                   spec["include_last_offset"], spec.get("padding_idx"), device=device)

    def spec(self) -> dict:
        return {**self._spec(), "mode": self.mode, "include_last_offset": self.include_last_offset,
                "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}, format={self.describe()}"
