"""The one reader interface over four layouts, on files the tests write (real NIfTI headers, HDF5 in both
axis orders), on the phantom, and on the real data where CMR_ACDC_DIR / CMR_LA2018_DIR name it."""
import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from cmr_utils.readers import DataError, detect_layout, open_source, parse_info_cfg
from cmr_utils.readers import acdc as readers_acdc, base as readers_base
from cmr_utils.readers import decathlon as readers_decathlon, la2018 as readers_la2018
from conftest import real_dir


def volume(rng, shape=(5, 24, 20)):
    return rng.random(shape).astype(np.float32)


def labels(rng, shape=(5, 24, 20), top=3):
    return rng.integers(0, top + 1, shape).astype(np.uint8)


def write_nifti(path, zyx, spacing_zyx=(8.0, 1.5, 1.25), dtype=None):
    data = np.transpose(zyx, (2, 1, 0)) if zyx.ndim == 3 else np.transpose(zyx, (3, 2, 1, 0))
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    img = nib.Nifti1Image(data.astype(dtype or data.dtype), affine)
    img.header.set_zooms((spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]) + ((25.0,) if zyx.ndim == 4 else ()))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_acdc_patient(root, rng, pid="patient001", ed=1, es=3, frames=4, shape=(5, 24, 20)):
    cine = rng.random((frames, *shape)).astype(np.float32)
    d = root / pid
    write_nifti(d / f"{pid}_4d.nii.gz", cine)
    for f in (ed, es):
        write_nifti(d / f"{pid}_frame{f:02d}.nii.gz", cine[f - 1])
        write_nifti(d / f"{pid}_frame{f:02d}_gt.nii.gz", labels(rng, shape), dtype=np.uint8)
    (d / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 170.0\nNbFrame: {frames}\nWeight: 70.0\n")
    return cine


def test_acdc_nifti_layout_spacing_and_cine(tmp_path, rng):
    cine = write_acdc_patient(tmp_path, rng, "patient001")
    write_acdc_patient(tmp_path, rng, "patient002")
    src = open_source(tmp_path)
    assert src.layout == "acdc-nifti" and src.patients() == ["patient001", "patient002"]
    vols = list(src.volumes(["patient001"]))
    assert [(v.phase, v.frame) for v in vols] == [("ED", 1), ("ES", 3)]
    ed = vols[0]
    assert ed.image.shape == (5, 24, 20) and ed.label.shape == (5, 24, 20) and ed.label.dtype == np.uint8
    np.testing.assert_allclose(ed.image, cine[0])  # (Z, Y, X) round trip through nibabel's (X, Y, Z)
    assert ed.spacing == pytest.approx((8.0, 1.5, 1.25)) and ed.group == "DCM"
    frames = list(src.cine(["patient001"]))
    assert [v.phase for v in frames] == ["F01", "F02", "F03", "F04"] and all(v.label is None for v in frames)
    np.testing.assert_allclose(frames[2].image, cine[2])


def test_acdc_h5_layout_z_first_ed_is_lower_frame(tmp_path, rng):
    for frame in (4, 11):
        with h5py.File(tmp_path / f"patient007_frame{frame:02d}.h5", "w") as f:
            f["image"] = np.full((3, 16, 12), frame, np.float32) + volume(rng, (3, 16, 12))
            f["label"] = labels(rng, (3, 16, 12))
            f["scribble"] = np.zeros((3, 16, 12), np.uint16)
    src = open_source(tmp_path)
    assert src.layout == "acdc-h5"
    ed, es = src.volumes()
    assert (ed.phase, ed.frame, es.phase, es.frame) == ("ED", 4, "ES", 11)
    assert ed.image.shape == (3, 16, 12) and ed.spacing is None and ed.image.mean() < es.image.mean()
    assert not src.has_spacing and src.spacing_csv is None and es.spacing is None  # no spacing.csv anywhere


SPACING_HEADER = "file,spacing_x_mm,spacing_y_mm,spacing_z_mm,nifti_shape_xyz\n"


def write_h5_pair(folder, rng, pid="patient007", frames=(1, 12), shape=(3, 16, 12)):
    """Two SSL4MIS HDF5 frames (Z, H, W) of ``pid``; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        with h5py.File(folder / f"{pid}_frame{frame:02d}.h5", "w") as f:
            f["image"], f["label"] = volume(rng, shape), labels(rng, shape)
    return [f"{pid}_frame{frame:02d}.h5" for frame in frames]


def spacing_rows(rows):
    return SPACING_HEADER + "".join(",".join(map(str, row)) + "\n" for row in rows)


@pytest.mark.parametrize("where", ["beside", "one folder up"])
def test_acdc_h5_spacing_from_csv(tmp_path, rng, where):
    """spacing.csv gives each volume (z, y, x) = (spacing_z_mm, spacing_y_mm, spacing_x_mm); x != y checks the order."""
    from cmr_utils.prepare import content_hash

    folder = tmp_path / "ACDC" / "ACDC_training_volumes"
    names = write_h5_pair(folder, rng, "patient007", shape=(3, 16, 12))
    names += write_h5_pair(folder, rng, "patient009", frames=(1, 8), shape=(4, 10, 14))
    csv_path = (folder if where == "beside" else folder.parent) / "spacing.csv"
    shapes = ["12x16x3", "12x16x3", "14x10x4", "14x10x4"]  # W x H x Z of the (Z, H, W) arrays
    spacings = [(1.25, 1.5, 10), (1.25, 1.5, 10), (0.7, 0.8, 5.5), (0.7, 0.8, 5.5)]  # x, y, z
    csv_path.write_text(spacing_rows([(n, *sp, sh) for n, sp, sh in zip(names, spacings, shapes)]
                                     + [("patient100_frame01.h5", 1, 1, 1, "1x1x1")]))  # other files' rows: ignored
    src = open_source(folder)
    assert src.layout == "acdc-h5" and src.has_spacing and src.spacing_csv == csv_path
    vols = list(src.volumes())
    assert [v.path.name for v in vols] == names
    assert [v.spacing for v in vols] == [(10.0, 1.5, 1.25)] * 2 + [(5.5, 0.8, 0.7)] * 2
    assert all(v.spacing == (10.0, 1.5, 1.25) for v in src.cine(["patient007"]))
    assert src.slice_counts() == {"patient007": 6, "patient009": 8}  # unchanged by the CSV
    files = src.files()
    assert len(files) == 5 and files[0].resolve() == csv_path.resolve() and all(p.is_file() for p in files)
    before = content_hash(files, src.folder)  # the manifest's hash records the CSV, wherever it lies
    csv_path.write_text(csv_path.read_text().replace("10,12x16x3", "8,12x16x3"))
    assert content_hash(open_source(folder).files(), folder) != before
    assert next(open_source(folder).volumes()).spacing == (8.0, 1.5, 1.25)


def test_acdc_h5_spacing_csv_read_once(tmp_path, rng, monkeypatch):
    names = write_h5_pair(tmp_path, rng, "patient007") + write_h5_pair(tmp_path, rng, "patient008")
    (tmp_path / "spacing.csv").write_text(spacing_rows([(n, 1.5, 1.5, 10, "12x16x3") for n in names]))
    src = open_source(tmp_path)
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert len(list(src.volumes())) == 4
    assert sum(name.endswith("spacing.csv") for name in opened) == 1


@pytest.mark.parametrize("rows, message", [
    ("file,spacing_x_mm,spacing_y_mm,nifti_shape_xyz\n{a},1.5,1.5,12x16x3\n{b},1.5,1.5,12x16x3\n",
     r"spacing.csv: missing column\(s\) \['spacing_z_mm'\]; expected file, spacing_x_mm"),
    (SPACING_HEADER + "{a},1.5,1.5,10,12x16x3\n",
     r"spacing.csv: no row for 1 file\(s\) of .*: patient007_frame12.h5"),
    (SPACING_HEADER + "{a},1.5,1.5,10,12x16x3\n{b},1.5,0,10,12x16x3\n",
     r"spacing.csv:3: patient007_frame12.h5: spacing_y_mm must be a positive number of mm, got '0'"),
    (SPACING_HEADER + "{a},-1.5,1.5,10,12x16x3\n{b},1.5,1.5,10,12x16x3\n",
     r"spacing.csv:2: patient007_frame01.h5: spacing_x_mm must be a positive number of mm, got '-1.5'"),
    (SPACING_HEADER + "{a},1.5,1.5,ten,12x16x3\n{b},1.5,1.5,10,12x16x3\n",
     r"spacing.csv:2: patient007_frame01.h5: spacing_z_mm must be a positive number of mm, got 'ten'"),
    (SPACING_HEADER + "{a},1.5,1.5,10,12x16x3\n{b},1.5,1.5,10,12x16\n",
     r"spacing.csv:3: patient007_frame12.h5: nifti_shape_xyz must be three positive integers"),
    (SPACING_HEADER + "{a},1.5,1.5,10,16x12x3\n{b},1.5,1.5,10,12x16x3\n",
     r"spacing.csv: patient007_frame01.h5: nifti_shape_xyz 16x12x3 does not match the HDF5 array "
     r".*patient007_frame01.h5 of shape \(Z, H, W\) \(3, 16, 12\); expected nifti_shape_xyz 12x16x3"),
])
def test_acdc_h5_spacing_csv_errors_name_the_csv(tmp_path, rng, rows, message):
    a, b = write_h5_pair(tmp_path / "h5", rng, "patient007", shape=(3, 16, 12))
    (tmp_path / "spacing.csv").write_text(rows.format(a=a, b=b))  # one folder up
    src = open_source(tmp_path / "h5")
    assert src.has_spacing
    with pytest.raises(DataError, match=message):
        list(src.volumes())


def test_decathlon_layout(tmp_path, rng):
    img = volume(rng, (6, 20, 18))
    write_nifti(tmp_path / "imagesTr" / "la_003.nii.gz", img, (1.37, 1.25, 1.25))
    write_nifti(tmp_path / "labelsTr" / "la_003.nii.gz", labels(rng, (6, 20, 18), top=1), (1.37, 1.25, 1.25), np.uint8)
    (tmp_path / "imagesTr" / "._la_003.nii.gz").write_bytes(b"macOS resource fork")  # must be ignored
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "left atrium"}}))
    src = open_source(tmp_path)
    assert src.layout == "decathlon" and src.patients() == ["la_003"]
    (v,) = src.volumes()
    np.testing.assert_allclose(v.image, img)
    assert v.label.max() == 1 and v.spacing == pytest.approx((1.37, 1.25, 1.25))


def test_la2018_layout_z_last(tmp_path, rng):
    xyz = volume(rng, (20, 18, 6))
    (tmp_path / "CASE01").mkdir()
    with h5py.File(tmp_path / "CASE01" / "mri_norm2.h5", "w") as f:
        f["image"] = xyz
        f["label"] = labels(rng, (20, 18, 6), top=1)
    (v,) = open_source(tmp_path).volumes()
    assert v.image.shape == (6, 18, 20)
    np.testing.assert_allclose(v.image[2], xyz[:, :, 2].T)  # axial slice k is image[:, :, k]


def test_phantom_is_read_as_official_acdc(phantom_sources):
    acdc, extra = (open_source(p) for p in phantom_sources)
    assert acdc.layout == "acdc-nifti" and extra.layout == "decathlon"
    v = next(acdc.volumes())
    assert set(np.unique(v.label)) == {0, 1, 2, 3} and v.spacing[0] >= 5 and 180 / 140 <= v.spacing[1] <= 230 / 100


# ------------------------------------------------------------------------------------------ bad input
def test_missing_empty_and_unknown_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(DataError, match="empty"):
        open_source(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="(?s)unrecognised data layout.*acdc-nifti.*acdc-h5.*decathlon.*la2018-h5"
                                        ".*mnms.*nifti-pairs"):
        detect_layout(tmp_path)


def test_shape_mismatch_names_the_label_file(tmp_path, rng):
    write_acdc_patient(tmp_path, rng)
    gt = tmp_path / "patient001" / "patient001_frame03_gt.nii.gz"
    write_nifti(gt, labels(rng, (5, 24, 18)), dtype=np.uint8)
    with pytest.raises(DataError, match=r"patient001_frame03_gt.nii.gz: label shape \(5, 24, 18\) does not match"):
        list(open_source(tmp_path).volumes())


def test_labels_outside_the_source_set(tmp_path, rng):
    write_acdc_patient(tmp_path, rng)
    write_nifti(tmp_path / "patient001" / "patient001_frame01_gt.nii.gz", labels(rng, top=5), dtype=np.uint8)
    with pytest.raises(DataError, match=r"frame01_gt.nii.gz: label values \[4, 5\] outside"):
        list(open_source(tmp_path).volumes())


def test_corrupt_and_truncated_files(tmp_path, rng):
    write_acdc_patient(tmp_path, rng)
    path = tmp_path / "patient001" / "patient001_frame01.nii.gz"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match="patient001_frame01.nii.gz: cannot read NIfTI"):
        list(open_source(tmp_path).volumes())
    h5dir = tmp_path / "h5"
    h5dir.mkdir()
    (h5dir / "patient001_frame01.h5").write_bytes(b"not hdf5 at all")
    (h5dir / "patient001_frame12.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="patient001_frame01.h5: cannot read HDF5"):
        list(open_source(h5dir).volumes())


def test_nan_and_constant_images(tmp_path, rng):
    for name, value in (("nan", np.nan), ("const", 0.5)):
        d = tmp_path / name
        d.mkdir()
        for frame in (1, 9):
            with h5py.File(d / f"patient001_frame{frame:02d}.h5", "w") as f:
                f["image"] = np.full((2, 8, 8), value, np.float32)
                f["label"] = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(DataError, match="frame01.h5: image contains NaN"):
        list(open_source(tmp_path / "nan").volumes())
    with pytest.raises(DataError, match="frame01.h5: image is constant"):
        list(open_source(tmp_path / "const").volumes())


def test_info_cfg_errors(tmp_path):
    cfg = tmp_path / "Info.cfg"
    cfg.write_text("ED: one\nES: 12\n")
    with pytest.raises(DataError, match="integer 'ED:'"):
        parse_info_cfg(cfg)
    cfg.write_text("ED 1\n")
    with pytest.raises(DataError, match="Info.cfg:1: expected 'Key: value'"):
        parse_info_cfg(cfg)


def test_reading_never_modifies_the_source(tmp_path, rng):
    write_acdc_patient(tmp_path, rng)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    src = open_source(tmp_path)
    list(src.volumes()), list(src.cine())
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ real data
def test_real_acdc():
    src = open_source(real_dir("CMR_ACDC_DIR"))
    patients = src.patients()
    assert src.layout in ("acdc-h5", "acdc-nifti") and len(patients) >= 10
    vols = list(src.volumes(patients[:2]))
    assert [v.phase for v in vols] == ["ED", "ES", "ED", "ES"]
    for v in vols:
        assert v.image.ndim == 3 and 6 <= v.image.shape[0] <= 25 and v.label.shape == v.image.shape
        assert set(np.unique(v.label)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(v.label))
    ed_lv, es_lv = ((v.label == 3).sum() for v in vols[:2])
    assert ed_lv > es_lv  # the LV cavity is larger at end-diastole


def test_real_acdc_spacing():
    """Every labelled volume has a plausible cine-MRI spacing: square pixels of 0.6-2.0 mm, slices 4-11 mm apart
    (acdc-h5: from spacing.csv, checked against each array's shape; acdc-nifti: from the headers)."""
    src = open_source(real_dir("CMR_ACDC_DIR"))
    if src.layout == "acdc-h5" and not src.has_spacing:
        pytest.skip(f"{src.folder}: no spacing.csv beside it or one folder up")
    assert src.has_spacing
    n, patients = 0, src.patients()
    for v in src.volumes():
        n += 1
        z, y, x = v.spacing
        assert 0.6 <= x <= 2.0 and 0.6 <= y <= 2.0 and 4 <= z <= 11 and x == y, (v.path.name, v.spacing)
    assert n == 2 * len(patients) and (src.layout != "acdc-h5" or n == len(src.files()) - 1)


def test_real_la2018():
    src = open_source(real_dir("CMR_LA2018_DIR"))
    assert src.layout == "la2018-h5" and len(src.patients()) >= 5
    v = next(src.volumes(src.patients()[:1]))
    assert v.image.shape[0] == 88 and set(np.unique(v.label)) == {0, 1}


# ------------------------------------------------------------------------------------------ slice counts
def test_n_slices_every_layout_from_headers_only(tmp_path, rng, monkeypatch):
    """``n_slices`` = the sum of Z over the patient's labelled volumes, without reading any voxel."""
    nifti = tmp_path / "nifti"
    write_acdc_patient(nifti, rng, "patient001", shape=(5, 24, 20))
    write_acdc_patient(nifti, rng, "patient002", shape=(7, 24, 20))
    h5 = tmp_path / "h5"
    h5.mkdir()
    for pid, z in (("patient003", 3), ("patient004", 8)):
        for frame in (2, 9):
            with h5py.File(h5 / f"{pid}_frame{frame:02d}.h5", "w") as f:
                f["image"], f["label"] = volume(rng, (z, 16, 12)), labels(rng, (z, 16, 12))
    dec = tmp_path / "dec"
    for case, z in (("la_003", 6), ("la_004", 9)):
        write_nifti(dec / "imagesTr" / f"{case}.nii.gz", volume(rng, (z, 20, 18)), (1.37, 1.25, 1.25))
        write_nifti(dec / "labelsTr" / f"{case}.nii.gz", labels(rng, (z, 20, 18), top=1), (1.37, 1.25, 1.25), np.uint8)
    la = tmp_path / "la"
    for case, z in (("CASE01", 6), ("CASE02", 11)):
        (la / case).mkdir(parents=True)
        with h5py.File(la / case / "mri_norm2.h5", "w") as f:  # (X, Y, Z): Z last
            f["image"], f["label"] = volume(rng, (20, 18, z)), labels(rng, (20, 18, z), top=1)
    expected = {nifti: {"patient001": 10, "patient002": 14}, h5: {"patient003": 6, "patient004": 16},
                dec: {"la_003": 6, "la_004": 9}, la: {"CASE01": 6, "CASE02": 11}}
    sources = {folder: open_source(folder) for folder in expected}
    assert [s.layout for s in sources.values()] == ["acdc-nifti", "acdc-h5", "decathlon", "la2018-h5"]
    for folder, src in sources.items():  # the same as the volumes' Z, read in full
        assert {p: sum(v.image.shape[0] for v in src.volumes([p])) for p in src.patients()} == expected[folder]

    def no_voxels(*args, **kwargs):
        raise AssertionError("n_slices read voxel data")

    # every readers module that reads voxels binds the readers itself (``from .base import _read_nifti``)
    patched = []
    for module in (readers_base, readers_acdc, readers_decathlon, readers_la2018):
        for name in ("_read_nifti", "_read_h5"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_voxels)
                patched.append(f"{module.__name__.rpartition('.')[2]}.{name}")
    assert {"acdc._read_nifti", "acdc._read_h5", "decathlon._read_nifti", "la2018._read_h5"} <= set(patched)
    for folder, src in sources.items():
        assert src.slice_counts() == expected[folder]
        first = src.patients()[0]
        assert src.n_slices(first) == expected[folder][first] and src.slice_counts([first]) == {first: expected[folder][first]}
        with pytest.raises(DataError, match="unknown patient"):
            src.n_slices("patient999")


def test_n_slices_errors_name_the_file(tmp_path, rng):
    write_acdc_patient(tmp_path / "nifti", rng)
    path = tmp_path / "nifti" / "patient001" / "patient001_frame03.nii.gz"
    path.write_bytes(b"not a NIfTI file")
    with pytest.raises(DataError, match="patient001_frame03.nii.gz: cannot read NIfTI header"):
        open_source(tmp_path / "nifti").n_slices("patient001")
    h5 = tmp_path / "h5"
    h5.mkdir()
    with h5py.File(h5 / "patient001_frame01.h5", "w") as f:
        f["image"] = volume(rng, (3, 8, 8))[0]  # 2D
    with pytest.raises(DataError, match="patient001 has frames \\[1\\]; expected two"):
        open_source(h5).n_slices("patient001")
    with h5py.File(h5 / "patient001_frame08.h5", "w") as f:
        f["label"] = labels(rng, (3, 8, 8))
    with pytest.raises(DataError, match=r"frame01.h5: expected a 3D volume, got shape \(8, 8\)"):
        open_source(h5).n_slices("patient001")
    (h5 / "patient001_frame01.h5").unlink()
    with h5py.File(h5 / "patient001_frame01.h5", "w") as f:
        f["image"] = volume(rng, (3, 8, 8))
    with pytest.raises(DataError, match=r"frame08.h5: missing dataset\(s\) \['image'\]"):
        open_source(h5).n_slices("patient001")


def test_real_acdc_slice_counts():
    src = open_source(real_dir("CMR_ACDC_DIR"))
    patients = src.patients()[:3]
    assert src.slice_counts(patients) == {p: sum(v.image.shape[0] for v in src.volumes([p])) for p in patients}
