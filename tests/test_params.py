"""Parameter profiles and the paths contract."""
import copy
import os
import subprocess

import pytest

from cmr_utils import params as P
from cmr_utils.paths import PROJ_ROOT, data_tag, run_name, workspace
from cmr_utils.plan import finetune_runs, make_variables


@pytest.mark.parametrize("profile", P.known_profiles())
def test_shipped_profiles_are_valid(profile):
    P.load_profile(profile)


def test_paper_profile_holds_the_study_protocol():
    p = P.load_profile("paper")
    assert p["data"]["image_size"] == 224
    ft = p["finetune"]
    assert ft["epochs"] == 40 and ft["lr"] == 1e-4 and ft["freeze_below"] == 1000
    # the study's recipe exactly: Dice loss, Adam at a constant rate, flips only, the whole slice
    assert (ft["loss"], ft["optimizer"], ft["weight_decay"], ft["schedule"]) == ("dice", "adam", 0, "constant")
    assert ft["augment"] == AUG0
    assert p["data"]["field_of_view"] == 1.0 and p["data"]["resize"] == "pad"
    assert ft["budgets"] == ["all", 1200, 700, 500, 150] and ft["batch_size_all"] == 128
    assert ft["batch_size_budget"] == 32 and set(ft["inits"]) == {"random", "imagenet", "simsiam", "swav"}


# finetune.augment with everything off but the study's flips
AUG0 = {"flips": True, "rotation_deg": 0, "scale": 0, "gamma": 0, "crop": 0, "whole_epochs": 0, "contrast": 0,
        "brightness": 0, "noise": 0, "blur": 0}


def mutate(path, value):
    p = copy.deepcopy(P.load_profile("tiny"))
    node = p
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return p


