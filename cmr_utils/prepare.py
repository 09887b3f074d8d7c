"""Stage 01 logic: patient-level splits and the 2D slice sets used by pretraining and segmentation.

``prepare_dataset`` reads the sources through ``cmr_utils.readers``, splits the labelled source's patients
into train / validation / test (never a patient in two splits), and writes, atomically, one folder::

    split.csv                     patient, group, split (readable, stable across re-runs)
    {train,val,test}_images.npy   (N, S, S) float32 in [0, 1], intensities normalised per volume
    {train,val,test}_labels.npy   (N, S, S) uint8, 0 background 1 RV 2 MYO 3 LV
    {train,val,test}_slices.csv   one row per slice: patient, phase, frame, slice, spacing (mm), ...
    pool_images.npy               (M, S, S) float16: the unlabelled pretraining pool
    pool_slices.csv               one row per pool slice: source, patient, phase, slice, position (in [0, 1):
                                  base 0 to apex 1 where the affine tells, index order otherwise)
    manifest.json                 sources (folder, layout, content hash, geometry), geometry (``geometry``:
                                  physical or pixel; target_spacing, window_mm; image_size, resize,
                                  field_of_view), normalise_percentiles, parameters, counts

Geometry (``cmr_utils.geometry``): with ``geometry="physical"`` and a labelled source whose files carry voxel
spacing, every slice is resampled to one target spacing (``target_spacing="auto"``: the smallest that puts every
training slice's labels inside the centred ``image_size`` window, times ``WINDOW_MARGIN``) and cut to that
window; a source without spacing is prepared in pixel geometry (``resize``, ``field_of_view``), and the log and
the manifest say which geometry each source got.

The pool holds every cine frame of the labelled source where it has one (its labelled frames otherwise),
for the train and validation patients only, plus every volume of the extra sources; an extra source's slice that
repeats a test slice of the labelled source (the same data set passed again) stops the preparation with a
``DataError`` (``cmr_utils.overlap``). It is stored as
float16 to halve its size (a full ACDC cine pool at 224 px is several GB); batches are cast to float32.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .files import AtomicDir
from .geometry import GEOMETRIES, SliceGeometry, geometry_for, heart_half_extent_mm, runs_base_to_apex
from .overlap import ProtectedSlices
from .readers import CardiacVolume, DataError, Source
from .structures import N_CLASSES, STRUCTURES

SPLITS = ("train", "val", "test")
# the training window holds the widest training heart (measured from the slice's centre) with 10 % to spare
WINDOW_MARGIN = 1.1
# each volume's intensities between these percentiles are scaled to [0, 1] (robust to bright outliers)
NORMALISE_PERCENTILES = (1.0, 99.0)


# ---------------------------------------------------------------------------------------------- splits
def split_patients(patients: list[str], fractions: tuple[float, float, float], seed: int,
                   groups: dict[str, str | None] | None = None) -> dict[str, list[str]]:
    """Patient-level train/val/test split, deterministic in (patients, fractions, seed).

    With ``groups`` (ACDC's pathology group), patients are interleaved across groups before the cut, so
    that every split gets each group in about its overall proportion.
    """
    if len(set(patients)) != len(patients):
        raise ValueError("split_patients: patient ids are not unique")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split_patients: fractions must be three positive numbers summing to 1, got {fractions}")
    if len(patients) < 3:
        raise ValueError(f"split_patients: need at least 3 patients for train/val/test, got {len(patients)}")
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[str]] = {}
    for p in sorted(patients):
        by_group.setdefault(str((groups or {}).get(p)), []).append(p)
    keyed = []
    for members in by_group.values():
        order = rng.permutation(len(members))
        keyed += [((rank + 0.5) / len(members), rng.random(), members[i]) for rank, i in enumerate(order)]
    ordered = [p for *_, p in sorted(keyed)]
    n = len(ordered)
    n_test = max(1, round(n * fractions[2]))
    n_val = max(1, round(n * fractions[1]))
    if n - n_test - n_val < 1:
        raise ValueError(f"split_patients: {n} patients are too few for fractions {fractions}")
    return {"test": sorted(ordered[:n_test]), "val": sorted(ordered[n_test:n_test + n_val]),
            "train": sorted(ordered[n_test + n_val:])}


# ---------------------------------------------------------------------------------------------- slices
def normalise_volume(image: np.ndarray, low: float = NORMALISE_PERCENTILES[0],
                     high: float = NORMALISE_PERCENTILES[1]) -> np.ndarray:
    """Clip to the volume's [low, high] percentiles and scale to [0, 1] (robust to bright outliers)."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def resize_volume(image: np.ndarray, label: np.ndarray | None, size: int, mode: str = "pad",
                  field_of_view: float = 1.0):
    """Make each slice square (``pad`` with zeros around, or ``crop`` the centre), keep the central
    ``field_of_view`` fraction of the square, then resize to ``size`` (``cmr_utils.geometry.SliceGeometry``).

    The image is resized bilinearly with antialiasing, the label by nearest neighbour. Returns the resized
    image, label and the factor by which the in-plane pixel spacing grew (new mm / old mm).
    """
    geometry = SliceGeometry(image.shape[1], image.shape[2], mode, field_of_view, size)
    img, lab = geometry.to_model(image, label)
    return img, lab, geometry.spacing_factor


