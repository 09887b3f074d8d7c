"""Stage 04's scoring of one run's predictions (model grid and original grid), and stage 05's explanation
numbers, on known cases."""
import numpy as np
import pandas as pd
import pytest

from cmr_utils.evaluate import (ef_agreement_table, evaluate_run, labelled_source, native_predictions,
                                score_predictions, score_run, score_volume)
from cmr_utils.geometry import one_hot
from cmr_utils.inference import predict_probabilities
from cmr_utils.prepare import Prepared, prepare_dataset
from cmr_utils.readers import DataError, open_source


def two_volumes():
    """Patient p1, ED (2 slices) and ES (2 slices), spacing known: an LV disc, a MYO ring, an RV block."""
    yy, xx = np.mgrid[:32, :32]
    d = np.hypot(yy - 16, xx - 16)
    ed = np.select([d < 6, d < 8, (xx < 6) & (abs(yy - 16) < 8)], [3, 2, 1], 0).astype(np.uint8)
    es = np.select([d < 4, d < 7, (xx < 5) & (abs(yy - 16) < 6)], [3, 2, 1], 0).astype(np.uint8)
    truth = np.stack([ed, ed, es, es])
    slices = pd.DataFrame({"patient": ["p1"] * 4, "phase": ["ED", "ED", "ES", "ES"], "slice": [0, 1, 0, 1],
                           "spacing_z": 8.0, "spacing_y": 1.5, "spacing_x": 1.5})
    return truth, slices


def test_perfect_prediction_scores_one_and_agrees_on_ef():
    truth, slices = two_volumes()
    scored = score_predictions(truth.copy(), truth, slices)
    assert scored["iou_model_grid"] == 1.0
    assert (scored["per_slice"]["iou"] == 1.0).all() and (scored["per_slice"]["dice"] == 1.0).all()
    pv = scored["per_volume"]
    assert len(pv) == 6 and (pv["dice"] == 1.0).all() and (pv["hd95"] == 0.0).all() and set(pv["hd95_unit"]) == {"mm"}
    ef = scored["ef"].set_index("structure")
    lv_ed, lv_es = (truth[:2] == 3).sum(), (truth[2:] == 3).sum()
    assert ef.loc["LV", "ef_true"] == pytest.approx(100 * (lv_ed - lv_es) / lv_ed)
    assert ef.loc["LV", "ef_pred"] == ef.loc["LV", "ef_true"] and set(ef.index) == {"LV", "RV"}


def test_empty_prediction_scores_zero_and_leaves_ef_undefined():
    truth, slices = two_volumes()
    scored = score_predictions(np.zeros_like(truth), truth, slices)
    assert scored["iou_model_grid"] == 0.0 and (scored["per_volume"]["dice"] == 0.0).all()
    assert scored["per_volume"]["hd95"].isna().all()
    assert scored["ef"]["ef_pred"].isna().all() and scored["ef"]["ef_true"].notna().all()
    table = ef_agreement_table(scored["ef"].assign(init="random"))
    assert list(table["n"]) == [0, 0] and list(table["undefined"]) == [1, 1]


def test_unknown_spacing_gives_pixels():
    truth, slices = two_volumes()
    slices[["spacing_z", "spacing_y", "spacing_x"]] = np.nan
    shifted = np.roll(truth, 2, axis=2)
    pv = score_predictions(shifted, truth, slices)["per_volume"]
    assert set(pv["hd95_unit"]) == {"px"} and pv.loc[pv["structure"] == "LV", "hd95"].max() == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- original grid
@pytest.fixture(scope="module")
def prepared(phantom_sources, tmp_path_factory):
    """The phantom prepared as the CPU profiles do: 64 px, padded, the central 0.8 of the square."""
    out = tmp_path_factory.mktemp("prep-eval") / "prepared"
    prepare_dataset([open_source(p) for p in phantom_sources], out, image_size=64, resize="pad",
                    split_fractions=(0.5, 0.25, 0.25), split_seed=0, field_of_view=0.8)
    return Prepared.open(out)


