"""The report's recipe paragraph and budget line (cmr_utils.report.describe_recipe / describe_plan), the reasons
it gives for empty tables, and its figures' alternative text (cmr_utils.plots)."""
import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmr_utils.params import load_profile
from cmr_utils.plan import Plan
from cmr_utils.params import RECIPE_KEYS
from cmr_utils.report import describe_plan, describe_recipe


def result(params, precision="32-true", **recipe):
    return {"status": "ok", "precision": precision,
            "recipe": {**{k: params["finetune"][k] for k in RECIPE_KEYS}, **recipe}}


@pytest.fixture(scope="module")
def paper():
    return load_profile("paper")


def test_paper_profile_is_the_studys_recipe(paper):
    text = describe_recipe(paper, [result(paper, "bf16-mixed")] * 3, profile="paper")
    for words in ("profile paper", "Dice loss", "Adam (lr 1e-4)", "constant learning rate", "40 epochs",
                  "batch 128 (all labels) / 32 (budgets)", "frozen below 1000", "augmentation: flips only",
                  "the whole slice", "224 px", "precision bf16 mixed precision", "This is the study's protocol",
                  "SimSiam (two augmented views of a slice predict each other (encoder only); encoder transferred): up "
                  "to 100 epochs, early-stopped on the validation loss (patience 5), views of 224 px, batch 256",
                  "test predictions: one pass per slice, no flips"):
        assert words in text, words
    for words in ("AdamW", "cross-entropy", "weight decay", "warm-up", "rotation", "not the study's", "Note",
                  "-trained"):
        assert words not in text, words


def test_reduced_profile_says_what_differs_from_the_study(paper):
    params = load_profile("acdc-cpu")
    text = describe_recipe(params, [result(params)], profile="acdc-cpu", study=paper)
    for words in ("Dice + cross-entropy loss", "AdamW (lr 2e-3, weight decay 1e-4)",
                  "one-epoch linear warm-up then cosine decay per step", "batch 8 (all labels) / 4 (budgets)",
                  "flips, rotations up to ±15°, scaling ±10 %, gamma 0.7–1.43, random 96 px crops at the slices' pixel "
                  "size in every epoch but the last 7 of runs that train the encoder",
                  "each slice resampled to one spacing in mm chosen from the training hearts, a 128 px window",
                  "14 epochs with all labels / 20 with a label budget",
                  "(validated, and the model selected, every 2 / 4 epochs)",
                  "precision fp32 (`trainer.precision: auto`: bf16 not native",
                  "test predictions: the mean probabilities over each slice and its three flips",
                  "SimSiam (two augmented views of a slice predict each other (encoder only); encoder transferred): up "
                  "to 20 epochs, early-stopped on the validation loss (patience 2)", "test-time flips",
                  "not the study's protocol", "loss", "field of view", "image size", "freezing",
                  "frozen below 1000 labelled slices (each such budget is also run with the encoder trained, on the "
                  "same slices: the `<budget>-trained` runs"):
        assert words in text, words


def test_the_runs_recorded_recipe_and_the_prepared_geometry_win(paper):
    params = load_profile("acdc-cpu")
    recorded = result(params, loss="dice", augment={"flips": True, "rotation_deg": 0, "scale": 0, "gamma": 0})
    unavailable = {"status": "unavailable", "reason": "no weights"}
    manifest = {"image_size": 96, "resize": "crop", "field_of_view": 1.0}
    text = describe_recipe(params, pd.DataFrame([recorded, recorded, unavailable]), data=manifest, study=paper)
    assert "Dice loss" in text and "flips only" in text and "96 px" in text
    assert "the slice's central square (cropped to its shorter side), resized to 96 px" in text
    assert "differs from the profile's now: stage 03 is out of date" in text
    physical = {"image_size": 128, "resize": "pad", "field_of_view": 0.75, "geometry": "physical",
                "target_spacing": 2.31, "window_mm": 295.7}
    text = describe_recipe(params, [result(params)], data=physical, study=paper)
    assert ("each slice resampled to 2.31 mm per pixel, a 128 px window of 296 mm (the heart located first in wider "
            "fields at inference)") in text
    assert "geometry" in text.split("it differs in")[1].split(".")[0]  # the study resized whole slices


def test_disagreeing_runs_and_mixed_precision_are_reported(paper):
    params = load_profile("acdc-cpu")
    other = copy.deepcopy(result(params, "bf16-mixed"))
    other["recipe"]["schedule"] = "poly"
    text = describe_recipe(params, [result(params), other], study=paper)
    assert "2 different recipes" in text and "cosine decay" in text  # the profile's recipe, with a note
    assert "fp32 (1 runs)" in text and "bf16 mixed precision (1 runs)" in text


def test_a_recipe_read_back_from_runs_csv_is_understood(paper, tmp_path):
    params = load_profile("acdc-cpu")
    pd.DataFrame([result(params)]).to_csv(tmp_path / "runs.csv", index=False)
    text = describe_recipe(params, pd.read_csv(tmp_path / "runs.csv"), study=paper)
    assert "Note" not in text and "gamma 0.7–1.43" in text


