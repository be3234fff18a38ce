"""Tensors as files of raw element bytes (dtype and shape kept elsewhere); no pickle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from schemas.errors import WireError
from schemas.tensor_codec import writable_buffer

# Fixed dtype table: names read back from disk are looked up here, never resolved by getattr.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def write_tensor_file(path: Path, tensor: torch.Tensor) -> None:
    """Write the tensor's contiguous element bytes to ``path`` atomically (temp + rename)."""
    t = tensor.detach().contiguous().cpu().reshape(-1)
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    write_bytes_file(path, raw.numpy().data)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's elements: the size of its file."""
    return tensor.numel() * tensor.element_size()


def write_bytes_file(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (a temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensor_file(path: Path, dtype: str, shape: list[int]) -> torch.Tensor:
    """A writable tensor over the bytes of ``path`` (one read, no further copy).

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "t.bin"
    >>> write_tensor_file(p, torch.arange(4.0))
    >>> read_tensor_file(p, "float32", [2, 2])
    tensor([[0., 1.],
            [2., 3.]])
    """
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise WireError(f"stored tensor has unknown dtype {dtype!r}")
    size = path.stat().st_size
    if size == 0:
        return torch.empty(shape, dtype=torch_dtype)
    buf = writable_buffer(size)  # not zero-filled first: each byte is written once
    with path.open("rb", buffering=0) as f:
        got = f.readinto(buf)
    if got != size:
        raise WireError(f"stored tensor file {path.name} changed while it was read")
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)