@pytest.mark.parametrize("path,value,message", [
    (("finetune", "epochs"), "40", r"finetune.epochs: expected int, got str '40'"),
    (("finetune", "augment"), {**AUG0, "flips": 1}, r"finetune.augment.flips: expected bool, got int"),
    (("finetune", "augment"), {**AUG0, "gamma": 1.0}, r"augment.gamma"),
    (("finetune", "augment"), {**AUG0, "crop": 80, "whole_epochs": 1},
     r"finetune.augment.crop: expected 0 \(no crops\) or a multiple of 32 \(FPN strides\) below data.image_size"),
    (("finetune", "augment"), {**AUG0, "whole_epochs": 2},
     r"finetune.augment.whole_epochs: expected, with crops, the number of last epochs on whole slices"),
    (("finetune", "augment"), {**AUG0, "whole_epochs": 0.5}, r"finetune.augment.whole_epochs: expected int, got float"),
    (("finetune", "augment"), {k: v for k, v in AUG0.items() if k != "blur"},
     r"finetune.augment: missing key\(s\) \['blur'\]"),
    (("finetune", "augment"), {**AUG0, "contrast": 0.95},
     r"finetune.augment.contrast: expected a number in \[0, 0.9\], got 0.95"),
    (("finetune", "augment"), {**AUG0, "brightness": -0.1},
     r"finetune.augment.brightness: expected a number in \[0, 0.5\]"),
    (("finetune", "augment"), {**AUG0, "noise": 0.6}, r"finetune.augment.noise: expected a number in \[0, 0.5\]"),
    (("finetune", "augment"), {**AUG0, "blur": 3.5}, r"finetune.augment.blur: expected a number in \[0, 3\], got 3.5"),
    (("finetune", "augment"), {**AUG0, "blur": "1"}, r"finetune.augment.blur: expected int or float, got str"),
    (("finetune", "augment"), {**AUG0, "scale": 0.6},
     r"finetune.augment.scale: expected a number in \[0, 0.5\] .* or a pair \[low, high\] with "
     r"0 < low <= 1 <= high <= 2"),
    (("finetune", "augment"), {**AUG0, "scale": [1.1, 1.4]}, r"finetune.augment.scale: .*got \[1.1, 1.4\]"),
    (("finetune", "augment"), {**AUG0, "scale": [0.7, 2.5]}, r"finetune.augment.scale: .*got \[0.7, 2.5\]"),
    (("finetune", "augment"), {**AUG0, "scale": [0, 1.4]}, r"finetune.augment.scale: .*got \[0, 1.4\]"),
    (("finetune", "augment"), {**AUG0, "scale": [0.7]},
     r"finetune.augment.scale: expected a number or a list of two numbers, got \[0.7\]"),
    (("finetune", "augment"), {**AUG0, "scale": [0.7, "1.4"]},
     r"finetune.augment.scale\[1\]: expected int or float, got str"),
    (("finetune", "augment"), {**AUG0, "scale": True}, r"finetune.augment.scale: expected int or float, got bool"),
    (("finetune", "augment"), {**AUG0, "scale": [0.7, 1.4], "contrast": 0.3, "brightness": 0.1, "noise": 0.05,
                               "blur": 1}, None),  # the widest cross-centre recipe is valid
    (("finetune", "augment"), {**AUG0, "scale": [1, 1]}, None),
    (("finetune", "loss"), "focal", r"finetune.loss: expected one of \['dice', 'dice_ce'\]"),
    (("finetune", "schedule"), "step", r"finetune.schedule: expected one of"),
    (("trainer", "precision"), "bf16", r"trainer.precision: expected one of"),
    (("data", "field_of_view"), 1.5, r"data.field_of_view: expected a fraction"),
    (("finetune", "epochs"), True, r"finetune.epochs: expected int, got bool"),
    (("data", "resize"), "stretch", r"data.resize: expected one of \['crop', 'pad'\]"),
    (("data", "image_size"), 100, "multiple of 32"),
    (("finetune", "inits"), ["random", "moco"], "unknown initialisation 'moco'"),
    (("finetune", "budgets"), ["all", -5], "finetune.budgets"),
    (("pretrain", "methods"), ["byol"], "unknown method 'byol'"),
    (("pretrain", "methods"), ["random"], r"unknown method 'random'; expected some of \['simsiam', 'swav'"),
    (("data", "split"), {"train": 0.5, "val": 0.5, "test": 0.5, "seed": 0}, "sum to 1"),
    (("finetune", "val_every"), 0, r"finetune.val_every: expected a positive number that divides"),
    (("finetune", "epochs"), 3, None),  # tiny's val_every 1 divides anything: no error (checked below)
])
def test_wrong_parameters_are_named(path, value, message):
    if message is None:
        P.validate(mutate(path, value), "params/x.yaml")
        return
    with pytest.raises(P.ParameterError, match=message):
        P.validate(mutate(path, value), "params/x.yaml")


def test_crops_need_whole_epochs_and_a_size_the_fpn_takes():
    """acdc-cpu (128 px slices) crops 96 px windows; 64 is as valid, 128 is no crop at all, and with crops at least the
    last epoch, and not every epoch, sees whole slices."""
    params = copy.deepcopy(P.load_profile("acdc-cpu"))
    aug = params["finetune"]["augment"]
    assert (aug["crop"], aug["whole_epochs"]) == (96, 7)
    aug["crop"] = 64
    P.validate(params, "params/x.yaml")
    for crop, whole, message in ((128, 7, r"finetune.augment.crop: .* below data.image_size \(128\), got 128"),
                                 (64, 0, r"whole_epochs: .* at least 1 and below the shortest run's 14 epochs .* got 0 "
                                         r"with crop 64"),
                                 (64, 14, r"whole_epochs: .* got 14 with crop 64")):
        aug["crop"], aug["whole_epochs"] = crop, whole
        with pytest.raises(P.ParameterError, match=message):
            P.validate(params, "params/x.yaml")


