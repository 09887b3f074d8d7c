"""Patient-level splits and the prepared slice sets, on the phantom and (where named) the real ACDC data."""

import numpy as np
import pandas as pd
import pytest

from cmr_utils.geometry import SliceGeometry
from cmr_utils.prepare import (Prepared, normalise_volume, prepare_dataset, resize_volume, split_patients,
                               split_pool, summary_table)
from cmr_utils.readers import DataError, open_source
from conftest import real_dir

PATIENTS = [f"patient{i:03d}" for i in range(1, 41)]


def test_split_is_a_partition_deterministic_and_proportional():
    groups = {p: ["NOR", "DCM", "HCM", "MINF"][i % 4] for i, p in enumerate(PATIENTS)}
    split = split_patients(PATIENTS, (0.6, 0.2, 0.2), seed=1, groups=groups)
    members = split["train"] + split["val"] + split["test"]
    assert sorted(members) == PATIENTS and len(set(members)) == len(members)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (24, 8, 8)
    for name in ("val", "test"):  # stratified: each group twice in 8
        assert sorted(pd.Series([groups[p] for p in split[name]]).value_counts()) == [2, 2, 2, 2]
    assert split == split_patients(list(reversed(PATIENTS)), (0.6, 0.2, 0.2), seed=1, groups=groups)
    assert split != split_patients(PATIENTS, (0.6, 0.2, 0.2), seed=2, groups=groups)


def test_split_errors():
    with pytest.raises(ValueError, match="summing to 1"):
        split_patients(PATIENTS, (0.5, 0.2, 0.2), 0)
    with pytest.raises(ValueError, match="at least 3 patients"):
        split_patients(PATIENTS[:2], (0.6, 0.2, 0.2), 0)
    with pytest.raises(ValueError, match="not unique"):
        split_patients(PATIENTS[:3] * 2, (0.6, 0.2, 0.2), 0)


def test_normalise_and_resize_known_answers():
    vol = np.zeros((2, 10, 20), np.float32)
    vol[:, :, 10:] = 100.0
    norm = normalise_volume(vol)
    assert norm.min() == 0 and norm.max() == 1
    label = np.zeros((2, 10, 20), np.uint8)
    label[:, 2:8, 12:18] = 3
    img, lab, factor = resize_volume(norm, label, 40, "pad")
    assert img.shape == lab.shape == (2, 40, 40) and factor == 0.5
    assert lab[0, 10:30, :].any() and not lab[0, :10].any() and not lab[0, 30:].any()  # padded rows are empty
    assert set(np.unique(lab)) == {0, 3}  # nearest neighbour: no invented classes
    img, lab, factor = resize_volume(norm, label, 10, "crop")
    assert img.shape == (2, 10, 10) and factor == 1.0 and np.array_equal(lab, label[:, :, 5:15])
    with pytest.raises(ValueError, match="resize: expected 'pad' or 'crop'"):
        resize_volume(norm, label, 10, "stretch")
    img, lab, factor = resize_volume(norm, label, 10, "pad", field_of_view=0.5)  # the central 10 x 10 of 20 x 20
    assert img.shape == (2, 10, 10) and factor == 1.0 and np.array_equal(lab, label[:, :, 5:15])
    np.testing.assert_allclose(img, norm[:, :, 5:15], atol=1e-6)
    with pytest.raises(ValueError, match="field_of_view"):
        resize_volume(norm, label, 10, "pad", field_of_view=0.0)


@pytest.fixture(scope="module")
def prepared(phantom_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "prepared"
    sources = [open_source(p) for p in phantom_sources]
    prepare_dataset(sources, out, image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25), split_seed=0,
                    field_of_view=0.8)
    return Prepared.open(out)