def test_no_results_describe_the_profile(paper):
    params = load_profile("acdc-cpu")
    params["finetune"]["schedule"], params["finetune"]["warmup_epochs"] = "poly", 0
    text = describe_recipe(params, None, study=paper)
    assert "polynomial decay (power 0.9) per step (no warm-up)" in text
    assert "precision not recorded by the runs" in text


def test_describe_plan_lists_dropped_budgets():
    plan = Plan("paper", "/data/ACDC", Path("/data/ACDC"), 1020, ["all", 700, 500, 150], [1200], [], [])
    assert "dropped by the plan: 1200" in describe_plan(plan) and "1020 slices" in describe_plan(plan)
    kept = Plan("tiny", "", Path("phantom"), 40, ["all", 8], [], [], [])
    assert "none dropped" in describe_plan(kept)


# ------------------------------------------------------------------------------------------------------------
# tables that are empty for a reason, and figures with alternative text

def runs_table(*rows):
    return pd.DataFrame([dict(zip(("init", "budget", "status", "reason"), r)) for r in rows])


def test_an_empty_table_of_trained_runs_says_which_runs_were_not_trained():
    from cmr_utils.report import comparison_gap, trained_runs_gap

    runs = runs_table(("imagenet", "all", "unavailable", "no weights file in the hub cache"),
                      ("imagenet", "8", "unavailable", "no weights file in the hub cache"))
    assert trained_runs_gap(runs, "all") == ("no fine-tuning run with all labels was trained "
                                             "(imagenet: no weights file in the hub cache)")
    assert trained_runs_gap(runs, "150") == "the plan has no fine-tuning run with budget 150"
    assert "re-run `make evaluate`" in trained_runs_gap(runs_table(("random", "all", "ok", None)), "all")
    assert comparison_gap(runs) == "a paired comparison needs two initialisations with trained runs; none has any"
    one = runs_table(("random", "all", "ok", None), ("imagenet", "all", "unavailable", "no weights"))
    assert "only random has any" in comparison_gap(one)


def test_an_empty_ejection_fraction_table_says_why():
    from cmr_utils.report import ef_gap

    assert "no test patient has both phases labelled" in ef_gap(pd.DataFrame(columns=["ef_true", "ef_pred"]))
    assert "undefined" in ef_gap(pd.DataFrame({"ef_true": [float("nan")], "ef_pred": [0.5]}))


def numbers_for(init, seed=0, n_slices=2, value=float("nan"), region=0, truth=10):
    from cmr_utils.explain import XAI_METRICS

    return pd.DataFrame([{"slice": k, "structure": s, "init": init, "seed": seed, "layer": "encoder.layer4",
                          **{m: value for m in XAI_METRICS}, "region_pixels": region, "truth_pixels": truth}
                         for k in range(n_slices) for s in ("RV", "MYO", "LV")])


def test_explanation_gaps_name_each_initialisation_without_numbers():
    from cmr_utils.report import explanation_gaps, explanation_note

    numbers = pd.concat([numbers_for("random"),  # predicted nothing
                         numbers_for("simsiam", value=0.4, region=7),  # has numbers
                         numbers_for("swav", region=5, truth=0),  # no structure in the ground truth
                         numbers_for("swav", seed=1, region=5, truth=0)])
    gaps = explanation_gaps(numbers, ["random", "imagenet", "simsiam", "swav"])
    assert set(gaps) == {"random", "imagenet", "swav"}
    assert gaps["random"].startswith("its model predicted no RV, MYO or LV on the 2 explained test slices")
    assert gaps["imagenet"] == "not explained: it has no trained run with all labels"
    assert "none of the 2 explained test slices contains RV, MYO or LV" in gaps["swav"]
    assert explanation_note(numbers, ["random", "imagenet", "simsiam", "swav"]).startswith("**Not in the table**")
    assert explanation_note(numbers[numbers["init"] == "simsiam"], ["simsiam"]) is None
    zero_cams = numbers_for("random", region=6)
    assert "CAMs of its model were zero" in explanation_gaps(zero_cams, ["random"], image_size=128)["random"]
    one_pixel = explanation_gaps(zero_cams, ["random"], image_size=32)["random"]  # layer4: stride 32
    assert one_pixel.startswith("encoder.layer4 downsamples 32-px slices to a 1 x 1 feature map")
    assert "zero" not in one_pixel  # the one-pixel map is the reason, not the gradient
    two = explanation_note(pd.concat([numbers_for("random"), numbers_for("swav")]), ["random", "swav"])
    assert two.startswith("**No explanation numbers**: **random, swav**: its model predicted no") and two.count(
        "predicted no") == 1  # one sentence for the initialisations that share a reason
    both = explanation_gaps(numbers_for("random"), ["random"], image_size=32)["random"]
    assert "1 x 1 feature map" in both and ", and its model predicted no RV, MYO or LV" in both
    note = explanation_note(numbers_for("random", seed=0).assign(seed=[0, 0, 0, 1, 1, 1]), ["random"])
    assert note.startswith("**No explanation numbers**: **random**: its 2 models (one per seed) predicted no")


