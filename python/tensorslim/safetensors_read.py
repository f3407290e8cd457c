"""A safetensors file's tensors read into memory of their own, one tensor at a time.

safetensors' get_tensor / load_file hand out views of the whole file mapped into memory:
every tensor kept alive keeps the mapping (and its touched pages) alive, at the file's byte
offsets (an fp32 tensor at offset 17: not even 4-byte aligned), and a mapped file changed in
place later changes or (truncated) crashes the model holding it. Read with readinto into
torch.empty tensors instead, each loaded tensor is ordinary, aligned memory, and a load that
hands them to the model holds the file's contents once (io._fill_meta_replacements).
The caller validates the file first (safe_open checks the header against the file's size).
"""
import json
from pathlib import Path
from typing import Dict, Union

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


def read_tensors(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """{name: tensor} of the file, each in a fresh CPU tensor. ValueError for a dtype torch
    lacks, sizes that disagree with the header, or a short read."""
    out: Dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        start = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor '{key}' has dtype {info['dtype']}, which torch cannot hold")
            t = torch.empty(info["shape"], dtype=dtype)
            begin, end = info["data_offsets"]
            if end - begin != t.numel() * t.element_size():
                raise ValueError(f"tensor '{key}': {end - begin} bytes for {info['dtype']} {info['shape']}")
            if t.numel():
                fh.seek(start + begin)
                if fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise ValueError(f"tensor '{key}': the file ends before its data (truncated?)")
            out[key] = t
    return out