@pytest.fixture(scope="module")
def source(prepared):
    return labelled_source(prepared)


def ideal(vol, geometry):
    """A perfect model at the model grid's resolution: each class's share of every canvas pixel."""
    return geometry.label_probabilities(vol.label, on_canvas=True)


def hard_labels(vol, geometry):
    """The hard (nearest-neighbour) model-grid labels, one-hot: perfect on the model grid."""
    return one_hot(geometry.to_model(vol.image / vol.image.max(), vol.label)[1])


def test_native_grid_has_the_source_shape(prepared, source):
    labels = prepared.labels("test")
    seen = 0
    for vol, rows, model_grid, native in native_predictions(prepared, source, hard_labels):
        assert native.shape == vol.label.shape and native.dtype == np.uint8 and vol.spacing is not None
        assert np.array_equal(model_grid, labels[rows])
        seen += len(rows)
    assert seen == len(labels)


def test_perfect_model_scores_on_the_original_grid(prepared, source):
    """The ideal probabilities give native Dice >= 0.97 for every structure and volume, HD95 in mm, EF right;
    the hard one-hot of the prepared labels (perfect on the model grid) loses about a model pixel at each
    edge when mapped back to the finer original grid."""
    scored = score_run(prepared, source, ideal)
    pv = scored["per_volume"]
    assert list(pv.columns) == ["patient", "phase", "structure", "dice", "iou", "hd95", "hd95_unit"]
    assert len(pv) == 3 * 2 * prepared.slices("test")["patient"].nunique()
    assert (pv["dice"] >= 0.97).all(), pv.groupby("structure")["dice"].min()
    assert set(pv["hd95_unit"]) == {"mm"} and (pv["hd95"] < 2.4).all()  # at most about a pixel (1.3-2.3 mm)
    ef = scored["ef"]
    assert list(ef.columns) == ["patient", "structure", "ef_true", "ef_pred"] and set(ef["structure"]) == {"LV", "RV"}
    np.testing.assert_allclose(ef["ef_pred"], ef["ef_true"], atol=1.5)

    labels = prepared.labels("test")
    hard = score_run(prepared, source, hard_labels)
    assert hard["iou_model_grid"] == 1.0 and (hard["per_slice"]["iou"].dropna() == 1.0).all()
    assert list(hard["per_slice"].columns) == ["patient", "phase", "slice", "iou", "dice", "dice_RV", "dice_MYO",
                                               "dice_LV"]
    dice = hard["per_volume"].groupby("structure")["dice"]
    assert (dice.min() > 0.85).all() and (dice.mean() > 0.92).all(), dice.describe()


def test_shifted_prediction_scores_lower(prepared, source):
    good = score_run(prepared, source, ideal)["per_volume"]
    bad = score_run(prepared, source, lambda vol, g: np.roll(ideal(vol, g), 3, axis=-1))  # 3 model px to the right
    pv = bad["per_volume"]
    assert (pv["dice"].to_numpy() < good["dice"].to_numpy()).all() and bad["iou_model_grid"] < 0.9
    assert (pv["hd95"].to_numpy() > good["hd95"].to_numpy() + 3).all()  # 3 model px > 3 x 1.2 mm x 1.3


