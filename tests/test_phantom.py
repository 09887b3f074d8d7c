"""Tests of cmr_utils.phantom: the ACDC and Decathlon layouts, NIfTI headers, anatomy, determinism and the
atomic generation of ensure_phantom. Files are read back with nibabel directly (not with the project's readers).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cmr_utils import phantom

N_PATIENTS, N_FRAMES, SEED = 5, 8, 3  # five patients: one per ACDC group
INFO_KEYS = ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
CROSS = ndimage.generate_binary_structure(2, 1)  # 4-neighbourhood
SQUARE = ndimage.generate_binary_structure(2, 2)  # 8-neighbourhood


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom") / "acdc"
    return phantom.write_acdc_phantom(folder, n_patients=N_PATIENTS, seed=SEED, n_frames=N_FRAMES)


@pytest.fixture(scope="module")
def decathlon(tmp_path_factory):
    return phantom.write_decathlon_phantom(tmp_path_factory.mktemp("phantom") / "decathlon", n_cases=3, seed=2)


def read_info(patient_dir):
    lines = (patient_dir / "Info.cfg").read_text().splitlines()
    return [line.split(": ", 1) for line in lines]


def es_frame(patient_dir) -> int:
    return int(dict(read_info(patient_dir))["ES"])


def zyx(path) -> np.ndarray:
    """NIfTI data (X, Y, Z[, T]) as the project's (Z, Y, X) / (T, Z, Y, X)."""
    return np.asarray(nib.load(path).dataobj).T


def labelled_frames(acdc_folder):
    """(patient name, ED labels, ES labels) for every patient, labels (Z, Y, X)."""
    for number in range(1, N_PATIENTS + 1):
        name = f"patient{number:03d}"
        patient_dir = acdc_folder / name
        es = es_frame(patient_dir)
        yield name, zyx(patient_dir / f"{name}_frame01_gt.nii.gz"), zyx(patient_dir / f"{name}_frame{es:02d}_gt.nii.gz")


def all_files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ layout
def test_acdc_layout_and_file_names(acdc):
    assert sorted(p.name for p in acdc.iterdir()) == [f"patient{n:03d}" for n in range(1, 6)] + ["phantom.json"]
    for number in range(1, N_PATIENTS + 1):
        name = f"patient{number:03d}"
        es = es_frame(acdc / name)
        assert sorted(p.name for p in (acdc / name).iterdir()) == sorted([
            "Info.cfg", f"{name}_4d.nii.gz", f"{name}_frame01.nii.gz", f"{name}_frame01_gt.nii.gz",
            f"{name}_frame{es:02d}.nii.gz", f"{name}_frame{es:02d}_gt.nii.gz"])


def test_info_cfg_has_acdc_format(acdc):
    groups = []
    for number in range(1, N_PATIENTS + 1):
        text = (acdc / f"patient{number:03d}" / "Info.cfg").read_text()
        assert text.endswith("\n")
        info = read_info(acdc / f"patient{number:03d}")
        assert [key for key, _ in info] == INFO_KEYS
        values = dict(info)
        assert values["ED"] == "1"
        assert values["NbFrame"] == str(N_FRAMES)
        # ES index in 35-45 % of 8 frames: round(2.8..3.6) = 3 or 4 (0-based), so frame 4 or 5 (1-based)
        assert values["ES"] in {"4", "5"}
        assert re.fullmatch(r"\d{3}\.\d", values["Height"]) and re.fullmatch(r"\d{2,3}\.\d", values["Weight"])
        groups.append(values["Group"])
    assert groups == ["NOR", "DCM", "HCM", "MINF", "RV"]


def test_nifti_headers(acdc):
    for number in range(1, N_PATIENTS + 1):
        name = f"patient{number:03d}"
        cine = nib.load(acdc / name / f"{name}_4d.nii.gz")
        assert cine.ndim == 4 and cine.shape[3] == N_FRAMES
        x, y, z = cine.shape[:3]
        assert 100 <= x <= 140 and 100 <= y <= 140 and 6 <= z <= 10
        zooms = cine.header.get_zooms()
        assert len(zooms) == 4 and zooms[3] > 0
        sx, sy, sz = zooms[:3]
        assert sx == sy and 180 <= sx * min(x, y) <= 230.01 and 5.0 <= sz <= 10.0  # a 180-230 mm field of view
        assert cine.get_data_dtype() == np.int16
        es = es_frame(acdc / name)
        for stem, dtype in [("frame01", np.int16), ("frame01_gt", np.uint8),
                            (f"frame{es:02d}", np.int16), (f"frame{es:02d}_gt", np.uint8)]:
            image = nib.load(acdc / name / f"{name}_{stem}.nii.gz")
            assert image.shape == (x, y, z)
            assert image.header.get_zooms() == pytest.approx((sx, sy, sz))
            assert image.get_data_dtype() == dtype
        for image in (cine, nib.load(acdc / name / f"{name}_frame01_gt.nii.gz")):
            assert np.allclose(np.diag(image.affine)[:3], (sx, sy, sz), rtol=1e-5)
            assert np.allclose(image.affine - np.diag(np.diag(image.affine)), 0.0)
            assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1