def test_validation_intervals_must_divide_their_epoch_counts():
    """The last epoch of every run is validated: val_every divides finetune.epochs, val_every_budget
    finetune.epochs_budget."""
    p = mutate(("finetune", "val_every"), 2)
    p["finetune"]["epochs"], p["finetune"]["epochs_budget"], p["finetune"]["val_every_budget"] = 14, 20, 4
    assert P.validate(p, "params/x.yaml") is p
    p["finetune"]["epochs_budget"] = 18
    with pytest.raises(P.ParameterError, match=r"params/x.yaml: finetune.val_every_budget: .*epochs_budget \(18\).*got 4"):
        P.validate(p, "params/x.yaml")
    p["finetune"]["epochs_budget"], p["finetune"]["epochs"] = 20, 15
    with pytest.raises(P.ParameterError, match=r"params/x.yaml: finetune.val_every: .*finetune.epochs \(15\).*got 2"):
        P.validate(p, "params/x.yaml")


def test_missing_and_unknown_keys(tmp_path, monkeypatch):
    p = P.load_profile("tiny")
    del p["trainer"]["precision"]
    with pytest.raises(P.ParameterError, match=r"trainer: missing key\(s\) \['precision'\]"):
        P.validate(p)
    p = P.load_profile("tiny")
    p["finetune"]["epoch"] = 3
    with pytest.raises(P.ParameterError, match=r"unknown key\(s\) \['epoch'\]"):
        P.validate(p)
    monkeypatch.setattr(P, "PARAMS_DIR", tmp_path)
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(P.ParameterError, match="broken.yaml: not valid YAML"):
        P.load_profile("broken")
    with pytest.raises(P.ParameterError, match="profile 'nothere' does not exist .*nothere.yaml.*; the profiles "
                                              "that exist: broken$"):
        P.load_profile("nothere")


def test_an_unknown_profile_lists_the_profiles_that_exist():
    with pytest.raises(P.ParameterError) as err:
        P.load_profile("nope")
    message = str(err.value)
    assert message.startswith("profile 'nope' does not exist") and "nope.yaml" in message
    assert message.endswith("the profiles that exist: " + ", ".join(P.known_profiles()))
    assert {"tiny", "default", "paper"} <= set(P.known_profiles())
    with pytest.raises(P.ParameterError, match="does not exist"):
        P.load_profile("../params/tiny")  # a profile is a name in params/, never a path


