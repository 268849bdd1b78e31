"""Model weight files read and written one tensor at a time, so a whole model never sits in memory.

Reading lists a checkpoint's tensors from the file headers alone and reads each into memory it owns; writing
streams a safetensors shard tensor by tensor (safetensors' own ``save_file`` needs the whole shard in memory).
The safetensors format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and byte range, then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.models.checks import SAFETENSORS_INDEX, read_safetensors_header, weight_files

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def list_tensors(model_dir: Path) -> list[StoredTensor]:
    """Every tensor of the checkpoint with its file, shape and dtype, from the file headers only."""
    tensors = []
    for path in weight_files(model_dir):
        if path.suffix == ".safetensors":
            header, _ = read_safetensors_header(path)
            ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            tensors += [StoredTensor(k, path, tuple(v["shape"]), _TORCH_DTYPES[v["dtype"]]) for k, v in ordered]
        else:  # the caller has refused pickle files unless the user allowed them
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            tensors += [StoredTensor(k, path, tuple(v.shape), v.dtype) for k, v in state.items()]
    return tensors


class TensorReader:
    """Reads one tensor at a time with plain file reads into memory the tensor owns.

    Not safetensors' mmap: pages of a memory-mapped file stay in the process's resident set while the file
    is open, which would make peak memory one whole input shard instead of one tensor.
    """

    def __init__(self):
        self._path: Path | None = None
        self._file = None
        self._header: dict = {}
        self._data_start = 0
        self._pickle: dict | None = None

    def get(self, stored: StoredTensor) -> torch.Tensor:
        if stored.file != self._path:
            self.close()
            self._path = stored.file
            if stored.file.suffix == ".safetensors":
                self._header, self._data_start = read_safetensors_header(stored.file)
                self._file = open(stored.file, "rb")
            else:
                self._pickle = torch.load(stored.file, map_location="cpu", mmap=True, weights_only=True)
        if self._pickle is not None:
            return self._pickle[stored.key].clone()
        begin, end = self._header[stored.key]["data_offsets"]
        tensor = torch.empty(stored.shape, dtype=stored.dtype)
        if end > begin:
            self._file.seek(self._data_start + begin)
            if self._file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise OSError(f"{stored.file}: truncated while reading {stored.key}")
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._path, self._file, self._header, self._pickle = None, None, {}, None

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


class SafetensorsStreamWriter:
    """One safetensors file written tensor by tensor, in the order its header (known up front) lists them."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._expected = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        got = (name, tensor.dtype, tuple(tensor.shape))
        if not self._expected or self._expected[0] != got:
            raise RuntimeError(f"safetensors writer: expected {self._expected[:1]}, got {got}")
        self._expected.pop(0)
        self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._file.close()
        if exc_type is None and self._expected:
            raise RuntimeError(f"safetensors writer: closed with {len(self._expected)} tensors unwritten")


def shard_names(count: int) -> list[str]:
    """transformers' names: model.safetensors, or model-0000i-of-0000n.safetensors with an index."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(model_dir: Path, weight_map: dict[str, str], total_size: int, total_parameters: int) -> None:
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": weight_map,
    }
    (model_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