def _slice_rows(vol: CardiacVolume, geometry) -> list[dict]:
    z, h, w = vol.image.shape
    sz, sy, sx = vol.spacing if vol.spacing is not None else (np.nan, np.nan, np.nan)
    my, mx = geometry.model_spacing(None if vol.spacing is None else (sy, sx))
    return [dict(patient=vol.patient, phase=vol.phase, frame=vol.frame, slice=k, n_slices=z,
                 source=vol.source, group=vol.group, spacing_z=sz, spacing_y=my, spacing_x=mx,
                 orig_h=h, orig_w=w) for k in range(z)]


def auto_target_spacing(volumes, image_size: int, margin: float = WINDOW_MARGIN, where: str = "") -> float:
    """Target spacing (mm, 3 decimals) at which a centred ``image_size`` window holds every labelled pixel of
    ``volumes`` (with spacing) with ``margin``: margin * 2 * the largest half extent / image_size."""
    half = max((heart_half_extent_mm(v.label, v.spacing[1:]) for v in volumes
                if v.label is not None and v.spacing is not None), default=0.0)
    if half <= 0:
        raise DataError(f"{where or 'the training volumes'}: data.target_spacing: auto needs labelled training volumes "
                        "with voxel spacing; none has a labelled pixel (give data.target_spacing in mm)")
    return round(margin * 2 * half / image_size, 3)


def geometry_record(source: Source, *, geometry: str, image_size: int, resize: str, field_of_view: float,
                    target_spacing: float | None) -> dict:
    """What the manifest records of a source's geometry: physical where asked and the source has spacing."""
    if geometry == "physical" and source.has_spacing:
        return {"geometry": "physical", "target_spacing": target_spacing, "window_mm": round(target_spacing *
                image_size, 1), "image_size": image_size, "resize": resize, "field_of_view": field_of_view}
    return {"geometry": "pixel", "image_size": image_size, "resize": resize, "field_of_view": field_of_view}


def describe_geometry(record: dict) -> str:
    """One line for logs and reports: which geometry, at what scale."""
    if record.get("geometry") == "physical":
        return (f"physical geometry: resampled to {record['target_spacing']:g} mm, a {record['image_size']} px "
                f"window of {record['window_mm']:g} mm")
    return (f"pixel geometry (the scan's own field of view): {record['resize']} to a square, central "
            f"{float(record.get('field_of_view', 1.0)):g} of it, {record['image_size']} px")


