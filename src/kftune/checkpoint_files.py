"""A model folder's safetensors files, read with positioned reads (`pread`), never memory-mapped.

A mapped file's touched pages count in the reading process's resident memory until it is unmapped,
so converting an fp32 checkpoint to 16 bits through a mapping holds both copies; under ZeRO-3 each
worker needs only its own partition of every tensor, a contiguous range of its bytes. The format is
an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets) and the
data (https://huggingface.co/docs/safetensors/index#format).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from kftune.errors import KftuneError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def safetensors_files(folder: str | Path) -> list[Path]:
    """The folder's safetensors weight files (one, or the shards its index names); [] when it has none."""
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        shards = json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()
        return [folder / name for name in dict.fromkeys(shards)]
    return []


class LazyTensors(dict):
    """name -> safetensors slice read on demand with `pread` (`safe_open(backend="pread")`), for
    `from_pretrained(state_dict=...)`: each tensor is read and converted to the load dtype one at a
    time. Deep copies (transformers copies its keyword arguments) share the open files."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.handles = [safe_open(str(path), framework="pt", backend="pread") for path in files]
        super().__init__((name, handle.get_slice(name)) for handle in self.handles for name in handle.keys())  # noqa: SIM118 (a safe_open handle is not iterable)

    def __deepcopy__(self, memo):
        return self


class SafetensorsCheckpoint:
    """Where each tensor of a model folder lies, and reads of flat element ranges of them. `bytes_read`
    counts what was read, so a caller (or a test) sees that only a partition was."""

    def __init__(self, folder: str | Path):
        self.tensors: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        self.bytes_read = 0
        for path in safetensors_files(folder):
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name != "__metadata__":
                    start = 8 + length + entry["data_offsets"][0]
                    self.tensors[name] = (path, DTYPES[entry["dtype"]], tuple(entry["shape"]), start)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def read_flat(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the tensor flattened (row-major), in its stored dtype: one positioned
        read of exactly those bytes."""
        path, dtype, shape, offset = self.tensors[name]
        end = math.prod(shape) if end is None else end
        size = dtype.itemsize
        data = bytearray((end - start) * size)
        with open(path, "rb") as handle:
            done = 0
            while done < len(data):  # one call reads at most about 2 GiB
                got = os.preadv(handle.fileno(), [memoryview(data)[done:]], offset + start * size + done)
                if not got:
                    raise KftuneError(f"{path}: the file ends inside tensor {name}; it is truncated")
                done += got
        self.bytes_read += len(data)
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