def test_explained_regions_count_region_and_truth_pixels():
    from cmr_utils.report import explained_regions

    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 3
    region = np.zeros_like(truth)
    region[1, 0, :3] = 1
    counts = explained_regions(region, truth).set_index(["slice", "structure"])
    assert counts.loc[(0, "LV"), "truth_pixels"] == 4 and counts.loc[(0, "LV"), "region_pixels"] == 0
    assert counts.loc[(1, "RV"), "region_pixels"] == 3 and counts["region_pixels"].sum() == 3
    with pytest.raises(ValueError, match="two \\(N, H, W\\) label stacks"):
        explained_regions(region[0], truth[0])


def test_figures_keep_their_alternative_text_through_nbconvert(tmp_path):
    import matplotlib.pyplot as plt
    import nbformat
    from nbconvert import HTMLExporter

    from cmr_utils import plots

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    alt = "Line chart of test IoU rising from 0.1 to 0.3 over three label budgets, random init"
    path = plots.save_figure(fig, tmp_path / "curve.png", alt)
    assert plots.figure_alt(path) == alt and not plt.get_fignums()  # stored in the PNG; the figure is closed
    fig2, _ = plt.subplots()
    outputs = [nbformat.v4.new_output("display_data", data={"text/html": html})
               for html in (plots.figure_html(path), plots.figure_html(fig2, "Empty axes of a second <test> figure"))]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("", outputs=outputs)])
    body, _ = HTMLExporter(exclude_input=True).from_notebook_node(nb)
    assert f'alt="{alt}"' in body and 'alt="Empty axes of a second &lt;test&gt; figure"' in body
    assert "No description has been provided" not in body  # nbconvert's text for an image without alt
    with pytest.raises(ValueError, match="alternative text must say what the figure shows"):
        plots.figure_html(plt.subplots()[0], "figure")
    plain = tmp_path / "plain.png"
    plt.subplots()[0].savefig(plain)
    with pytest.raises(ValueError, match="plain.png: no alternative text stored"):
        plots.figure_html(plain)
    plt.close("all")


def test_budget_curve_draws_trained_encoder_runs_as_a_second_line():
    import matplotlib.pyplot as plt

    from cmr_utils import plots

    rows = [("random", "all", 1020, False, 0.8), ("random", "150", 150, True, 0.5),
            ("random", "150-trained", 150, False, 0.6), ("simsiam", "all", 1020, False, 0.7),
            ("simsiam", "150", 150, True, 0.55)]
    summary = pd.DataFrame([{"init": i, "budget": b, "n_labelled": n, "frozen_encoder": f, "mean": m,
                             "ci_low": m - 0.05, "ci_high": m + 0.05, "n_patients": 16} for i, b, n, f, m in rows])
    fig, alt = plots.budget_curve(summary)
    lines = {line.get_label(): (line.get_linestyle(), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert lines == {"random": ("-", [0.5, 0.8]), "random, encoder trained": ("--", [0.6, 0.8]),
                     "simsiam": ("-", [0.55, 0.7])}  # simsiam has no -trained run: one line
    assert alt.endswith("random 150 (150 slices) 0.50, 150-trained (150 slices) 0.60, all (1020 slices) 0.80; "
                        "simsiam 150 (150 slices) 0.55, all (1020 slices) 0.70.")
    plt.close(fig)


def test_each_pretraining_says_how_long_it_took_against_simsiam(tmp_path):
    import json

    import nbformat

    from cmr_utils.paths import Workspace
    from cmr_utils.report import describe_pretraining

    ws = Workspace(profile="lowlabel", tag="data", root=tmp_path)
    ws.executed.mkdir(parents=True)
    for method, seconds in (("simsiam", 98.0), ("glcl", 1238.0), ("mim", None)):
        ws.pretrain_dir(method).mkdir(parents=True)
        ws.encoder_path(method).with_suffix(".json").write_text(json.dumps({
            "collapsed": False, "epochs_run": 8, "best_epoch": 5, "best_val_loss": 0.5,
            "pool_slices": {"train": 1080, "val": 112, "train_by_source": {"ACDC": 1080}}}))
        pd.DataFrame({"epoch": [0], "embedding_std_ratio": [0.9]}).to_csv(ws.pretrain_dir(method) / "history.csv")
        if seconds is not None:  # masked image modelling: no executed notebook (stage 02 not run through Make)
            nb = nbformat.v4.new_notebook(metadata={"papermill": {"duration": seconds}})
            nbformat.write(nb, ws.executed / f"02_pretrain-{method}.ipynb")
    lines = describe_pretraining(ws, ["simsiam", "glcl", "mim"]).splitlines()
    assert lines[0].endswith("; pretraining took 1 min 38 s")
    assert lines[1].endswith("; pretraining took 20 min 38 s (12.6× SimSiam's)")
    assert "pretraining took" not in lines[2]
    assert describe_pretraining(ws, ["glcl"]).endswith("; pretraining took 20 min 38 s")  # no SimSiam: no ratio