def test_ed_and_es_frames_equal_cine_frames(acdc):
    for number in range(1, N_PATIENTS + 1):
        name = f"patient{number:03d}"
        cine = np.asarray(nib.load(acdc / name / f"{name}_4d.nii.gz").dataobj)
        for frame in (1, es_frame(acdc / name)):
            image = np.asarray(nib.load(acdc / name / f"{name}_frame{frame:02d}.nii.gz").dataobj)
            np.testing.assert_array_equal(image, cine[..., frame - 1])
        # a different frame is not equal: the frames really are picked by number
        assert not np.array_equal(cine[..., 0], cine[..., es_frame(acdc / name) - 1])


# ------------------------------------------------------------------------------------------------ anatomy
def test_myocardium_separates_lv_from_everything(acdc):
    for name, *frames in labelled_frames(acdc):
        for labels in frames:
            assert set(np.unique(labels)) <= {0, 1, 2, 3}
            for z, slice_labels in enumerate(labels):
                padded = np.pad(slice_labels, 1)  # an LV touching the image border would meet this 0
                lv = padded == 3
                assert lv.any(), f"{name} slice {z}: no LV cavity"
                lv_ring = ndimage.binary_dilation(lv, CROSS) & ~lv
                assert np.all(padded[lv_ring] == 2), f"{name} slice {z}: LV pixel next to non-MYO"
                rv_neighbourhood = ndimage.binary_dilation(padded == 1, SQUARE)
                assert not np.any(rv_neighbourhood & lv), f"{name} slice {z}: RV touches LV"
                if (padded == 1).any():
                    rv_touching = ndimage.binary_dilation(padded == 1, CROSS)
                    assert np.any(rv_touching & (padded == 2)), f"{name} slice {z}: RV does not touch MYO"