def test_evaluate_run_with_a_saved_model(prepared, tmp_path, one_thread):
    import torch

    from cmr_utils.models import build_segmentation_model

    torch.manual_seed(0)
    model = build_segmentation_model("random").eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    images = prepared.images("test")
    scored = evaluate_run(tmp_path, prepared)  # the source is the one named in the manifest
    assert len(scored["per_slice"]) == len(images) and 0 <= scored["iou_model_grid"] <= 1
    assert set(scored["per_volume"]["hd95_unit"]) == {"mm"} and scored["per_volume"]["dice"].between(0, 1).all()
    # stage 04 predicts each volume as make predict does: the same labels as predict_volume of the source volume
    from cmr_utils.geometry import geometry_for
    from cmr_utils.inference import predict_volume
    from cmr_utils.prepare import normalise_volume

    vol = next(labelled_source(prepared).volumes([scored["per_volume"]["patient"].iloc[0]]))
    geometry = geometry_for(prepared.manifest, *vol.image.shape[1:], vol.spacing)
    native = geometry.labels_to_native(predict_volume(model, normalise_volume(vol.image), geometry))
    again = score_volume(vol.patient, vol.phase, native, vol.label, vol.spacing)[0]
    first = scored["per_volume"].query("patient == @vol.patient and phase == @vol.phase")
    np.testing.assert_allclose(first["dice"], [r["dice"] for r in again], atol=1e-6)


@pytest.fixture(scope="module")
def prepared_physical(phantom_sources, tmp_path_factory):
    """The phantom prepared as the CPU profiles do: physical geometry, the spacing chosen from the training hearts."""
    out = tmp_path_factory.mktemp("prep-eval-mm") / "prepared"
    prepare_dataset([open_source(p) for p in phantom_sources], out, image_size=64, resize="pad",
                    split_fractions=(0.5, 0.25, 0.25), split_seed=0, field_of_view=0.8, geometry="physical")
    return Prepared.open(out)


def test_perfect_model_scores_in_physical_geometry(prepared_physical):
    """In physical geometry a perfect model at the target spacing (on the whole canvas) scores native Dice >= 0.95
    for every structure; its training window is the prepared labels' (hard labels on the model grid: IoU 1); a
    volume that lost its spacing since stage 01 is an error, never scored in another geometry."""
    prepared = prepared_physical
    assert prepared.manifest["geometry"] == "physical"
    source = labelled_source(prepared)
    scored = score_run(prepared, source, ideal)
    assert (scored["per_volume"]["dice"] >= 0.95).all(), scored["per_volume"].groupby("structure")["dice"].min()
    hard = score_run(prepared, source, lambda vol, g: one_hot(g.to_model(vol.image / vol.image.max(), vol.label)[1]))
    assert hard["iou_model_grid"] == 1.0
    volumes = source.volumes
    source.volumes = lambda patients=None: (v.__class__(**{**v.__dict__, "spacing": None}) for v in volumes(patients))
    with pytest.raises(DataError, match="prepared it in physical geometry .* but it has no voxel spacing now"):
        score_run(prepared, source, ideal)


def test_predict_probabilities_is_the_softmax_of_predict_and_checks_its_input(one_thread):
    import torch

    from cmr_utils.inference import predict

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 4, 3, padding=1).eval()
    images = np.random.default_rng(0).random((5, 12, 10), dtype=np.float32)
    probs = predict_probabilities(model, images, batch_size=2)  # batches of 2, 2 and 1
    labels, logits = predict(model, images, batch_size=3, return_logits=True)
    assert probs.shape == (5, 4, 12, 10) and probs.dtype == np.float32
    assert np.allclose(probs, torch.softmax(torch.from_numpy(logits), dim=1).numpy(), atol=1e-6)
    assert np.array_equal(probs.argmax(axis=1), labels)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            predict_probabilities(model, images, batch_size=bad)
    for shape in ((5, 1, 12, 10), (12, 10), (0, 12, 10)):
        with pytest.raises(ValueError, match=r"images must have shape \(N, H, W\) with N >= 1"):
            predict_probabilities(model, np.zeros(shape, np.float32))


