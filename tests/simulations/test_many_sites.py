"""What keeps 100 or 1,000 simulated hospitals a run of minutes: small stored matrices, parallel
writing, a bounded default federation size, and as many Ray actors as CPUs (not sites)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.dicom import DicomError, read_radiograph
from simulations.cli_run import (
    SYNTHETIC_PATIENTS,
    SYNTHETIC_PATIENTS_MIN,
    SYNTHETIC_PATIENTS_TOTAL,
    synthetic_matrix_cap,
    synthetic_patients,
)
from simulations.federation import federation_config
from simulations.hospitals import SimulationError, make_synthetic_hospitals
from simulations.hospitals import read_labels as read_site_labels


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class TestMakeSyntheticHospitalsAtScale:
    def test_parallel_writing_gives_the_same_files_and_capped_matrices(self, tmp_path: Path):
        kwargs = dict(patients_per_site=4, images_per_patient=(1, 2), corrupt_per_site=1, seed=5, max_matrix=48)
        serial = make_synthetic_hospitals(tmp_path / "serial", 3, workers=1, **kwargs)  # type: ignore[arg-type]
        parallel = make_synthetic_hospitals(tmp_path / "parallel", 3, workers=2, **kwargs)  # type: ignore[arg-type]
        assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")
        assert [s.name for s in parallel.sites] == [s.name for s in serial.sites]
        for site in parallel.sites:
            assert max(site.profile["matrix"]) <= 48
            shapes = set()
            for rel in read_site_labels(tmp_path / "parallel" / site.name):
                try:
                    shapes.add(read_radiograph(tmp_path / "parallel" / site.name / rel).pixels.shape)
                except DicomError:
                    continue  # the site's deliberately corrupt files
            assert shapes == {tuple(site.profile["matrix"])}  # what the manifest says is what was stored

    def test_uncapped_profiles_keep_their_native_matrix(self, tmp_path: Path):
        manifest = make_synthetic_hospitals(tmp_path / "h", 1, patients_per_site=2, images_per_patient=(1, 1),
                                            corrupt_per_site=0, max_matrix=4096)
        assert min(manifest.sites[0].profile["matrix"]) >= 256  # the archetypes' matrices are 256-400 px

    def test_a_matrix_too_small_to_draw_a_chest_is_refused(self, tmp_path: Path):
        with pytest.raises(SimulationError, match="max_matrix 8"):
            make_synthetic_hospitals(tmp_path / "h", 1, max_matrix=8)


class TestStoredMatrix:
    def test_small_runs_store_small_phantoms_and_64_px_runs_keep_native_ones(self):
        assert synthetic_matrix_cap(32) == 128 and synthetic_matrix_cap(8) == 64
        assert synthetic_matrix_cap(64) is None and synthetic_matrix_cap(224) is None


class TestDefaultFederationSize:
    def test_few_sites_keep_500_patients_each(self):
        assert synthetic_patients(3, None) == SYNTHETIC_PATIENTS == 500

    def test_many_sites_share_a_bounded_total(self):
        assert synthetic_patients(100, None) * 100 == SYNTHETIC_PATIENTS_TOTAL
        assert synthetic_patients(1000, None) == SYNTHETIC_PATIENTS_MIN  # still enough for a split per class

    def test_an_explicit_size_is_kept(self):
        assert synthetic_patients(1000, 500) == 500


def test_fl_sim_writes_the_sites_file_the_clientapp_reads():
    from client.site import SITES_FILE
    from simulations import federation

    assert federation.SITES_FILE == SITES_FILE


class TestFederationConfig:
    def test_local_ray_gets_this_machines_cpus_and_one_actor_per_cpu(self):
        config = federation_config(1000, cpus_per_site=1.0, gpus_per_site=0.0, total_cpus=2)
        assert "num-supernodes=1000" in config and "init-args-num-cpus=2" in config
        assert "client-resources-num-cpus=1" in config

    def test_an_existing_cluster_keeps_its_own_resources(self):
        # ray.init(address=...) refuses num_cpus: the cluster's nodes already declared theirs.
        config = federation_config(3, cpus_per_site=1.0, gpus_per_site=0.0, total_cpus=2, ray_address="127.0.0.1:6379")
        assert "init-args" not in config and "num-supernodes=3" in config