def test_make_refuses_an_unknown_profile_before_anything_runs(tmp_path):
    """`make report PROFILE=nope` names the profile and lists the ones that exist, and no recipe runs."""
    done = subprocess.run(["make", "--no-print-directory", "-n", "report", "PROFILE=nope"], cwd=PROJ_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CMR_OUTPUT_ROOT": str(tmp_path)})
    assert done.returncode != 0
    assert "profile 'nope' does not exist (no params/nope.yaml)" in done.stderr
    assert "the profiles that exist: " + " ".join(P.known_profiles()) in done.stderr
    assert "No rule to make target" not in done.stderr and done.stdout == ""
    assert not list((PROJ_ROOT / ".make").glob("plan-nope-*")) and not list(tmp_path.iterdir())


def test_paths_keep_data_and_profiles_apart(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert data_tag("") == "phantom"
    tag_a, tag_b = data_tag(str(tmp_path / "a")), data_tag(str(tmp_path / "b"))
    assert tag_a.startswith("a-") and tag_a != tag_b and tag_a == data_tag(str(tmp_path / "a") + "/")
    assert data_tag(f"{tmp_path / 'a'},{tmp_path / 'b'}") not in (tag_a, tag_b)
    assert workspace("tiny", "").runs != workspace("default", "").runs
    assert workspace("tiny", str(tmp_path / "a")).reports != workspace("tiny", "").reports
    with pytest.raises(FileNotFoundError, match="DATA folder .*missing does not exist"):
        data_tag(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="profile: expected a profile name"):
        workspace("../etc", "")


def test_plan_names_every_run_deterministically():
    runs = finetune_runs(P.load_profile("tiny"))
    assert [r["name"] for r in runs][:3] == ["random-all-s0", "random-8-s0", "random-8-trained-s0"]
    assert run_name("swav", 150, 2) == "swav-150-s2"
    text = make_variables("tiny", "")
    assert "RUNS := random-all-s0 random-8-s0 random-8-trained-s0 random-p1-s0 imagenet-all-s0" in text
    assert "METHODS := simsiam swav mim glcl" in text


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_a_profile_extends_another(tmp_path, monkeypatch):
    """Mappings merged key by key through the chain, lists and values replaced; the schema checks the result."""
    import yaml

    base = P.load_profile("tiny")
    monkeypatch.setattr(P, "PARAMS_DIR", tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "child.yaml").write_text("extends: base\nfinetune: {lr: 0.5, budgets: [all, 3]}\n"
                                         "trainer: {precision: 32-true}\n")
    (tmp_path / "grandchild.yaml").write_text("extends: child\nfinetune:\n  budgets: [all]\n  augment: {gamma: 0.2}\n")
    params, chain = P.read_profile("grandchild")
    assert [p.name for p in chain] == ["grandchild.yaml", "child.yaml", "base.yaml"]
    assert params == P.load_profile("grandchild")
    ft = params["finetune"]
    assert (ft["lr"], ft["budgets"], ft["augment"]["gamma"]) == (0.5, ["all"], 0.2)
    assert ft["augment"]["flips"] == base["finetune"]["augment"]["flips"] and ft["epochs"] == base["finetune"]["epochs"]
    assert params["trainer"] == {**base["trainer"], "precision": "32-true"}
    changed = {k for k, v in flat(params).items() if flat(base)[k] != v}
    assert changed == {"finetune.lr", "finetune.budgets", "finetune.augment.gamma", "trainer.precision"}
    assert P.load_profile("child")["finetune"]["budgets"] == ["all", 3] and P.load_profile("base") == base

    (tmp_path / "typo.yaml").write_text("extends: base\nfinetune: {epoch: 3}\n")
    with pytest.raises(P.ParameterError, match=r"typo.yaml \(extends base\): finetune: unknown key\(s\) \['epoch'\]"):
        P.load_profile("typo")
    (tmp_path / "orphan.yaml").write_text("extends: nope\n")
    with pytest.raises(P.ParameterError, match=r"orphan.yaml: extends: profile 'nope' does not exist \(no file "
                                              r".*nope.yaml\); the profiles that exist: base, child"):
        P.load_profile("orphan")
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(P.ParameterError, match=r"b.yaml: extends: 'a' closes a cycle \(a -> b -> a\)"):
        P.load_profile("a")
    (tmp_path / "many.yaml").write_text("extends: [base, child]\n")
    with pytest.raises(P.ParameterError, match=r"many.yaml: extends: expected a profile name .*got \['base', 'child'\]"):
        P.load_profile("many")
    (tmp_path / "path.yaml").write_text("extends: ../base\n")
    with pytest.raises(P.ParameterError, match=r"path.yaml: extends: profile '../base' does not exist"):
        P.load_profile("path")


@pytest.mark.parametrize("overlay,may_differ", [
    # paper-check runs every stage of the study's protocol on a CPU: only sizes, epochs and seeds differ
    ("paper-check", {"data.image_size", "data.phantom.patients", "data.phantom.extra_cases", "data.phantom.frames",
                     "pretrain.image_size", "pretrain.max_epochs", "pretrain.patience", "finetune.seeds",
                     "finetune.seeds_all", "finetune.epochs", "finetune.epochs_budget", "trainer.accelerator",
                     "trainer.num_workers", "explain.max_slices"}),
    # paper-cluster is the study's protocol with another trainer
    ("paper-cluster", {"trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy"}),
])
def test_the_paper_overlays_resolve_to_paper_with_their_own_changes_only(overlay, may_differ):
    import yaml

    stated = yaml.safe_load(P.profile_path(overlay).read_text())
    assert stated.pop("extends") == "paper"
    paper, resolved = flat(P.load_profile("paper")), flat(P.load_profile(overlay))
    assert paper.keys() == resolved.keys()
    differ = {k for k in paper if paper[k] != resolved[k]}
    assert differ <= may_differ and differ <= set(flat(stated)), differ  # each difference stated in the overlay
    assert {k: resolved[k] for k in flat(stated)} == flat(stated)