def test_flip_averaged_probabilities_undo_each_flip(one_thread):
    """flips=True: the mean of the softmax of the image and its three flips, each flipped back (worked out by hand
    here); a model that commutes with flips (a symmetric kernel) gives the plain probabilities, an asymmetric one
    does not."""
    import torch

    images = np.random.default_rng(1).random((3, 8, 6), dtype=np.float32)
    torch.manual_seed(0)
    skewed = torch.nn.Conv2d(1, 4, 3, padding=1).eval()
    x = torch.from_numpy(images)[:, None]
    with torch.no_grad():
        expected = torch.softmax(skewed(x), dim=1) + sum(torch.flip(torch.softmax(skewed(torch.flip(x, d)), dim=1), d)
                                                         for d in ((3,), (2,), (2, 3)))
    averaged = predict_probabilities(skewed, images, batch_size=2, flips=True)
    assert averaged.shape == (3, 4, 8, 6) and np.allclose(averaged, expected.numpy() / 4, atol=1e-6)
    assert not np.allclose(averaged, predict_probabilities(skewed, images), atol=1e-3)
    symmetric = torch.nn.Conv2d(1, 4, 3, padding=1).eval()
    with torch.no_grad():  # each kernel equal to its own flips: the model commutes with every flip
        w = symmetric.weight
        w.copy_((w + w.flip(2) + w.flip(3) + w.flip(2, 3)) / 4)
    assert np.allclose(predict_probabilities(symmetric, images, flips=True), predict_probabilities(symmetric, images),
                       atol=1e-6)


def test_explanation_numbers_and_summary():
    import torch

    from cmr_utils.explain import explanation_numbers, summarise_numbers
    from cmr_utils.models import build_segmentation_model

    torch.manual_seed(0)
    model = build_segmentation_model("random").eval()
    truth, _ = two_volumes()
    images = (truth / 3.0).astype(np.float32)
    numbers = explanation_numbers(model, images[:2], truth[:2], layer="encoder.layer3", region="ground_truth", steps=3)
    assert len(numbers) == 2 * 3 and set(numbers["structure"]) == {"RV", "MYO", "LV"}
    for column in ("energy_inside", "energy_ring", "sanity_rho"):
        values = numbers[column].dropna()
        assert ((values >= -1) & (values <= 1)).all()
    assert set(numbers["pointing_hit"].dropna()) <= {0.0, 1.0}
    both = pd.concat([numbers.assign(seed=0), numbers.assign(seed=1)]).assign(init="random", layer="encoder.layer3")
    summary = summarise_numbers(both).set_index("metric")
    assert summary.loc["energy_inside", "mean"] == pytest.approx(numbers["energy_inside"].mean())
    assert summary.loc["energy_inside", "sd_seeds"] == 0.0 and summary.loc["energy_inside", "seeds"] == 2


def test_health_checks_flag_flat_losses_and_lost_structures():
    import pandas as pd

    from cmr_utils.evaluate import health_checks

    results = pd.DataFrame({"name": ["good", "flat"], "epochs": [5, 5], "train_loss_first": [1.2, 0.754],
                            "train_loss_last": [0.3, 0.753]})
    per_volume = pd.DataFrame({"run": ["good"] * 3 + ["flat"] * 3, "structure": ["RV", "MYO", "LV"] * 2,
                               "dice": [0.8, 0.7, 0.9, 0.4, 0.3, 0.0]})
    found = health_checks(results, per_volume)
    assert sorted(zip(found["run"], found["problem"])) == [("flat", "LV not segmented"),
                                                          ("flat", "flat training loss")]
    assert health_checks(results.iloc[:1], per_volume.iloc[:3]).empty