def content_hash(files: list[Path], root: Path) -> str:
    """SHA-256 over the relative names and bytes of ``files`` (the manifest's record of the source data)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- writing
def prepare_dataset(sources: list[Source], out_dir: str | Path, *, image_size: int, resize: str,
                    split_fractions: tuple[float, float, float], split_seed: int,
                    field_of_view: float = 1.0, geometry: str = "pixel", target_spacing: float | str = "auto",
                    normalise_percentiles: tuple[float, float] = NORMALISE_PERCENTILES,
                    parameters: dict | None = None, log=print) -> dict:
    """Write the prepared slice sets of ``sources`` (the first one labelled) to ``out_dir``; return the manifest.

    Every slice is squared (``resize``: pad or crop), cut to the central ``field_of_view`` fraction of the
    square and resized to ``image_size`` (``cmr_utils.geometry.SliceGeometry``; stage 04 maps predictions back
    with the same rule, from the manifest's ``resize``, ``field_of_view``, ``image_size`` and the slices'
    ``orig_h``, ``orig_w``); ``geometry="physical"`` resamples sources with voxel spacing to one target spacing
    (module docstring); each volume is normalised between its ``normalise_percentiles`` (recorded in the manifest,
    so that a run predicts as it was prepared). ``log``: where the line saying each source's geometry goes."""
    if not sources:
        raise ValueError("prepare_dataset: no data source given")
    labelled, extras = sources[0], sources[1:]
    SliceGeometry(1, 1, resize, field_of_view, image_size)  # fails early on a bad mode or field of view
    if geometry not in GEOMETRIES:
        raise ValueError(f"data.geometry: expected one of {GEOMETRIES}, got {geometry!r}")
    low, high = (float(p) for p in normalise_percentiles)
    if not 0 <= low < high <= 100:
        raise ValueError(f"normalise_percentiles: expected (low, high) with 0 <= low < high <= 100, got "
                         f"{normalise_percentiles!r}")
    if target_spacing != "auto" and (isinstance(target_spacing, bool) or not isinstance(target_spacing, (int, float))
                                     or not 0 < target_spacing < math.inf):
        raise ValueError(f"data.target_spacing: expected 'auto' or a positive number of mm, got {target_spacing!r}")
    if labelled.labels != STRUCTURES:
        raise DataError(f"{labelled.folder}: the first (labelled) source must have ACDC's labels "
                        f"(1 RV, 2 MYO, 3 LV); layout {labelled.layout} has {labelled.labels}")
    staging = AtomicDir(out_dir)
    tmp = staging.path
    try:
        patients = labelled.patients()
        groups = {p: labelled.group(p) for p in patients}
        split = split_patients(patients, split_fractions, split_seed, groups)
        split_of = {p: s for s, members in split.items() for p in members}
        if geometry == "physical" and not labelled.has_spacing:  # the model's scale comes from the labelled source
            geometry = "pixel"
            message = (f"{labelled.folder}: data.geometry is physical, but the {labelled.layout} files carry no voxel "
                       "spacing: pixel geometry (each scan seen relative to its own field of view; "
                       "data.target_spacing unused)")
            warnings.warn(message, stacklevel=2)
        if geometry == "physical" and target_spacing == "auto":
            target_spacing = auto_target_spacing(labelled.volumes(split["train"]), image_size,
                                                 where=str(labelled.folder))
        records = {id(s): geometry_record(s, geometry=geometry, image_size=image_size, resize=resize,
                                          field_of_view=field_of_view,
                                          target_spacing=None if target_spacing == "auto" else float(target_spacing))
                   for s in sources}
        for s in sources:
            log(f"{s.layout:12s} {describe_geometry(records[id(s)])}  {s.folder}")
        pd.DataFrame({"patient": patients, "group": [groups[p] for p in patients],
                      "split": [split_of[p] for p in patients]}).to_csv(tmp / "split.csv", index=False)

        counts: dict[str, int] = {}
        for name in SPLITS:
            images, labels, rows = [], [], []
            for vol in labelled.volumes(split[name]):
                geo = geometry_for(records[id(labelled)], *vol.image.shape[1:], vol.spacing)
                img, lab = geo.to_model(normalise_volume(vol.image, low, high), vol.label)
                images.append(img)
                labels.append(lab)
                rows += _slice_rows(vol, geo)
            if name == "test":  # looked for in the extra sources: their slices go into pretraining
                test_slices = ProtectedSlices(np.concatenate(images), rows)
            np.save(tmp / f"{name}_images.npy", np.concatenate(images))
            np.save(tmp / f"{name}_labels.npy", np.concatenate(labels))
            pd.DataFrame(rows).to_csv(tmp / f"{name}_slices.csv", index_label="index")
            counts[f"{name}_slices"] = len(rows)
            counts[f"{name}_patients"] = len(split[name])

        pool, rows, reversed_stacks = [], [], {s.folder: 0 for s in sources}
        pretrain_patients = split["train"] + split["val"]
        for source, members in [(labelled, pretrain_patients)] + [(s, None) for s in extras]:
            for vol in source.cine(members):
                img, _ = geometry_for(records[id(source)], *vol.image.shape[1:], vol.spacing).to_model(
                    normalise_volume(vol.image, low, high))
                if members is None and (repeat := test_slices.find(img)) is not None:
                    k, test = repeat
                    raise DataError(
                        f"{vol.path}: slice {k} of {vol.patient} {vol.phase} ({source.layout}, an extra pretraining "
                        f"source) is slice {test['slice']} of test patient {test['patient']} {test['phase']} of the "
                        f"labelled source {labelled.folder}: pretraining must never see the test patients. Pass the "
                        "labelled data set once, first in DATA, and no copy of it as an extra source")
                pool.append(img.astype(np.float16))
                # position: the slice's place along its volume's short axis, base 0 to apex 1 (global contrastive
                # positives); a stack whose affine runs apex to base (Sunnybrook's DICOM) is counted from its end
                n = len(img)
                apex_first = runs_base_to_apex(vol.meta.get("affine")) is False
                reversed_stacks[source.folder] += apex_first
                rows += [dict(source=source.layout, folder=source.folder.name, patient=vol.patient, phase=vol.phase,
                              slice=k, position=((n - 1 - k if apex_first else k) + 0.5) / n) for k in range(n)]
        for folder, count in reversed_stacks.items():
            if count:
                log(f"{folder}: {count} stack(s) run from apex to base (their affines): slice positions counted from "
                    "the base")
        np.save(tmp / "pool_images.npy", np.concatenate(pool))
        pd.DataFrame(rows).to_csv(tmp / "pool_slices.csv", index_label="index")
        counts["pool_slices"] = len(rows)

        manifest = {
            "sources": [{"folder": str(s.folder), "layout": s.layout, "patients": len(s.patients()),
                         "content_sha256": content_hash(s.files(), s.folder),
                         "role": "labelled" if s is labelled else "pretraining only",
                         "geometry": records[id(s)]["geometry"]} for s in sources],
            **records[id(labelled)],
            "normalise_percentiles": [low, high],
            "split": {"fractions": list(split_fractions), "seed": split_seed},
            "counts": counts, "parameters": parameters or {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    return manifest


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Prepared:
    """Read access to a prepared folder; arrays are memory-mapped (an epoch does no per-file I/O)."""

    folder: Path

    @classmethod
    def open(cls, folder: str | Path) -> "Prepared":
        folder = Path(folder)
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(f"{folder}: no prepared data (manifest.json missing); run stage 01 first")
        return cls(folder)

    @property
    def manifest(self) -> dict:
        return json.loads((self.folder / "manifest.json").read_text())

    @property
    def manifest_hash(self) -> str:
        return hashlib.sha256((self.folder / "manifest.json").read_bytes()).hexdigest()

    def split_table(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "split.csv", dtype={"patient": str})

    def images(self, split: str) -> np.ndarray:
        return np.load(self.folder / f"{self._check(split)}_images.npy", mmap_mode="r")

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.folder / f"{self._check(split)}_labels.npy", mmap_mode="r")

    def slices(self, split: str) -> pd.DataFrame:
        return pd.read_csv(self.folder / f"{self._check(split)}_slices.csv", index_col="index",
                           dtype={"patient": str, "group": str})

    def pool_images(self) -> np.ndarray:
        return np.load(self.folder / "pool_images.npy", mmap_mode="r")

    def pool_slices(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "pool_slices.csv", index_col="index", dtype={"patient": str})

    @staticmethod
    def _check(split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return split


def split_pool(pool: pd.DataFrame, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level train/validation split of the pretraining pool -> (train indices, val indices)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"pretrain.val_fraction: expected a number in (0, 1), got {val_fraction}")
    keys = (pool["folder"].astype(str) + "/" + pool["patient"].astype(str)).to_numpy()
    unique = np.array(sorted(set(keys)))
    if len(unique) < 2:
        raise ValueError(f"the pretraining pool has {len(unique)} patient(s); need at least 2 for train/val")
    rng = np.random.default_rng(seed)
    n_val = min(len(unique) - 1, max(1, round(len(unique) * val_fraction)))
    val = set(rng.permutation(unique)[:n_val])
    is_val = np.array([k in val for k in keys])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def summary_table(prepared: Prepared) -> pd.DataFrame:
    """Patients, slices and class pixel fractions per split (the stage's table for people)."""
    rows = []
    for name in SPLITS:
        labels = prepared.labels(name)
        counts = np.bincount(np.asarray(labels).ravel(), minlength=N_CLASSES)[:N_CLASSES] / labels.size
        slices = prepared.slices(name)
        rows.append({"split": name, "patients": slices["patient"].nunique(), "slices": len(slices),
                     "background": counts[0], **{structure: counts[k] for k, structure in STRUCTURES.items()}})
    pool = prepared.pool_slices()
    rows.append({"split": "pretraining pool", "patients": (pool["folder"] + pool["patient"]).nunique(),
                 "slices": len(pool)})
    return pd.DataFrame(rows).set_index("split")


def data_sources(data: str | None, phantom: dict) -> list[Source]:
    """The sources of a ``DATA=`` value (labelled first); empty -> the built-in phantom, made on first use."""
    from .paths import parse_data, phantom_dir
    from .phantom import ensure_phantom
    from .readers import open_source

    folders = parse_data(data)
    if not folders:
        root = phantom_dir(phantom["patients"], phantom["extra_cases"], phantom["frames"], phantom["seed"])
        folders = list(ensure_phantom(root, n_patients=phantom["patients"], n_extra=phantom["extra_cases"],
                                      seed=phantom["seed"], n_frames=phantom["frames"]))
    return [open_source(f) for f in folders]