def test_prepared_contents(prepared, phantom_sources):
    split = prepared.split_table()
    assert split["patient"].is_unique and set(split["split"]) == {"train", "val", "test"}
    test_patients = set(split.loc[split["split"] == "test", "patient"])
    for name in ("train", "val", "test"):
        images, labels, slices = prepared.images(name), prepared.labels(name), prepared.slices(name)
        assert images.shape == labels.shape == (len(slices), 32, 32) and images.dtype == np.float32
        assert 0 <= images.min() and images.max() <= 1 and labels.max() <= 3
        assert set(slices["patient"]) == set(split.loc[split["split"] == name, "patient"])
        assert set(slices["phase"]) == {"ED", "ES"}
        assert (slices["spacing_y"] > 1.2).all()  # mm per resized pixel, scaled from the header
    pool = prepared.pool_slices()
    assert not test_patients & set(pool.loc[pool["source"] == "acdc-nifti", "patient"])  # no test patient
    acdc = open_source(phantom_sources[0])
    n_frames = len(list(acdc.cine(acdc.patients()[:1])))
    assert set(pool.loc[pool["source"] == "acdc-nifti", "phase"]) == {f"F{t:02d}" for t in range(1, n_frames + 1)}
    assert "decathlon" in set(pool["source"]) and prepared.pool_images().dtype == np.float16
    test = prepared.slices("test")  # pixel spacing scaled by the geometry's factor (kept side / 32 px)
    for vol in acdc.volumes(sorted(set(test["patient"]))):
        rows = test[(test["patient"] == vol.patient) & (test["phase"] == vol.phase)]
        factor = SliceGeometry(*vol.image.shape[1:], "pad", 0.8, 32).spacing_factor
        np.testing.assert_allclose(rows["spacing_y"], vol.spacing[1] * factor)
        np.testing.assert_allclose(rows["spacing_x"], vol.spacing[2] * factor)
        assert (rows["orig_h"] == vol.image.shape[1]).all() and (rows["orig_w"] == vol.image.shape[2]).all()
    manifest = prepared.manifest
    assert manifest["field_of_view"] == 0.8 and manifest["resize"] == "pad" and manifest["image_size"] == 32
    assert manifest["normalise_percentiles"] == [1.0, 99.0]  # recorded, so that a run predicts as it was prepared
    assert [s["layout"] for s in manifest["sources"]] == ["acdc-nifti", "decathlon"]
    assert all(len(s["content_sha256"]) == 64 for s in manifest["sources"])
    assert manifest["counts"]["pool_slices"] == len(pool)


def test_preparation_is_deterministic(prepared, phantom_sources, tmp_path):
    sources = [open_source(p) for p in phantom_sources]
    prepare_dataset(sources, tmp_path / "again", image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                    split_seed=0, field_of_view=0.8)
    again = Prepared.open(tmp_path / "again")
    assert again.manifest["sources"] == prepared.manifest["sources"]
    for name in ("train", "test"):
        assert np.array_equal(again.images(name), prepared.images(name))
    assert again.split_table().equals(prepared.split_table())


def test_summary_table(prepared):
    table = summary_table(prepared)
    assert list(table.index) == ["train", "val", "test", "pretraining pool"]
    np.testing.assert_allclose(table.loc[["train", "val", "test"], ["background", "RV", "MYO", "LV"]].sum(1), 1.0)


def test_pool_split_is_by_patient(prepared):
    pool = prepared.pool_slices()
    train, val = split_pool(pool, 0.3, seed=0)
    key = pool["folder"] + "/" + pool["patient"]
    assert len(train) + len(val) == len(pool) and not set(key.iloc[train]) & set(key.iloc[val])
    with pytest.raises(ValueError, match="val_fraction"):
        split_pool(pool, 1.5, 0)


def test_failure_leaves_nothing_behind(tmp_path, phantom_sources):
    acdc = open_source(phantom_sources[0])
    out = tmp_path / "prepared"
    (tmp_path / "la").mkdir()
    bad = open_source(phantom_sources[1])
    bad.labels = {1: "LA"}
    with pytest.raises(DataError, match="must have ACDC's labels"):
        prepare_dataset([bad], out, image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25), split_seed=0)
    broken = open_source(phantom_sources[0])
    broken.cine = lambda patients=None: (_ for _ in ()).throw(DataError("boom"))  # fails after the splits
    with pytest.raises(DataError, match="boom"):
        prepare_dataset([broken], out, image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                        split_seed=0)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["la"]
    assert acdc.patients()  # the source is untouched and still readable


def test_missing_prepared_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 01 first"):
        Prepared.open(tmp_path)


def test_real_acdc_preparation_subset(tmp_path):
    src = open_source(real_dir("CMR_ACDC_DIR"))
    patients = src.patients()[:6]
    src.patients = lambda: patients  # a quick subset of the real data
    prepare_dataset([src], tmp_path / "p", image_size=64, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                    split_seed=0)
    prepared = Prepared.open(tmp_path / "p")
    table = summary_table(prepared)
    assert table.loc[["train", "val", "test"], "patients"].sum() == 6
    assert (table.loc[["train", "val", "test"], ["RV", "MYO", "LV"]] > 0.001).all().all()


