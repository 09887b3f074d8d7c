"""The nifti-pairs and M&Ms layouts, the search one level down for a DATA folder, and every bad input of a NIfTI
file, on files the tests write with nibabel (real headers, oblique affines)."""
import nibabel as nib
import numpy as np
import pytest

from cmr_utils.readers import DataError, open_source

SPACING_XYZ = (1.25, 1.5, 8.0)


def oblique_affine(spacing_xyz=SPACING_XYZ):
    """A rotated, shifted grid: an affine nobody would write by accident."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing_xyz)
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


def write_nifti(path, zyx, affine=None, dtype=None):
    """(Z, Y, X) or (T, Z, Y, X) -> NIfTI data (X, Y, Z[, T])."""
    data = np.asarray(zyx).T
    data = data.astype(dtype or (np.int16 if np.issubdtype(data.dtype, np.signedinteger) else data.dtype))
    img = nib.Nifti1Image(data, oblique_affine() if affine is None else affine)
    img.set_qform(img.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def heart(shape=(4, 24, 20), shift=0):
    """Labels 1 RV, 2 MYO, 3 LV (ACDC) as nested boxes, and a matching image."""
    label = np.zeros(shape, np.uint8)
    label[:, 6:18, 4 + shift:10 + shift] = 1
    label[:, 6:18, 10:18] = 2
    label[:, 9:15, 12:16] = 3
    image = (label * 100 + np.random.default_rng(shift).normal(50, 5, shape)).astype(np.float32)
    return image, label


def write_pairs(folder, label_values=None):
    """p01 ED and ES (labelled), p02 without labels. ``label_values``: file value of each ACDC label."""
    lut = np.arange(4) if label_values is None else np.array([0, *label_values])
    for phase, shift in (("ED", 0), ("ES", 2)):
        image, label = heart(shift=shift)
        write_nifti(folder / f"p01_{phase}.nii.gz", image)
        write_nifti(folder / f"p01_{phase}_gt.nii.gz", lut[label].astype(np.uint8))
    write_nifti(folder / "p02.nii.gz", heart()[0])
    return folder


def test_nifti_pairs_layout(tmp_path):
    write_pairs(tmp_path)
    src = open_source(tmp_path)
    assert src.layout == "nifti-pairs" and src.patients() == ["p01", "p02"] and src.has_spacing
    vols = list(src.volumes())
    assert [(v.patient, v.phase, v.label is not None) for v in vols] == [("p01", "ED", True), ("p01", "ES", True),
                                                                         ("p02", "3D", False)]
    image, label = heart(shift=2)
    np.testing.assert_array_equal(vols[1].label, label)
    np.testing.assert_allclose(vols[1].image, image, rtol=1e-6)
    assert vols[0].spacing == pytest.approx(SPACING_XYZ[::-1])
    assert [s.case for s in src.scans()] == ["p01_ED", "p01_ES", "p02"] and not any(s.cine for s in src.scans())


def test_nifti_pairs_label_map_parameter_and_file(tmp_path):
    write_pairs(tmp_path / "a", label_values=(3, 2, 1))  # RV stored as 3, LV as 1 (M&Ms' order)
    assert not np.array_equal(next(open_source(tmp_path / "a").volumes()).label, heart()[1])  # unmapped: swapped
    ed = next(open_source(tmp_path / "a", label_map="1:3,2:2,3:1").volumes())
    np.testing.assert_array_equal(ed.label, heart()[1])
    (tmp_path / "a" / "label_map.json").write_text('{"1": 3, "2": 2, "3": 1}')
    np.testing.assert_array_equal(next(open_source(tmp_path / "a").volumes()).label, heart()[1])
    write_pairs(tmp_path / "b", label_values=(10, 20, 30))
    with pytest.raises(DataError, match=r"p01_ED_gt.nii.gz: label values \[10, 20, 30\] outside the declared set"):
        list(open_source(tmp_path / "b").volumes())
    with pytest.raises(DataError, match="targets must be ACDC labels"):
        open_source(tmp_path / "b", label_map={10: 1, 20: 2, 30: 7})
    with pytest.raises(DataError, match="label_map applies to the nifti-pairs layout"):
        open_source(write_mnms(tmp_path / "m"), label_map="1:1")


def write_mnms(root, codes=("A0S9V9", "B1C2D3"), frames=5, ed=0, es=3, csv=True):
    """The M&Ms release: <code>/<code>_sa.nii.gz (4D), _sa_gt.nii.gz (ED, ES labelled 1 LV 2 MYO 3 RV), CSV."""
    to_mnms = np.array([0, 3, 2, 1], np.uint8)  # ACDC 1 RV, 3 LV -> M&Ms 3 RV, 1 LV
    folder = root / "Training" / "Labeled"
    for n, code in enumerate(codes):
        cine = np.stack([heart(shift=t % 3)[0] for t in range(frames)])
        gt = np.zeros(cine.shape, np.uint8)
        gt[ed], gt[es] = to_mnms[heart(shift=ed % 3)[1]], to_mnms[heart(shift=es % 3)[1]]
        write_nifti(folder / code / f"{code}_sa.nii.gz", cine)
        write_nifti(folder / code / f"{code}_sa_gt.nii.gz", gt)
    if csv:
        lines = ["External code,VendorName,Vendor,Centre,ED,ES"] + [
            f"{code},Vendor{'AB'[n % 2]},{'AB'[n % 2]},{n + 1},{ed},{es}" for n, code in enumerate(codes)]
        (root / "mnms_info.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_mnms_layout_remaps_labels_and_carries_vendor(tmp_path):
    src = open_source(write_mnms(tmp_path))
    assert src.layout == "mnms" and src.patients() == ["A0S9V9", "B1C2D3"]
    ed, es, *rest = src.volumes(["A0S9V9"])
    assert not rest and (ed.phase, ed.frame, es.phase, es.frame) == ("ED", 1, "ES", 4)
    np.testing.assert_array_equal(ed.label, heart(shift=0)[1])  # back in ACDC's 1 RV, 2 MYO, 3 LV
    np.testing.assert_array_equal(es.label, heart(shift=3 % 3)[1])
    assert ed.meta == {"vendor": "A", "vendor_name": "VendorA", "centre": "1"}
    (scan,) = src.scans(["B1C2D3"])
    assert scan.cine and scan.case == "B1C2D3_sa" and [v.phase for v in scan.frames] == ["ED", "F02", "F03", "ES",
                                                                                           "F05"]
    assert scan.frames[3].meta["vendor"] == "B" and scan.frames[1].label is None


def test_mnms_without_csv_and_with_a_bad_frame(tmp_path):
    src = open_source(write_mnms(tmp_path / "a", csv=False))
    assert [v.phase for v in src.volumes(["A0S9V9"])] == ["F01", "F04"]  # the labelled frames, phases unknown
    folder = write_mnms(tmp_path / "b", es=3)
    (tmp_path / "b" / "mnms_info.csv").write_text("External code,Vendor,Centre,ED,ES\nA0S9V9,A,1,0,9\n")
    with pytest.raises(DataError, match=r"mnms_info.csv: A0S9V9: ES 9 outside the 5 frames"):
        list(open_source(folder).volumes(["A0S9V9"]))


# ------------------------------------------------------------------------------------------ one level down
def test_data_folder_one_level_down(tmp_path, capsys):
    """The SSL4MIS download: data/ACDC/ACDC_training_volumes/ (plus files that are no layout)."""
    from cmr_utils.prepare import data_sources

    inner = write_pairs(tmp_path / "ACDC" / "ACDC_training_volumes")
    (tmp_path / "ACDC" / "train.list").write_text("p01\n")
    (tmp_path / "ACDC" / "notes").mkdir()
    src = open_source(tmp_path / "ACDC")
    assert src.folder == inner and src.layout == "nifti-pairs"
    assert "reading its subfolder ACDC_training_volumes/ (nifti-pairs)" in capsys.readouterr().err
    assert data_sources(str(tmp_path / "ACDC"), {})[0].folder == inner  # what the plan and stage 01 read
    write_pairs(tmp_path / "ACDC" / "other")
    with pytest.raises(DataError, match=r"several subfolders hold one: ACDC_training_volumes/ \(nifti-pairs\), "
                                        r"other/ \(nifti-pairs\)"):
        open_source(tmp_path / "ACDC")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_nifti_inputs_name_the_file(tmp_path):
    def fresh(name):
        folder = write_pairs(tmp_path / name)
        return folder, folder / "p01_ES.nii.gz", folder / "p01_ES_gt.nii.gz"

    folder, image, label = fresh("2d")
    write_nifti(image, heart()[0][0])
    with pytest.raises(DataError, match=r"p01_ES.nii.gz: expected a 3D volume \(X, Y, Z\) or a 4D cine"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("5d")
    write_nifti(image, np.zeros((1, 2, 4, 24, 20), np.float32))
    with pytest.raises(DataError, match=r"p01_ES.nii.gz: expected a 3D volume .* got shape \(20, 24, 4, 2, 1\)"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("shape")
    write_nifti(label, heart((4, 24, 18))[1])
    with pytest.raises(DataError, match=r"p01_ES_gt.nii.gz: label shape \(18, 24, 4\) does not match its image"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("affine")
    write_nifti(label, heart(shift=2)[1], affine=np.diag([*SPACING_XYZ, 1.0]))
    with pytest.raises(DataError, match="p01_ES_gt.nii.gz: label affine differs from its image p01_ES.nii.gz"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("values")
    write_nifti(label, heart(shift=2)[1] + 4 * (heart(shift=2)[1] == 3))
    with pytest.raises(DataError, match=r"p01_ES_gt.nii.gz: label values \[7\] outside the declared set"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("empty")
    image.write_bytes(b"")
    with pytest.raises(DataError, match=r"p01_ES.nii.gz: empty file \(0 bytes\)"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("garbage")
    image.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(DataError, match="p01_ES.nii.gz: cannot read NIfTI"):
        list(open_source(folder).volumes())
    folder, image, label = fresh("orphan")
    image.unlink()
    with pytest.raises(DataError, match=r"label file\(s\) \['p01_ES_gt.nii.gz'\] without their image"):
        list(open_source(folder).volumes())


def test_plan_checks_the_external_folders(tmp_path, capsys):
    """EXTERNAL= is passed through the plan like DATA=: each folder must hold a known layout before any stage runs."""
    from cmr_utils.plan import main, plan_runs

    pairs, mnms = write_pairs(tmp_path / "pairs"), write_mnms(tmp_path / "mnms")
    plan = plan_runs("tiny", "", f"{pairs},{mnms}")
    assert plan.external == {"pairs": "nifti-pairs", "Labeled": "mnms"}
    assert "plan: external validation on pairs (nifti-pairs), Labeled (mnms)" in plan.messages
    assert main(["--profile", "tiny", "--external", str(pairs), "--make"]) == 0
    assert "EXTERNAL_SETS := pairs" in capsys.readouterr().out
    assert main(["--profile", "tiny", "--external", str(tmp_path / "nope"), "--make"]) == 2
    assert f"EXTERNAL folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("no scans")
    with pytest.raises(DataError, match="junk: unrecognised data layout"):
        plan_runs("tiny", "", str(tmp_path / "junk"))
