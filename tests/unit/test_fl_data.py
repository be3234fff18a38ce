"""Tests of producer.fl.data: the benchmark's digits split, IDX files, partitions."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from producer.fl.data import dirichlet_partition, iid_partition, load_digits, load_mnist, read_idx


def test_digits_split_is_the_benchmark_split() -> None:
    from sklearn.datasets import load_digits as sk
    from sklearn.model_selection import train_test_split

    x, y = sk(return_X_y=True)
    x_tr, _, _, y_te = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.2, random_state=0, stratify=y
    )
    ds = load_digits()
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    np.testing.assert_array_equal(ds.x_train.numpy(), x_tr)
    np.testing.assert_array_equal(ds.y_test.numpy(), y_te)
    assert float(ds.x_train.max()) <= 1.0 and str(ds.y_train.dtype) == "torch.int64"


def test_iid_partition_is_the_benchmark_partition() -> None:
    parts = iid_partition(1437, 8, seed=0)
    expected = np.array_split(np.random.default_rng(0).permutation(1437), 8)
    assert [len(p) for p in parts] == [180] * 5 + [179] * 3
    for a, b in zip(parts, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dirichlet_partition_covers_every_row_exactly_once() -> None:
    y = np.repeat(np.arange(10), 40)
    parts = dirichlet_partition(y, 5, alpha=0.3, seed=3)
    merged = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(merged, np.arange(len(y)))


def test_small_dirichlet_alpha_skews_labels_more_than_a_large_one() -> None:
    y = np.repeat(np.arange(10), 100)

    def skew(alpha: float) -> float:
        parts = dirichlet_partition(y, 8, alpha=alpha, seed=0)
        # mean over parts of the share of the part's most common label
        return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))

    assert skew(0.1) > skew(100.0) + 0.2


def test_dirichlet_partition_refuses_a_nonpositive_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.zeros(10), 2, alpha=0.0)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_mnist_idx_files_load_as_scaled_flat_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 28, 28))
    labels = rng.integers(0, 10, size=6)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs[:2], False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2], True)
    ds = load_mnist(tmp_path)
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (2, 784)
    np.testing.assert_allclose(ds.x_train.numpy(), imgs.reshape(6, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), labels)


def test_a_file_that_is_not_idx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)


def test_a_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x"
    _write_idx(p, np.zeros((4, 3)), False)
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(ValueError, match="header says"):
        read_idx(p)
