"""Datasets for federated jobs: digits and MNIST IDX loading, IID and Dirichlet partitions."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Dataset:
    """A train/test split as float32 features in [0, 1] and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())


def load_digits(*, test_size: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, split exactly as the FedAvg benchmark task fixes it.

    ``X / 16`` as float32, stratified ``train_test_split(test_size, random_state=seed)``:
    1437 train and 360 test rows with the defaults.

    Examples
    --------
    >>> ds = load_digits()
    >>> tuple(ds.x_train.shape), tuple(ds.x_test.shape), ds.num_classes
    ((1437, 64), (360, 64), 10)
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Dataset(
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        10,
    )


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally ``.gz``) as a numpy array; refuses malformed headers."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); pass MNIST IDX files")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes), file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no {stem}[.gz] in {directory}; the directory must hold the four MNIST IDX files"
    )


def load_mnist(directory: str | Path) -> Dataset:
    """MNIST from its four IDX files in ``directory`` (gzipped or not), pixels / 255, flattened."""
    d = Path(directory)
    arrays = {key: read_idx(_find(d, stem)) for key, stem in _IDX_FILES.items()}

    def feats(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a.reshape(len(a), -1) / 255.0).astype(np.float32))

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        feats(arrays["x_train"]),
        labels(arrays["y_train"]),
        feats(arrays["x_test"]),
        labels(arrays["y_test"]),
        10,
    )


def iid_partition(n: int, num_parts: int, *, seed: int = 0) -> list[np.ndarray]:
    """Row indices per part: ``array_split(default_rng(seed).permutation(n), num_parts)``.

    Examples
    --------
    >>> [len(p) for p in iid_partition(1437, 8)]
    [180, 180, 180, 180, 180, 179, 179, 179]
    """
    if num_parts < 1 or num_parts > n:
        raise ValueError(f"cannot split {n} rows into {num_parts} non-empty parts")
    perm = np.random.default_rng(seed).permutation(n)
    return list(np.array_split(perm, num_parts))


def dirichlet_partition(
    labels: np.ndarray | torch.Tensor,
    num_parts: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Non-IID label skew: each class is split across parts by proportions ~ Dir(alpha).

    Smaller ``alpha`` gives more skew. Draws again (up to ``max_tries``) until every part
    holds at least ``min_size`` rows; each part's indices are returned sorted.

    Examples
    --------
    >>> y = np.repeat(np.arange(10), 50)
    >>> parts = dirichlet_partition(y, 4, alpha=0.5, seed=1)
    >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 1
    (500, True)
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if num_parts * min_size > len(y):
        raise ValueError(f"cannot give {num_parts} parts {min_size} rows each from {len(y)} rows")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a part with fewer than {min_size} rows after "
        f"{max_tries} draws; raise alpha or use fewer devices"
    )
