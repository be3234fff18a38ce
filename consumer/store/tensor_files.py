"""Tensors as files of raw element bytes (dtype and shape kept elsewhere); no pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from schemas.errors import WireError
from schemas.tensor_codec import FramedParts, writable_buffer

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
    """Write the tensor's contiguous element bytes to the new file ``path`` (see
    :func:`write_bytes_file`)."""
    t = tensor.detach().contiguous().cpu().reshape(-1)
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    write_bytes_file(path, raw.numpy().data)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's elements: the size of its file."""
    return tensor.numel() * tensor.element_size()


def write_bytes_file(path: Path, data: bytes | memoryview | FramedParts) -> None:
    """Write ``data`` to ``path``, a file that must not exist yet (``O_EXCL``); a failed
    write removes it. Framed parts are written part by part, never joined.

    No temp file and rename: the store writes blobs under fresh random names that no
    committed row names until their unit commits, and deletes files no row names when it
    opens (``BlobUnits.collect_orphans``), so a file cut short by a crash is never read.
    Creating one name instead of a temp name plus a rename is one metadata operation less
    per stored result (docs/performance.md).

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "b.bin"
    >>> write_bytes_file(p, b"abc"); p.read_bytes()
    b'abc'
    >>> write_bytes_file(p, b"x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    FileExistsError: [Errno 17] File exists: ...
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in data.parts if isinstance(data, FramedParts) else [data]:
                f.write(part)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def read_file_into(path: Path, view: memoryview) -> int:
    """Read ``path`` into ``view`` until it is full or the file ends; the bytes read.

    One ``read`` returns at most about 2 GiB on Linux, so this loops.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "b.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> buf = bytearray(5)
    >>> read_file_into(p, memoryview(buf)), bytes(buf)
    (3, b'abc\\x00\\x00')
    """
    got = 0
    with path.open("rb", buffering=0) as f:
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return got


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
    if read_file_into(path, buf) != size:
        raise WireError(f"stored tensor file {path.name} changed while it was read")
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)