def test_structures_by_slice_position(acdc):
    for name, ed, es in labelled_frames(acdc):
        n_z = ed.shape[0]
        for labels in (ed, es):
            assert set(np.unique(labels[n_z // 2])) == {0, 1, 2, 3}, f"{name}: mid slice misses a structure"
            assert not np.any(labels[-1] == 1), f"{name}: RV in the most apical slice"
        lv_area = (ed == 3).sum(axis=(1, 2))
        assert lv_area[0] > lv_area[-1], f"{name}: LV does not shrink towards the apex"
        assert np.all(np.diff(lv_area) <= 2), f"{name}: LV grows towards the apex"


def test_heart_contracts_from_ed_to_es(acdc):
    for name, ed, es in labelled_frames(acdc):
        lv_ed, lv_es = (ed == 3).sum(), (es == 3).sum()
        assert lv_ed > lv_es, f"{name}: LV cavity not smaller at ES"
        mid = ed.shape[0] // 2
        # myocardium thicker at ES: more muscle per cavity pixel
        ratio_ed = (ed[mid] == 2).sum() / (ed[mid] == 3).sum()
        ratio_es = (es[mid] == 2).sum() / (es[mid] == 3).sum()
        assert ratio_es > ratio_ed, f"{name}: myocardium not thicker at ES"


def test_cine_returns_towards_ed_at_end_of_cycle(acdc):
    for number in range(1, N_PATIENTS + 1):
        name = f"patient{number:03d}"
        cine = zyx(acdc / name / f"{name}_4d.nii.gz").astype(np.float64)
        es = es_frame(acdc / name) - 1
        distance_es = np.abs(cine[es] - cine[0]).mean()
        distance_last = np.abs(cine[-1] - cine[0]).mean()
        assert distance_last < distance_es, f"{name}: last frame not closer to ED than ES is"


def test_image_contrast_and_unlabelled_surroundings(acdc):
    for number in range(1, N_PATIENTS + 1):
        name = f"patient{number:03d}"
        image = zyx(acdc / name / f"{name}_frame01.nii.gz").astype(np.float64)
        labels = zyx(acdc / name / f"{name}_frame01_gt.nii.gz")
        lv, myo, rv = image[labels == 3].mean(), image[labels == 2].mean(), image[labels == 1].mean()
        assert lv > 1.5 * myo and rv > 1.5 * myo, f"{name}: blood not brighter than myocardium"
        # bright unlabelled tissue (fat, aorta) and dark unlabelled tissue (lungs, air) exist: not a threshold task
        background = image[labels == 0]
        assert (background > 0.7 * lv).sum() > 20 and (background < 0.5 * myo).sum() > 20


def test_heart_pose_varies_with_rv_on_the_image_left(acdc):
    angles = []
    for name, ed, _ in labelled_frames(acdc):
        mid = ed[ed.shape[0] // 2]
        lv_y, lv_x = np.argwhere(mid == 3).mean(axis=0)
        rv_y, rv_x = np.argwhere(mid == 1).mean(axis=0)
        assert rv_x < lv_x, f"{name}: RV not on the image left of the LV"
        angles.append(np.arctan2(rv_y - lv_y, rv_x - lv_x) % (2 * np.pi))
    assert np.std(angles) > 0.05  # per-patient in-plane rotation


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    first = phantom.write_acdc_phantom(tmp_path / "a", n_patients=2, seed=7, n_frames=3)
    second = phantom.write_acdc_phantom(tmp_path / "b", n_patients=2, seed=7, n_frames=3)
    other = phantom.write_acdc_phantom(tmp_path / "c", n_patients=2, seed=8, n_frames=3)
    assert all_files(first) == all_files(second)
    cine = "patient001/patient001_4d.nii.gz"
    assert not np.array_equal(zyx(first / cine), zyx(other / cine))


def test_patient_depends_on_seed_and_number_only(tmp_path):
    small = phantom.write_acdc_phantom(tmp_path / "small", n_patients=1, seed=5, n_frames=3)
    large = phantom.write_acdc_phantom(tmp_path / "large", n_patients=2, seed=5, n_frames=3)
    assert all_files(small / "patient001") == all_files(large / "patient001")


# ------------------------------------------------------------------------------------------- Decathlon
def test_decathlon_layout_and_dataset_json(decathlon):
    names = [f"la_{n:03d}.nii.gz" for n in (1, 2, 3)]
    assert sorted(p.name for p in decathlon.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "phantom.json"]
    assert sorted(p.name for p in (decathlon / "imagesTr").iterdir()) == names
    assert sorted(p.name for p in (decathlon / "labelsTr").iterdir()) == names
    dataset = json.loads((decathlon / "dataset.json").read_text())
    assert dataset["name"] == "Left Atrium"
    assert dataset["modality"] == {"0": "MRI"}
    assert dataset["labels"] == {"0": "background", "1": "left atrium"}
    assert dataset["numTraining"] == 3 and dataset["test"] == []
    assert dataset["training"] == [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names]


def test_decathlon_volumes(decathlon):
    for number in (1, 2, 3):
        image = nib.load(decathlon / "imagesTr" / f"la_{number:03d}.nii.gz")
        label = nib.load(decathlon / "labelsTr" / f"la_{number:03d}.nii.gz")
        assert image.ndim == 3 and image.shape == label.shape
        x, y, z = image.shape
        assert 72 <= x <= 88 and 72 <= y <= 88 and 36 <= z <= 44
        for volume in (image, label):
            assert volume.header.get_zooms() == pytest.approx((1.25, 1.25, 1.37))
            assert np.allclose(np.diag(volume.affine)[:3], (1.25, 1.25, 1.37))
            assert int(volume.header["qform_code"]) == 1 and int(volume.header["sform_code"]) == 1
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        atrium = np.asarray(label.dataobj)
        assert set(np.unique(atrium)) == {0, 1}
        _, n_components = ndimage.label(atrium, structure=np.ones((3, 3, 3)))
        assert n_components == 1
        intensities = np.asarray(image.dataobj).astype(np.float64)
        assert intensities[atrium == 1].mean() > 2.0 * intensities.mean()


def test_decathlon_is_deterministic(tmp_path):
    first = phantom.write_decathlon_phantom(tmp_path / "a", n_cases=1, seed=4)
    second = phantom.write_decathlon_phantom(tmp_path / "b", n_cases=1, seed=4)
    other = phantom.write_decathlon_phantom(tmp_path / "c", n_cases=1, seed=5)
    assert all_files(first) == all_files(second)
    image = Path("imagesTr", "la_001.nii.gz")
    assert all_files(first)[image] != all_files(other)[image]


# -------------------------------------------------------------------------------------- ensure_phantom
def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_ensure_phantom_generates_once(tmp_path):
    acdc, decathlon = phantom.ensure_phantom(tmp_path, n_patients=2, n_extra=1, seed=0)
    assert (acdc, decathlon) == (tmp_path / "acdc", tmp_path / "decathlon")
    assert (acdc / "patient002" / "patient002_4d.nii.gz").is_file()
    assert nib.load(acdc / "patient001" / "patient001_4d.nii.gz").shape[3] == 12
    assert (decathlon / "labelsTr" / "la_001.nii.gz").is_file()
    before = {**mtimes(acdc), **mtimes(decathlon)}
    assert phantom.ensure_phantom(tmp_path, n_patients=2, n_extra=1, seed=0) == (acdc, decathlon)
    assert {**mtimes(acdc), **mtimes(decathlon)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acdc", "decathlon"]  # no temp folder left


def test_ensure_phantom_survives_a_crashed_run(tmp_path):
    dead = tmp_path / ".acdc.partial-999999999-deadbeef"  # no such pid: a crashed generator's leftover
    (dead / "patient001").mkdir(parents=True)
    (dead / "patient001" / "Info.cfg").write_text("ED: 1\n")
    alive = tmp_path / f".acdc.partial-{os.getpid()}-0000beef"  # a running process's folder: left alone
    alive.mkdir()
    acdc, _ = phantom.ensure_phantom(tmp_path, n_patients=2, n_extra=1, seed=0)
    assert sorted(p.name for p in acdc.iterdir()) == ["patient001", "patient002", "phantom.json"]
    assert len(list((acdc / "patient001").iterdir())) == 6
    if os.name == "posix":
        assert not dead.exists()
    assert alive.is_dir()


def test_ensure_phantom_failure_leaves_no_dataset(tmp_path, monkeypatch):
    real_case, calls = phantom._decathlon_case, []

    def failing_second_case(rng):
        # while generating, the dataset exists only as a hidden partial sibling, never under its final name
        calls.append(sorted(p.name.split("-")[0] for p in tmp_path.iterdir()))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_case(rng)

    monkeypatch.setattr(phantom, "_decathlon_case", failing_second_case)
    with pytest.raises(RuntimeError, match="simulated crash"):
        phantom.ensure_phantom(tmp_path, n_patients=1, n_extra=2, seed=0)
    assert calls == [[".decathlon.partial", "acdc"]] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acdc"]  # complete ACDC kept, no partial left


def test_ensure_phantom_rejects_a_different_existing_dataset(tmp_path):
    phantom.ensure_phantom(tmp_path, n_patients=1, n_extra=1, seed=0)
    with pytest.raises(ValueError, match="not the phantom asked for"):
        phantom.ensure_phantom(tmp_path, n_patients=2, n_extra=1, seed=0)
    foreign = tmp_path / "other"
    (foreign / "acdc").mkdir(parents=True)  # someone else's folder, no phantom.json
    with pytest.raises(ValueError, match="not the phantom asked for"):
        phantom.ensure_phantom(foreign, n_patients=1, n_extra=1, seed=0)


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("kwargs, error", [
    ({"n_patients": 0}, ValueError), ({"n_patients": 1000}, ValueError), ({"n_patients": 1.5}, TypeError),
    ({"n_patients": True}, TypeError), ({"n_frames": 2}, ValueError), ({"n_frames": 100}, ValueError),
    ({"seed": -1}, ValueError), ({"seed": 1.0}, TypeError), ({"seed": "0"}, TypeError),
])
def test_write_acdc_rejects_bad_arguments(tmp_path, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        phantom.write_acdc_phantom(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_writers_reject_bad_folders(tmp_path):
    with pytest.raises(TypeError, match="folder"):
        phantom.write_acdc_phantom(3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        phantom.write_acdc_phantom(tmp_path / "full", n_patients=1, n_frames=3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        phantom.write_decathlon_phantom(tmp_path / "file", n_cases=1)


@pytest.mark.parametrize("call, error, name", [
    (lambda root: phantom.write_decathlon_phantom(root / "d", n_cases=0), ValueError, "n_cases"),
    (lambda root: phantom.write_decathlon_phantom(root / "d", seed=None), TypeError, "seed"),
    (lambda root: phantom.ensure_phantom(root, n_extra=0), ValueError, "n_extra"),
    (lambda root: phantom.ensure_phantom(root, n_patients=-3), ValueError, "n_patients"),
    (lambda root: phantom.ensure_phantom(None), TypeError, "root"),
])
def test_decathlon_and_ensure_reject_bad_arguments(tmp_path, call, error, name):
    with pytest.raises(error, match=name):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []
