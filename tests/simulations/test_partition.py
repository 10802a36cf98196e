"""Tests for simulations/partition.py: patient-level splits into hospitals and the hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.partition import (
    SCHEMES,
    PartitionError,
    class_table,
    holdout_split,
    partition_patients,
    site_sizes,
)


def _patients(n_neg: int = 300, n_pos: int = 200) -> dict[str, int]:
    return {f"p{i:04d}": 0 for i in range(n_neg)} | {f"q{i:04d}": 1 for i in range(n_pos)}


def _prevalences(sites: list[list[str]], patients: dict[str, int]) -> np.ndarray:
    return np.array([np.mean([patients[p] for p in site]) for site in sites])


class TestPartitionPatients:
    @pytest.mark.parametrize("scheme", SCHEMES)
    def test_every_patient_in_exactly_one_hospital(self, scheme: str) -> None:
        patients = _patients()
        sites = partition_patients(patients, 4, scheme=scheme, alpha=0.3, seed=1)
        flat = [p for site in sites for p in site]
        assert sorted(flat) == sorted(patients)
        assert len(set(flat)) == len(flat)

    @pytest.mark.parametrize("scheme", SCHEMES)
    def test_every_hospital_has_a_few_of_each_class(self, scheme: str) -> None:
        patients = _patients()
        for seed in range(5):
            sites = partition_patients(patients, 5, scheme=scheme, alpha=0.1, min_per_class=3, seed=seed)
            for site in sites:
                counts = np.bincount([patients[p] for p in site], minlength=2)
                assert counts.min() >= 3, (scheme, seed, counts)

    def test_label_skew_visible_with_small_alpha(self) -> None:
        patients = _patients()
        prev = _prevalences(partition_patients(patients, 4, scheme="label-skew", alpha=0.1, seed=0), patients)
        assert prev.max() - prev.min() > 0.3

    def test_iid_keeps_the_global_class_mix_and_sizes(self) -> None:
        patients = _patients()
        sites = partition_patients(patients, 4, scheme="iid", seed=0)
        assert np.allclose(_prevalences(sites, patients), 0.4, atol=0.02)
        assert {len(s) for s in sites} == {125}

    def test_quantity_skew_varies_sizes_not_mix(self) -> None:
        patients = _patients()
        sites = partition_patients(patients, 4, scheme="quantity-skew", alpha=0.5, seed=3)
        sizes = [len(s) for s in sites]
        assert max(sizes) > 2 * min(sizes)
        assert np.allclose(_prevalences(sites, patients), 0.4, atol=0.1)

    def test_deterministic_by_seed(self) -> None:
        patients = _patients()
        a = partition_patients(patients, 3, scheme="label-and-quantity", alpha=0.5, seed=7)
        b = partition_patients(dict(reversed(list(patients.items()))), 3, scheme="label-and-quantity", alpha=0.5, seed=7)
        c = partition_patients(patients, 3, scheme="label-and-quantity", alpha=0.5, seed=8)
        assert a == b
        assert a != c

    def test_unknown_scheme_is_refused(self) -> None:
        with pytest.raises(PartitionError, match="unknown partition scheme"):
            partition_patients(_patients(), 2, scheme="dirichlet")


class TestClassTable:
    def test_margins_are_exact(self) -> None:
        rng = np.random.default_rng(0)
        for _ in range(50):
            counts = rng.integers(5, 200, size=int(rng.integers(2, 5)))
            n_sites = int(rng.integers(2, 7))
            sizes = site_sizes(int(counts.sum()), n_sites, skewed=True, alpha=0.4, min_size=6, rng=rng)
            table = class_table(counts, sizes, skewed=True, alpha=0.3, min_per_class=2, rng=rng)
            assert (table >= 0).all()
            assert table.sum(axis=1).tolist() == sizes.tolist()
            assert table.sum(axis=0).tolist() == counts.tolist()

    def test_mismatched_totals_are_refused(self) -> None:
        with pytest.raises(PartitionError, match="must match"):
            class_table([10, 10], [5, 5], skewed=False, alpha=1.0, min_per_class=1, rng=np.random.default_rng(0))


class TestHoldoutSplit:
    def test_stratified_and_disjoint(self) -> None:
        patients = _patients(301, 99)
        held, rest = holdout_split(patients, 0.15, seed=0)
        assert not set(held) & set(rest)
        assert sorted(held + rest) == sorted(patients)
        labels = [patients[p] for p in held]
        assert labels.count(0) == round(0.15 * 301)
        assert labels.count(1) == round(0.15 * 99)

    def test_zero_fraction_holds_nothing(self) -> None:
        held, rest = holdout_split(_patients(), 0.0)
        assert held == [] and len(rest) == 500

    def test_bad_fraction_is_refused(self) -> None:
        with pytest.raises(PartitionError, match="holdout_fraction"):
            holdout_split(_patients(), 1.0)
