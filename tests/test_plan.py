"""The plan drops, before any stage runs, the label budgets the training split cannot hold: its slice count from
file headers equals what stage 01 writes, on data the tests write and (where CMR_ACDC_DIR names it) real ACDC."""
import copy
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cmr_utils import plan as P
from cmr_utils.params import load_profile, validate
from cmr_utils.paths import PROJ_ROOT
from cmr_utils.prepare import Prepared, prepare_dataset, split_patients
from cmr_utils.readers import open_source
from conftest import real_dir

TINY_SPLIT = (0.5, 0.25, 0.25)  # params/tiny.yaml's data.split (seed 0), read back in `profile` below


def write_h5_patients(folder, depths, rng, size=16):
    """SSL4MIS-style ACDC HDF5: patient k gets ED and ES volumes of depths[k] slices each."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(depths, start=1):
        for frame in (1, 7):
            with h5py.File(folder / f"patient{k:03d}_frame{frame:02d}.h5", "w") as f:
                f["image"] = rng.random((z, size, size)).astype(np.float32)
                f["label"] = rng.integers(0, 4, (z, size, size)).astype(np.uint8)
    return folder


@pytest.fixture
def profile(monkeypatch):
    """The tiny profile with the budgets and batch size a test sets; the plan reads it as profile 'tiny'."""
    def use(budgets, batch_size_budget=4):
        params = load_profile("tiny")
        params["finetune"].update(budgets=budgets, batch_size_budget=batch_size_budget)
        split = params["data"]["split"]
        assert (split["train"], split["val"], split["test"], split["seed"]) == (*TINY_SPLIT, 0)
        monkeypatch.setattr(P, "load_profile", lambda name: copy.deepcopy(params))
        return params
    return use


# ------------------------------------------------------------------------------------------ the count
def test_count_from_headers_equals_prepared_train_split(phantom_sources, tmp_path):
    src = open_source(phantom_sources[0])  # the phantom in the official ACDC NIfTI layout (6 patients)
    n = P.train_counts(src, TINY_SPLIT, 0)[0]
    manifest = prepare_dataset([src], tmp_path / "prep", image_size=32, resize="pad",
                               split_fractions=TINY_SPLIT, split_seed=0)
    assert manifest["counts"]["train_slices"] == n == len(Prepared.open(tmp_path / "prep").slices("train"))
    assert n == P.train_counts(src, TINY_SPLIT, 0)[0]  # deterministic


def test_count_known_answer_h5(tmp_path, rng):
    depths = [2, 3, 4, 5, 6, 7, 8, 9]  # patient k: 2 * depths[k] slices
    folder = write_h5_patients(tmp_path / "h5", depths, rng)
    src = open_source(folder)
    train = split_patients(src.patients(), TINY_SPLIT, 0)["train"]
    expected = sum(2 * depths[int(p[-3:]) - 1] for p in train)
    assert P.train_counts(src, TINY_SPLIT, 0)[0] == expected
    manifest = prepare_dataset([src], tmp_path / "prep", image_size=32, resize="pad",
                               split_fractions=TINY_SPLIT, split_seed=0)
    assert manifest["counts"]["train_slices"] == expected


# ------------------------------------------------------------------------------------------ the rule
def test_kept_budgets_rule():
    assert P.kept_budgets(["all", 1200, 700, 500, 150], 1020) == (["all", 700, 500, 150], [1200])
    assert P.kept_budgets(["all", 8, 7], 8) == (["all", 7], [8])  # equal to the count: the same as 'all'
    assert P.kept_budgets([50, "all"], 10) == (["all"], [50])
    assert P.kept_budgets(["all", 50], None) == (["all", 50], [])


def test_budget_above_count_dropped_with_one_line(tmp_path, rng, profile, capsys):
    profile(["all", 40, 12, 8, 5])
    folder = write_h5_patients(tmp_path / "h5", [2, 2, 2, 2], rng)  # train: 2 patients x 2 volumes x 2 = 8
    plan = P.plan_runs("tiny", str(folder))
    assert (plan.n_train_slices, plan.budgets, plan.dropped) == (8, ["all", 5], [40, 12, 8])
    assert {r["budget"] for r in plan.runs} == {"all", "5", "5-trained"}  # tiny: budgets_below_freeze both
    assert P.main(["--profile", "tiny", "--data", str(folder), "--make"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"plan: budgets 40, 12, 8 dropped: the training split of {folder.resolve()} has 8 slices (<= 8: the budget would be "
        "'all' or more); budgets kept: all, 5"]
    runs = next(line for line in out.splitlines() if line.startswith("RUNS := ")).split()[2:]
    assert runs == [r["name"] for r in plan.runs] and "random-5-s0" in runs
    assert not any(f"-{b}-" in r for r in runs for b in (40, 12, 8))
    assert "N_TRAIN_SLICES := 8" in out and "BUDGETS := all 5" in out
    refusal = plan.refuse("random-8-s0")
    assert "'random-8-s0' is not in the plan" in refusal and "budgets 40, 12, 8 dropped" in refusal


def test_all_label_runs_take_their_own_seeds(profile):
    params = profile(["all", 60])
    params["finetune"].update(inits=["random"], seeds=[0, 1, 2], seeds_all=[3], budgets_below_freeze="frozen")
    assert [r["name"] for r in P.finetune_runs(params)] == ["random-all-s3", "random-60-s0", "random-60-s1",
                                                             "random-60-s2"]
    assert [r["name"] for r in P.finetune_runs(load_profile("default")) if r["init"] == "random"] == [
        "random-all-s0", "random-60-s0", "random-60-s1"]


def test_budgets_below_freeze_are_also_run_trained_on_the_same_slices(profile):
    params = profile(["all", 1500, 150])
    params["finetune"].update(freeze_below=1000, seeds=[0, 1], seeds_all=[0, 1])
    runs = P.finetune_runs(params)
    random = [(r["name"], r["budget"], r["slices"], r["encoder"]) for r in runs if r["init"] == "random"]
    assert random == [("random-all-s0", "all", "all", "rule"), ("random-all-s1", "all", "all", "rule"),
                      ("random-1500-s0", "1500", "1500", "rule"), ("random-1500-s1", "1500", "1500", "rule"),
                      ("random-150-s0", "150", "150", "rule"), ("random-150-s1", "150", "150", "rule"),
                      ("random-150-trained-s0", "150-trained", "150", "trained"),
                      ("random-150-trained-s1", "150-trained", "150", "trained")]
    params["finetune"]["budgets_below_freeze"] = "frozen"  # the study: no -trained run
    assert [r["budget"] for r in P.finetune_runs(params) if r["init"] == "random"] == [
        "all", "all", "1500", "1500", "150", "150"]
    assert load_profile("paper")["finetune"]["budgets_below_freeze"] == "frozen"
    bad = copy.deepcopy(params)
    bad["finetune"]["budgets_below_freeze"] = "trained"
    with pytest.raises(ValueError, match="finetune.budgets_below_freeze: expected one of"):
        validate(bad, "x.yaml")


def test_budgets_below_count_kept_silently(tmp_path, rng, profile, capsys):
    params = profile(["all", 11, 4])
    folder = write_h5_patients(tmp_path / "h5", [3, 3, 3, 3], rng)  # 12 training slices
    plan = P.plan_runs("tiny", str(folder))
    assert (plan.n_train_slices, plan.budgets, plan.dropped, plan.messages) == (12, ["all", 11, 4], [], [])
    assert plan.runs == P.finetune_runs(params, 12) == P.finetune_runs(params)
    assert P.main(["--profile", "tiny", "--data", str(folder)]) == 0
    assert capsys.readouterr().err == ""


def test_budget_below_batch_size_is_kept_with_a_note(tmp_path, rng, profile, capsys):
    profile(["all", 3], batch_size_budget=4)
    folder = write_h5_patients(tmp_path / "h5", [3, 3, 3, 3], rng)
    assert P.plan_runs("tiny", str(folder)).budgets == ["all", 3]
    assert P.main(["--profile", "tiny", "--data", str(folder)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "plan: note: budget 3 below finetune.batch_size_budget 4: such a run trains on one batch of all its "
        "slices per epoch"]


def test_no_budget_left_is_an_error(tmp_path, rng, profile, capsys):
    profile([40, 12])
    folder = write_h5_patients(tmp_path / "h5", [2, 2, 2, 2], rng)
    with pytest.raises(ValueError, match=r"no label budget left .*\(8 training slices\)"):
        P.plan_runs("tiny", str(folder))
    assert P.main(["--profile", "tiny", "--data", str(folder)]) == 2
    assert "error: profile 'tiny': no label budget left" in capsys.readouterr().err


def test_phantom_plan_of_the_tiny_profile():
    """Empty DATA: the built-in phantom (generated on first use) is counted like any folder."""
    plan = P.plan_runs("tiny", "")
    src = open_source(plan.folder)
    assert src.layout == "acdc-nifti" and plan.n_train_slices > 0
    split = load_profile("tiny")["data"]["split"]
    train = split_patients(src.patients(), (split["train"], split["val"], split["test"]), split["seed"],
                           {p: src.group(p) for p in src.patients()})["train"]
    assert plan.n_train_slices == sum(v.image.shape[0] for v in src.volumes(train))  # voxels read: known answer


# ------------------------------------------------------------------------------------------ real data
def test_real_acdc_paper_plan():
    folder = real_dir("CMR_ACDC_DIR")
    src = open_source(folder)
    split = load_profile("paper")["data"]["split"]
    train = split_patients(src.patients(), (split["train"], split["val"], split["test"]), split["seed"],
                           {p: src.group(p) for p in src.patients()})["train"]
    known = sum(v.image.shape[0] for v in src.volumes(train))  # every training volume read in full
    plan = P.plan_runs("paper", str(folder))
    assert plan.n_train_slices == known
    numeric = [b for b in load_profile("paper")["finetune"]["budgets"] if b != "all"]
    assert plan.dropped == [b for b in numeric if b >= known]
    if src.layout == "acdc-h5" and len(src.patients()) == 80:  # SSL4MIS's ACDC_training_volumes
        assert known == 1020 and plan.dropped == [1200] and plan.budgets == ["all", 700, 500, 150]

    done = subprocess.run([sys.executable, "-m", "cmr_utils.plan", "--profile", "paper", "--data", str(folder),
                           "--make"], cwd=PROJ_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runs = next(line for line in done.stdout.splitlines() if line.startswith("RUNS := ")).split()[2:]
    assert runs == [r["name"] for r in plan.runs] and "random-all-s0" in runs
    assert not any(f"-{b}-" in r for r in runs for b in plan.dropped)
    if plan.dropped == [1200]:
        assert "-1200-" not in done.stdout
        assert (f"plan: budget 1200 dropped: the training split of {plan.folder} has {known} slices (<= 1200: "
                f"the budget would be 'all' or more); budgets kept: all, 700, 500, 150") in done.stderr.splitlines()
