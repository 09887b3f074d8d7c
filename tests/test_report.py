"""The report's recipe paragraph and budget line (cmr_utils.report.describe_recipe / describe_plan)."""
import copy
from pathlib import Path

import pandas as pd
import pytest

from cmr_utils.params import load_profile
from cmr_utils.plan import Plan
from cmr_utils.report import RECIPE_KEYS, describe_plan, describe_recipe


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
                  "the whole slice", "224 px", "precision bf16 mixed precision", "This is the study's protocol"):
        assert words in text, words
    for words in ("AdamW", "cross-entropy", "weight decay", "warm-up", "rotation", "not the study's", "Note"):
        assert words not in text, words


def test_reduced_profile_says_what_differs_from_the_study(paper):
    params = load_profile("acdc-cpu")
    text = describe_recipe(params, [result(params)], profile="acdc-cpu", study=paper)
    for words in ("Dice + cross-entropy loss", "AdamW (lr 1e-3, weight decay 1e-4)",
                  "one-epoch linear warm-up then cosine decay per step", "batch 8 (all labels) / 4 (budgets)",
                  "flips, rotations up to ±15°, scaling ±10 %, gamma 0.7–1.43",
                  "the slice padded to a square, central 80 % kept, resized to 96 px", "6 epochs with all labels / 20 with a label budget",
                  "precision fp32 (`trainer.precision: auto`: bf16 not native",
                  "not the study's protocol", "loss", "field of view", "image size"):
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