def test_physical_preparation_resamples_to_the_chosen_spacing(phantom_sources, tmp_path):
    """geometry='physical' with target_spacing='auto': the spacing at which a centred 32 px window holds every
    training heart with 10 % to spare (recomputed here from the training volumes), recorded in the manifest,
    every slice's model spacing that spacing, every training label kept whole in its window; a source without
    spacing in the same preparation keeps pixel geometry and the log says so."""
    from cmr_utils.geometry import PhysicalGeometry, heart_half_extent_mm
    from cmr_utils.prepare import WINDOW_MARGIN

    sources = [open_source(p) for p in phantom_sources]
    no_spacing = open_source(phantom_sources[1])
    no_spacing.has_spacing = False
    volumes = no_spacing.volumes
    no_spacing.volumes = lambda patients=None: (v.__class__(**{**v.__dict__, "spacing": None})
                                                for v in volumes(patients))
    cine = no_spacing.cine
    no_spacing.cine = lambda patients=None: (v.__class__(**{**v.__dict__, "spacing": None}) for v in cine(patients))
    lines = []
    manifest = prepare_dataset([sources[0], no_spacing], tmp_path / "p", image_size=32, resize="pad",
                               split_fractions=(0.5, 0.25, 0.25), split_seed=0, field_of_view=0.8,
                               geometry="physical", target_spacing="auto", log=lines.append)
    prepared = Prepared.open(tmp_path / "p")
    train = prepared.split_table().query("split == 'train'")["patient"].tolist()
    half = max(heart_half_extent_mm(v.label, v.spacing[1:]) for v in sources[0].volumes(train))
    assert manifest["geometry"] == "physical" and manifest["target_spacing"] == round(WINDOW_MARGIN * 2 * half / 32, 3)
    assert manifest["window_mm"] == pytest.approx(32 * manifest["target_spacing"], abs=0.1)
    assert [s["geometry"] for s in manifest["sources"]] == ["physical", "pixel"]
    assert "physical geometry: resampled to" in lines[0] and "pixel geometry" in lines[1]
    t = manifest["target_spacing"]
    for name in ("train", "val", "test"):
        slices = prepared.slices(name)
        np.testing.assert_allclose(slices[["spacing_y", "spacing_x"]], t, rtol=0.03)  # up to whole-pixel rounding
    for vol in sources[0].volumes(train):  # the window holds every training heart: no label lost
        g = PhysicalGeometry(*vol.label.shape[1:], *vol.spacing[1:], t, 32)
        full = g.label_probabilities(vol.label, on_canvas=True)[:, 1:].sum()
        assert g.label_probabilities(vol.label)[:, 1:].sum() == pytest.approx(float(full), rel=1e-5)
    labelled = open_source(phantom_sources[0])  # a labelled source without spacing: pixel geometry throughout
    labelled.has_spacing = False
    volumes0 = labelled.volumes
    labelled.volumes = lambda patients=None: (v.__class__(**{**v.__dict__, "spacing": None})
                                              for v in volumes0(patients))
    with pytest.warns(UserWarning, match="data.geometry is physical, but the acdc-nifti files carry no voxel spacing"):
        manifest = prepare_dataset([labelled], tmp_path / "r", image_size=32, resize="pad",
                                   split_fractions=(0.5, 0.25, 0.25), split_seed=0, field_of_view=0.8,
                                   geometry="physical", log=lines.append)
    assert manifest["geometry"] == "pixel" and "target_spacing" not in manifest  # the labelled source decides
    with pytest.raises(ValueError, match="data.geometry"):
        prepare_dataset(sources, tmp_path / "s", image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                        split_seed=0, geometry="mm")
    with pytest.raises(ValueError, match="data.target_spacing"):
        prepare_dataset(sources, tmp_path / "s", image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                        split_seed=0, geometry="physical", target_spacing=-1)


def test_overlap_finds_a_repeated_slice_and_nothing_else(rng):
    """cmr_utils.overlap: a test slice comes back found (also as float16, with noise under the tolerance), with its
    row; another image, a uniform slice and a copy shifted by 4 px are not found."""
    from scipy.ndimage import gaussian_filter

    from cmr_utils.overlap import TOLERANCE, ProtectedSlices

    images = np.stack([gaussian_filter(rng.random((64, 64)), 3) for _ in range(6)]).astype(np.float32)
    images = (images - images.min()) / (images.max() - images.min())
    rows = [{"patient": "patient007", "phase": "ED", "slice": k} for k in range(6)]
    test = ProtectedSlices(images, rows)
    other = gaussian_filter(rng.random((64, 64)), 3)
    other = (other - images.min()) / (images.max() - images.min())
    noisy = images[4] + rng.uniform(-TOLERANCE / 2, TOLERANCE / 2, images[4].shape)
    assert test.find(np.stack([other, noisy.astype(np.float16)])) == (1, rows[4])
    assert test.find(images[2:3].astype(np.float16)) == (0, rows[2])
    assert test.find(np.stack([other, np.full((64, 64), 0.5), np.roll(images[1], 4, axis=1)])) is None
    assert ProtectedSlices(images[:0], []).find(images) is None


