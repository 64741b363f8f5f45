"""Partitioning schemes: determinism, coverage, and the skew they promise."""

from __future__ import annotations

import numpy as np
import pytest

from lorafed.errors import ConfigError
from lorafed.partition import client_table, dirichlet_partition, iid_partition, natural_partition


def _check_disjoint_cover(indices: list[np.ndarray], n: int) -> None:
    union = np.concatenate(indices)
    assert len(union) == len(set(union.tolist())) == n


def test_natural_partition_groups_and_leaves_out_missing_and_tiny() -> None:
    values = np.array(["Tops", "Dresses", None, "Tops", "Trend", "Dresses", "Tops"], dtype=object)
    part = natural_partition(values, min_size=2, column="Department Name")
    assert part.client_ids == ["Tops", "Dresses"]
    assert [i.tolist() for i in part.indices] == [[0, 3, 6], [1, 5]]
    assert any("1 rows with no 'Department Name'" in n for n in part.notes)
    assert any("'Trend' has 1 rows" in n for n in part.notes)


def test_iid_partition_is_seeded_and_balanced() -> None:
    a = iid_partition(103, 4, seed=1)
    b = iid_partition(103, 4, seed=1)
    assert a.sizes() == [26, 26, 26, 25]
    _check_disjoint_cover(a.indices, 103)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    with pytest.raises(ConfigError, match="5 clients but only 4 rows"):
        iid_partition(4, 5, seed=0)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 100)

    def mean_max_share(alpha: float) -> float:
        part = dirichlet_partition(labels, 8, alpha, min_size=5, seed=0)
        _check_disjoint_cover(part.indices, len(labels))
        shares = [np.bincount(labels[i], minlength=10).max() / len(i) for i in part.indices]
        return float(np.mean(shares))

    skewed, mild = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.5 > mild  # with alpha=100 each client's top label is ~10-20% of its rows
    a = dirichlet_partition(labels, 8, 0.5, 5, seed=3)
    b = dirichlet_partition(labels, 8, 0.5, 5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert all(len(i) >= 5 for i in a.indices)


def test_dirichlet_impossible_minimum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="exceeds the 20 rows"):
        dirichlet_partition(np.zeros(20, dtype=int), 5, 0.5, min_size=5, seed=0)


def test_client_table_shows_sizes_and_histograms() -> None:
    part = iid_partition(6, 2, seed=0)
    labels = np.array([0, 1, 0, 1, 1, 1])
    table = client_table(part, labels, ("no", "yes"))
    lines = table.splitlines()
    assert lines[0].split() == ["client", "rows", "no", "yes"]
    for line, idx in zip(lines[2:], part.indices, strict=True):
        counts = np.bincount(labels[idx], minlength=2)
        assert line.split()[1:] == [str(len(idx)), str(counts[0]), str(counts[1])]