def test_bf16_prediction_is_the_autocast_softmax_and_follows_the_runs_precision(prepared, tmp_path, one_thread):
    """bf16=True: the softmax (float32) of the model run under bf16 autocast, not the fp32 one; stage 04 and
    ``make predict`` take it only for a run that trained in bf16, on a device that runs bf16 natively."""
    import json

    import torch

    from cmr_utils.models import build_segmentation_model
    from cmr_utils.training import cpu_has_fast_bf16, predicts_in_bf16

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 4, 3, padding=1).eval()
    images = np.random.default_rng(2).random((3, 16, 16), dtype=np.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.softmax(model(torch.from_numpy(images)[:, None]).float(), dim=1).numpy()
    bf16 = predict_probabilities(model, images, batch_size=2, bf16=True)
    fp32 = predict_probabilities(model, images, batch_size=2)
    assert bf16.dtype == np.float32 and np.allclose(bf16, expected, atol=1e-6)
    assert not np.allclose(bf16, fp32, atol=1e-4) and np.allclose(bf16, fp32, atol=0.05)

    assert not predicts_in_bf16("32-true") and not predicts_in_bf16(float("nan")) and not predicts_in_bf16(None)
    assert predicts_in_bf16("bf16-mixed") == cpu_has_fast_bf16()
    # a run recorded as bf16: evaluate_run predicts as predicts_in_bf16 says, and the scores follow
    seg = build_segmentation_model("random").eval()
    torch.save(seg.state_dict(), tmp_path / "model.pt")
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "precision": "bf16-mixed"}))
    scored = evaluate_run(tmp_path, prepared)
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "precision": "32-true"}))
    in_fp32 = evaluate_run(tmp_path, prepared)
    same = np.allclose(scored["per_volume"]["dice"], in_fp32["per_volume"]["dice"], atol=1e-9) and \
        scored["iou_model_grid"] == in_fp32["iou_model_grid"]
    assert same != cpu_has_fast_bf16()  # bf16 moves some pixel of an untrained model's argmax; fp32 twice is exact


def test_models_run_on_the_gpu_only_where_the_profile_allows_one(monkeypatch, tmp_path):
    """``inference_device`` (stages 04 and 05): the GPU when the profile's accelerator allows one and one is there,
    else the CPU. ``make predict --device auto`` asks the run's profile: a CPU profile stays on the CPU beside a GPU."""
    import torch

    from cmr_utils import predict_scans
    from cmr_utils.predict_command import main
    from cmr_utils.training import inference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [inference_device(a) for a in ("auto", "gpu", "cuda", "cpu")] == ["cpu"] * 4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [inference_device(a) for a in ("auto", "gpu", "cuda", "cpu", "mps")] == ["cuda"] * 3 + ["cpu"] * 2
    asked = {}
    monkeypatch.setattr(predict_scans, "predict_run", lambda *args, device, **kwargs: asked.update(device=device))
    for profile, expected in (("default", "cpu"), ("paper", "cuda")):  # accelerator: cpu / auto
        argv = ["--run", "random-all-s0", "--profile", profile, "--input", str(tmp_path), "--output", str(tmp_path)]
        assert main(argv) == 0 and asked["device"] == expected
        assert main([*argv, "--device", "cpu"]) == 0 and asked["device"] == "cpu"


def test_deletion_insertion_scores_the_model_in_bf16_when_asked():
    """Stage 05 predicts as stage 04 scores: ``bf16=True`` runs the deletion / insertion curves under bf16 autocast
    (the unperturbed score is the bf16 logits' sum over the region), ``bf16=False`` in fp32."""
    import torch

    from cmr_utils.explain import deletion_insertion

    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 4, 3, padding=1).eval()
    image = np.random.default_rng(3).random((16, 16), dtype=np.float32)
    region = np.zeros((16, 16), bool)
    region[4:12, 4:12] = True
    cam = np.random.default_rng(4).random((16, 16))
    x = torch.from_numpy(image)[None, None]
    with torch.no_grad():
        fp32 = float(model(x)[0, 2][torch.from_numpy(region)].double().sum())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = float(model(x).float()[0, 2][torch.from_numpy(region)].double().sum())
    assert abs(bf16 - fp32) > 1e-4  # the two precisions are told apart
    for flag, expected in ((False, fp32), (True, bf16)):
        curves = deletion_insertion(model, image, 2, cam, region, steps=4, bf16=flag)
        assert curves["score_unperturbed"] == pytest.approx(expected, abs=1e-4)
        assert np.isfinite(curves["deletion_auc"]) and np.isfinite(curves["insertion_auc"])