def test_an_extra_source_holding_a_test_patient_is_refused(phantom_sources, tmp_path):
    """A copy of a test patient's folder passed as an extra (pretraining) source stops stage 01 with a DataError
    naming the copy and the test patient, and leaves nothing behind; the phantom's own extra source passes."""
    import shutil

    args = dict(image_size=32, resize="pad", split_fractions=(0.5, 0.25, 0.25), split_seed=0, field_of_view=0.8)
    prepare_dataset([open_source(p) for p in phantom_sources], tmp_path / "ok", **args)
    split = Prepared.open(tmp_path / "ok").split_table()
    patient = split.loc[split["split"] == "test", "patient"].iloc[0]
    extra = tmp_path / "more-scans"
    shutil.copytree(phantom_sources[0] / patient, extra / patient)
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=f"more-scans.*test patient {patient}.*no copy of it"):
        prepare_dataset([open_source(phantom_sources[0]), open_source(extra)], out, **args)
    assert not out.exists()


def test_real_acdc_passed_again_as_an_extra_source_is_refused(tmp_path):
    """The real ACDC release as its own extra source: refused; its training and validation patients' slices are
    never mistaken for the test patients' (the nearest other patient's slice differs by far more than the
    tolerance)."""
    from cmr_utils.overlap import TOLERANCE, ProtectedSlices, fingerprints

    folder = real_dir("CMR_ACDC_DIR")
    sources = [open_source(folder), open_source(folder)]
    patients = sources[0].patients()[:8]
    for source in sources:
        source.patients = lambda: patients
    with pytest.raises(DataError, match="is slice .* of test patient patient00"):
        prepare_dataset(sources, tmp_path / "p", image_size=64, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                        split_seed=0)
    assert not (tmp_path / "p").exists()
    prepare_dataset(sources[:1], tmp_path / "p", image_size=64, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                    split_seed=0)
    prepared = Prepared.open(tmp_path / "p")
    test = ProtectedSlices(prepared.images("test"), prepared.slices("test").to_dict("records"))
    pool = prepared.pool_images()
    assert test.find(pool) is None
    import torch
    gap = torch.cdist(fingerprints(pool), test.prints, p=float("inf")).min()
    assert gap > 5 * TOLERANCE


def test_pool_positions_run_base_to_apex_in_every_source(tmp_path):
    """ACDC's slices run base to apex in index order; Sunnybrook's DICOM stacks run apex to base, so their pool
    positions are counted from the end: in both, position 0 is the base, and the log says which stacks turned."""
    from conftest import real_dir

    acdc = open_source(real_dir("CMR_ACDC_DIR"))
    sunnybrook = open_source(real_dir("CMR_SUNNYBROOK_DIR"))
    patients = acdc.patients()[:4]
    acdc.patients = lambda: patients
    lines = []
    prepare_dataset([acdc, sunnybrook], tmp_path / "p", image_size=64, resize="pad", split_fractions=(0.5, 0.25, 0.25),
                    split_seed=0, geometry="physical", log=lines.append)
    pool = Prepared.open(tmp_path / "p").pool_slices()
    for (source, patient, phase), stack in pool.groupby(["source", "patient", "phase"]):
        n = len(stack)
        expected = (n - 1 - stack["slice"] + 0.5) / n if source == "dicom" else (stack["slice"] + 0.5) / n
        np.testing.assert_allclose(stack["position"], expected)
    assert set(pool["source"]) == {"acdc-h5", "dicom"}
    assert any("run from apex to base" in line and "Sunnybrook" in line for line in lines)
    for vol in acdc.volumes():  # the index order taken for sources without an affine: ACDC's LV shrinks along it
        area = (vol.label == 3).sum(axis=(1, 2))
        area = area[np.flatnonzero(area)[0]:np.flatnonzero(area)[-1] + 1]
        assert area[:len(area) // 3].mean() > area[-(len(area) // 3):].mean(), (vol.patient, vol.phase)
