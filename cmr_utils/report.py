"""The report's building blocks: figures and tables gathered from the stages, and the colophon that ties the
report to a state of the code, the packages, the parameters and the data."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .paths import Workspace
from .provenance import git_state, package_versions
from .params import RECIPE_KEYS, profile_path



def stage_durations(executed: Path) -> pd.DataFrame:
    """Wall time of every executed notebook, from the metadata Papermill records."""
    rows = []
    for nb in sorted(Path(executed).glob("*.ipynb")):
        if nb.name.endswith((".tmp.ipynb", ".src.ipynb", ".failed.ipynb")):
            continue
        meta = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
        rows.append({"notebook": nb.stem, "wall_s": meta.get("duration"), "finished": meta.get("end_time")})
    return pd.DataFrame(rows, columns=["notebook", "wall_s", "finished"])


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}) x {torch.cuda.device_count()}"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def colophon(ws: Workspace, manifest: dict) -> dict[str, pd.DataFrame | str]:
    """When, from which commit, with which packages, parameters, data and device this report was made."""
    import hashlib

    versions = [{"package": name, "version": version} for name, version in package_versions().items()
                if name != "python"]
    params_file = profile_path(ws.profile)
    sources = pd.DataFrame([{k: s[k] for k in ("folder", "layout", "role", "patients", "content_sha256")}
                            for s in manifest["sources"]])
    return {
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_state(),
        "python": platform.python_version(),
        "profile": f"{ws.profile} ({params_file.name}, sha256 "
                   f"{hashlib.sha256(params_file.read_bytes()).hexdigest()[:12]})",
        "device": device_description(),
        "packages": pd.DataFrame(versions),
        "sources": sources,
        "durations": stage_durations(ws.executed),
    }


# ------------------------------------------------------------------------------------------------------------
# the fine-tuning recipe in words

PRECISIONS = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16 mixed precision",
              "16-mixed": "fp16 mixed precision", "bf16-true": "bf16", "16-true": "fp16"}
# what the comparison with the study (params/paper.yaml) looks at, and what a difference is called
PROTOCOL = {("finetune", "loss"): "loss", ("finetune", "optimizer"): "optimiser",
            ("finetune", "weight_decay"): "weight decay", ("finetune", "lr"): "learning rate",
            ("finetune", "schedule"): "schedule", ("finetune", "warmup_epochs"): "warm-up",
            ("finetune", "pretrained_lr_scale"): "learning rate",
            ("finetune", "augment"): "augmentation", ("finetune", "epochs"): "epochs", ("finetune", "epochs_budget"): "epochs",
            ("finetune", "val_every"): "model selection", ("finetune", "val_every_budget"): "model selection",
            ("finetune", "batch_size_all"): "batch sizes", ("finetune", "batch_size_budget"): "batch sizes",
            ("finetune", "freeze_below"): "freezing", ("finetune", "budgets_below_freeze"): "freezing",
            ("finetune", "budgets"): "label budgets",
            ("finetune", "seeds"): "seeds", ("finetune", "inits"): "initialisations",
            ("data", "image_size"): "image size", ("data", "resize"): "squaring",
            ("data", "field_of_view"): "field of view", ("data", "geometry"): "geometry",
            ("data", "target_spacing"): "geometry", ("pretrain", "image_size"): "pretraining",
            ("pretrain", "max_epochs"): "pretraining", ("pretrain", "keep"): "pretraining",
            ("evaluate", "test_time_flips"): "test-time flips"}


def _number(x) -> str:
    """1e-3, 1e-4, 0.06, 40: the way a parameter file is read aloud."""
    x = float(x)
    if x != 0 and abs(x) < 0.01:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{x:g}"


def _epochs(n) -> str:
    words = {0.5: "half-epoch", 1: "one-epoch", 2: "two-epoch", 3: "three-epoch"}
    return words.get(float(n), f"{_number(n)}-epoch")


def _schedule(schedule: str, warmup_epochs) -> str:
    warmup = f"{_epochs(warmup_epochs)} linear warm-up then " if warmup_epochs and warmup_epochs > 0 else ""
    if schedule == "constant":
        return f"{warmup}constant learning rate"
    decay = {"warmup_cosine": "cosine decay", "poly": "polynomial decay (power 0.9)"}.get(schedule, schedule)
    return f"{warmup}{decay} per step" + ("" if warmup else " (no warm-up)")


def _augment(augment: dict) -> str:
    parts = []
    if augment.get("flips"):
        parts.append("flips")
    if augment.get("rotation_deg", 0) > 0:
        parts.append(f"rotations up to ±{_number(augment['rotation_deg'])}°")
    scale = augment.get("scale", 0)
    if isinstance(scale, (list, tuple)):
        if tuple(scale) != (1, 1):
            parts.append(f"scaling {_number(scale[0])}–{_number(scale[1])}×")
    elif scale > 0:
        parts.append(f"scaling ±{_number(100 * scale)} %")
    if augment.get("gamma", 0) > 0:
        g = augment["gamma"]
        parts.append(f"gamma {1 - g:.2g}–{1 / (1 - g):.3g}")
    if augment.get("contrast", 0) > 0:
        parts.append(f"contrast ±{_number(100 * augment['contrast'])} %")
    if augment.get("brightness", 0) > 0:
        parts.append(f"brightness ±{_number(augment['brightness'])}")
    if augment.get("noise", 0) > 0:
        parts.append(f"Gaussian noise σ up to {_number(augment['noise'])}")
    if augment.get("blur", 0) > 0:
        parts.append(f"Gaussian blur σ up to {_number(augment['blur'])} px")
    if augment.get("crop", 0) > 0:
        parts.append(f"random {augment['crop']} px crops at the slices' pixel size in every epoch but the last "
                     f"{augment['whole_epochs']} of runs that train the encoder (whole slices in those, and for frozen "
                     "encoders)")
    if parts == ["flips"]:
        return "flips only"
    return ", ".join(parts) or "none"


def _input(data: dict) -> str:
    fov, size = float(data["field_of_view"]), int(data["image_size"])
    if data.get("geometry") == "physical":
        spacing = data.get("target_spacing")
        if not isinstance(spacing, (int, float)) or isinstance(spacing, bool):  # a profile's 'auto', no manifest
            return (f"each slice resampled to one spacing in mm chosen from the training hearts, a {size} px window "
                    "(the heart located first in wider fields at inference)")
        return (f"each slice resampled to {_number(float(spacing))} mm per pixel, a {size} px window of "
                f"{_number(round(float(spacing) * size))} mm (the heart located first in wider fields at inference)")
    if data["resize"] == "pad":
        kept = "the whole slice, padded to a square" if fov >= 1 else \
            f"the slice padded to a square, central {_number(100 * fov)} % kept"
    else:
        kept = "the slice's central square (cropped to its shorter side)" + \
            ("" if fov >= 1 else f", central {_number(100 * fov)} % of it kept")
    return f"{kept}, resized to {size} px"


def _records(results) -> list[dict]:
    import ast

    rows = results.to_dict("records") if isinstance(results, pd.DataFrame) else list(results or [])
    out = []
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        recipe = row.get("recipe")
        if isinstance(recipe, str):  # a recipe read back from runs.csv is the dict's repr
            recipe = ast.literal_eval(recipe)
        out.append({**row, "recipe": recipe if isinstance(recipe, dict) else None})
    return out


def _precision(configured: str, recorded: list) -> str:
    recorded = [p for p in recorded if isinstance(p, str)]
    if not recorded:
        return f"precision not recorded by the runs (`trainer.precision: {configured}`)"
    counts = pd.Series(recorded).value_counts()
    if len(counts) > 1:
        return "precision " + ", ".join(f"{PRECISIONS.get(p, p)} ({n} runs)" for p, n in counts.items())
    used = counts.index[0]
    words = f"precision {PRECISIONS.get(used, used)}"
    if configured == "auto":
        native = "bf16 native on the hardware that trained" if used.startswith("bf16") else \
            "bf16 not native on the hardware that trained"
        words += f" (`trainer.precision: auto`: {native})"
    return words


def _pretraining(params: dict, methods: list[str]) -> str:
    """One sentence per pretraining method on how it was made (its settings from ``params_settings``), or that none
    was fine-tuned."""
    from .params import pretrain_settings
    from .ssl import get_method

    if not methods:
        return "No self-supervised encoder was fine-tuned."
    parts = []
    for method in methods:
        training, _ = pretrain_settings(params, method)
        spec = get_method(method)
        epochs = f"{_number(training['max_epochs'])} epoch{'' if training['max_epochs'] == 1 else 's'}"
        if training["keep"] == "last":
            how = f"{epochs}, the last kept"
        else:
            how = f"up to {epochs}, early-stopped on the validation loss (patience {training['patience']})"
        pretrained = " and ".join(spec.transfers)
        parts.append(f"{spec.display} ({spec.summary}; {pretrained} transferred): {how}, views of "
                     f"{training['image_size']} px, batch {training['batch_size']}")
    held = params["pretrain"]["val_fraction"]
    return (f"**Pretraining**, on the slices of the training and validation patients of the labelled source and of the "
            f"extra sources, {held:.0%} of those patients held out for the pretraining validation loss: "
            + "; ".join(parts) + ".")


def protocol_differences(params: dict, study: dict) -> list[str]:
    """What ``params`` does differently from ``study`` (the parameters of params/paper.yaml), in words."""
    names = []
    for (section, key), name in PROTOCOL.items():
        if params[section][key] != study[section][key] and name not in names:
            names.append(name)
    return names


def describe_recipe(params: dict, results=None, *, profile: str | None = None, data: dict | None = None,
                    study: dict | None = None) -> str:
    """The fine-tuning recipe that made the numbers, in one paragraph of Markdown.

    ``params``: the profile's parameters; ``results``: the runs' ``result.json`` contents (a list of dicts or
    the DataFrame of ``cmr_utils.evaluate.read_results``), whose recorded ``recipe`` and ``precision`` are
    described (the profile's recipe when no run recorded one; a note when the runs disagree with each other or
    with the profile); ``data``: the prepared data's manifest (image size, squaring, field of view actually
    used; the profile's ``data`` section otherwise); ``study``: the study's parameters (``params/paper.yaml``,
    loaded when not given), to say whether this is the study's protocol and, if not, what differs.
    """
    from .params import load_profile

    ft = params["finetune"]
    runs = _records(results)
    recorded = [r["recipe"] for r in runs if r["recipe"] is not None]
    profile_recipe = {k: ft[k] for k in RECIPE_KEYS}
    notes = []
    if recorded and all(r == recorded[0] for r in recorded):
        recipe = {**profile_recipe, **recorded[0]}
        if recipe != profile_recipe:
            notes.append("the runs recorded a recipe that differs from the profile's now: stage 03 is out of date")
    else:
        recipe = profile_recipe
        if recorded:
            notes.append(f"the runs recorded {len({repr(r) for r in recorded})} different recipes: stage 03 is "
                         f"out of date for some runs; the profile's recipe is described")
    optimiser = {"adam": "Adam", "adamw": "AdamW"}.get(recipe["optimizer"], recipe["optimizer"])
    settings = f"lr {_number(ft['lr'])}"
    if recipe.get("pretrained_lr_scale", 1) != 1:
        settings += f", pretrained weights at {_number(recipe['pretrained_lr_scale'])}× it"
    if recipe["weight_decay"]:
        settings += f", weight decay {_number(recipe['weight_decay'])}"
    loss = {"dice": "Dice loss", "dice_ce": "Dice + cross-entropy loss"}.get(recipe["loss"], recipe["loss"])
    geometry = {**params["data"], **{k: data[k] for k in ("image_size", "resize", "field_of_view", "geometry",
                                                          "target_spacing") if data and k in data}}
    if data:  # what stage 01 did; a manifest from before physical geometry used pixel geometry
        geometry["geometry"] = data.get("geometry", "pixel")
    name = f" (profile {profile})" if profile else ""
    epochs = f"{_number(ft['epochs'])} epoch{'' if ft['epochs'] == 1 else 's'}"
    if ft["epochs_budget"] != ft["epochs"]:
        epochs += f" with all labels / {_number(ft['epochs_budget'])} with a label budget"
    every = (ft["val_every"], ft["val_every_budget"])
    if max(every) > 1:
        shown = _number(every[0]) if every[0] == every[1] else f"{_number(every[0])} / {_number(every[1])}"
        epochs += f" (validated, and the model selected, every {shown} epochs)"
    text = (f"**Fine-tuning recipe{name}**: {loss}, {optimiser} ({settings}), "
            f"{_schedule(recipe['schedule'], recipe['warmup_epochs'])}, {epochs}, "
            f"batch {ft['batch_size_all']} (all labels) / {ft['batch_size_budget']} (budgets), encoder frozen below "
            f"{ft['freeze_below']} labelled slices{_also_trained(ft)}; augmentation: {_augment(recipe['augment'])}; input: "
            f"{_input(geometry)}; {_precision(params['trainer']['precision'], [r.get('precision') for r in runs])}; "
            + ("test predictions: the mean probabilities over each slice and its three flips."
               if params["evaluate"]["test_time_flips"] else "test predictions: one pass per slice, no flips."))
    text += " " + _pretraining(params, [i for i in ft["inits"] if i in params["pretrain"]["methods"]])
    study = load_profile("paper") if study is None else study
    differences = protocol_differences({**params, "finetune": {**ft, **recipe}, "data": geometry}, study)
    if differences:
        text += f" This is not the study's protocol (see `params/paper.yaml`): it differs in {', '.join(differences)}."
    else:
        text += " This is the study's protocol (`params/paper.yaml`)."
    if notes:
        text += " Note: " + "; ".join(notes) + "."
    return text


def _also_trained(ft: dict) -> str:
    if ft["budgets_below_freeze"] != "frozen_and_trained":
        return ""
    return (" (each such budget is also run with the encoder trained, on the same slices: the `<budget>-trained` "
            "runs, not the study's protocol)")


def describe_plan(plan) -> str:
    """The label budgets of the sweep and those the plan dropped (``cmr_utils.plan.Plan``), in one line."""
    kept = ", ".join(map(str, plan.budgets))
    if not plan.dropped:
        return f"**Label budgets**: {kept} (none dropped: the training split has {plan.n_train_slices} slices)."
    dropped = ", ".join(map(str, plan.dropped))
    return (f"**Label budgets**: {kept}; dropped by the plan: {dropped} (the training split has "
            f"{plan.n_train_slices} slices, so {'these budgets' if len(plan.dropped) > 1 else 'this budget'} "
            f"would be all labels or more).")


# ------------------------------------------------------------------------------------------------------------
# tables that are empty for a reason say the reason

def trained_runs_gap(results: pd.DataFrame, budget: str | None = None) -> str:
    """Why a table of trained runs (with ``budget`` labels, or any budget) can have no row: no such run was
    trained. ``results``: ``cmr_utils.evaluate.read_results`` (status ``ok`` or ``unavailable`` with a reason)."""
    runs = results if budget is None else results[results["budget"].astype(str) == str(budget)]
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    which = {None: "", "all": " with all labels"}.get(budget, f" with budget {budget}")
    if not ok.empty:
        return (f"{len(ok)} run(s){which} were trained, yet stage 04 wrote no row for them: stage 04 is out of "
                f"date; re-run `make evaluate`")
    if runs.empty:
        return f"the plan has no fine-tuning run{which}"
    why = "; ".join(f"{r['init']}: {r.get('reason') if isinstance(r.get('reason'), str) else r['status']}"
                    for r in runs.drop_duplicates("init").to_dict("records"))
    return f"no fine-tuning run{which} was trained ({why})"


def comparison_gap(results: pd.DataFrame) -> str:
    """Why the paired comparisons can have no row: fewer than two initialisations have trained runs."""
    ok = results[results["status"] == "ok"] if "status" in results else results
    trained = sorted(ok["init"].unique())
    if len(trained) < 2:
        return (f"a paired comparison needs two initialisations with trained runs; "
                f"{'only ' + trained[0] + ' has' if trained else 'none has'} any")
    return f"{', '.join(trained)} have trained runs, yet stage 04 compared none of them: re-run `make evaluate`"


def ef_gap(ef: pd.DataFrame) -> str:
    """Why the ejection-fraction table can have no row: no test patient has both phases (ED and ES) labelled."""
    if ef.empty:
        return ("the ejection fraction needs a patient's end-diastolic and end-systolic volumes, and no test "
                "patient has both phases labelled (or no run with all labels was trained)")
    return "every test volume's ejection fraction is undefined (no cavity at end-diastole in the ground truth)"


def explained_regions(region: np.ndarray, truth: np.ndarray) -> pd.DataFrame:
    """Pixels of the region each CAM explains and of the ground truth, per slice and structure.

    ``region``: the label maps whose structure masks Seg-Grad-CAM explains (the model's prediction, or the
    ground truth with ``explain.target: ground_truth``), (N, H, W); ``truth``: the ground truth, (N, H, W).
    Columns ``slice`` (position in the stack), ``structure``, ``region_pixels``, ``truth_pixels``: stage 05 adds
    them to its numbers, so that a table with no numbers can say why (``explanation_gaps``).
    """
    from .metrics import STRUCTURES

    region, truth = np.asarray(region), np.asarray(truth)
    if region.shape != truth.shape or region.ndim != 3:
        raise ValueError(f"region {region.shape} and truth {truth.shape}: expected two (N, H, W) label stacks")
    rows = [{"slice": k, "structure": name, "region_pixels": int((region[k] == code).sum()),
             "truth_pixels": int((truth[k] == code).sum())}
            for code, name in STRUCTURES.items() for k in range(len(region))]
    return pd.DataFrame(rows, columns=["slice", "structure", "region_pixels", "truth_pixels"])


# downsampling of the ResNet18 encoder's blocks: a CAM on a block whose feature map is one pixel is constant
ENCODER_STRIDES = {"encoder.conv1": 2, "encoder.layer1": 4, "encoder.layer2": 8, "encoder.layer3": 16,
                   "encoder.layer4": 32}


def explanation_gaps(numbers: pd.DataFrame, inits, target: str = "predicted",
                     image_size: int | None = None) -> dict[str, str]:
    """Why initialisations have no row in the explanation-numbers table (``explain.summarise_numbers``).

    ``numbers``: stage 05's per-slice rows (``runs/<data>/<profile>/explain/numbers.csv``: one per run, layer,
    explained slice and structure, with the numbers of ``explain.explanation_numbers`` and the columns of
    ``explained_regions``); ``inits``: the sweep's initialisations; ``target``: ``explain.target``;
    ``image_size``: the prepared slices' size in pixels. Returns ``{init: reason}`` for each initialisation none
    of whose numbers is defined (``{}`` when all have some).
    """
    from .explain import XAI_METRICS

    gaps = {}
    for init in inits:
        rows = numbers[numbers["init"] == init] if "init" in numbers else numbers.iloc[:0]
        metrics = [m for m in XAI_METRICS if m in rows]
        if not rows.empty and rows[metrics].notna().any().any():
            continue
        if rows.empty:
            gaps[init] = "not explained: it has no trained run with all labels"
            continue
        slices = rows["slice"].nunique()
        models = rows["seed"].nunique() if "seed" in rows else 1
        model = "its model" if models == 1 else f"its {models} models (one per seed)"
        layers = sorted(rows["layer"].unique()) if "layer" in rows else []
        reasons = []
        if layers and image_size and all(image_size // ENCODER_STRIDES.get(f, 1) <= 1 for f in layers):
            reasons.append(f"{', '.join(layers)} downsample{'s' if len(layers) == 1 else ''} {image_size}-px slices "
                           f"to a 1 x 1 feature map, on which a CAM is constant (a larger `data.image_size` or an "
                           f"earlier layer in `explain.layers` gives numbers)")
        if "region_pixels" not in rows:
            reasons.append(f"every number is undefined on the {slices} explained test slices: the regions to "
                           f"explain were empty or the CAMs zero (stage 05 predates the region counts; re-run "
                           f"`make explain`)")
        elif rows["region_pixels"].sum() == 0 and target == "predicted":
            reasons.append(f"{model} predicted no RV, MYO or LV on the {slices} explained test slices, so "
                           f"Seg-Grad-CAM had no region to explain (`explain.target: predicted`; a model trained "
                           f"longer, more `explain.max_slices` or `explain.target: ground_truth` give one)")
        elif rows["truth_pixels"].sum() == 0:
            reasons.append(f"none of the {slices} explained test slices contains RV, MYO or LV in the ground truth, "
                           f"so no localisation number is defined (more `explain.max_slices` gives some)")
        elif not reasons:
            reasons.append(f"the CAMs of {model} were zero on every explained slice (no positive gradient reached "
                           f"{', '.join(layers) or 'the explained layer'}), so every number is undefined")
        gaps[init] = ", and ".join(reasons)
    return gaps


def explanation_note(numbers: pd.DataFrame, inits, target: str = "predicted",
                     image_size: int | None = None) -> str | None:
    """One Markdown paragraph on what the explanation-numbers table lacks and why (None when nothing is missing);
    the arguments are those of ``explanation_gaps``."""
    gaps = explanation_gaps(numbers, inits, target, image_size)
    if not gaps:
        return None
    shared: dict[str, list[str]] = {}  # initialisations with the same reason share one sentence
    for init, reason in gaps.items():
        shared.setdefault(reason, []).append(init)
    why = "; ".join(f"**{', '.join(names)}**: {reason}" for reason, names in shared.items())
    if len(gaps) == len(list(inits)):
        return f"**No explanation numbers**: {why}."
    return f"**Not in the table**: {why}."


# ------------------------------------------------------------------------------------------------------------
# the report's sentences about the data, the pretraining and the runs

def describe_data(profile: str, manifest: dict) -> str:
    """The profile, the data sources (layout, patients, role, geometry) and the geometry of the prepared slices."""
    from .prepare import describe_geometry

    sources = ", ".join(f"{s['layout']} ({s['patients']} patients, {s['role']}, {s.get('geometry', 'pixel')} geometry)"
                        for s in manifest["sources"])
    return f"**Profile** `{profile}` · **data** {sources} · **geometry** {describe_geometry(manifest)}"


def describe_pretraining(ws: Workspace, methods) -> str:
    """One Markdown bullet per pretraining method: what it transferred, on how many unlabelled slices from which
    source, the epochs run and kept, and the collapse monitor's verdict (from the encoder's JSON sidecar and the
    history of stage 02)."""
    from .ssl import get_method

    lines = []
    took = pretraining_times(ws, methods)
    for m in methods:
        meta = json.loads(ws.encoder_path(m).with_suffix(".json").read_text())
        monitored = pd.read_csv(ws.pretrain_dir(m) / "history.csv")["embedding_std_ratio"].notna().any()
        state = ("COLLAPSED" if meta["collapsed"] else "no collapse") if monitored else "none (no embedding)"
        seen = meta.get("pool_slices", {})
        sources = ", ".join(f"{n} from {folder}" for folder, n in seen.get("train_by_source", {}).items())
        method = get_method(m)
        lines.append(f"- **{method.display}** ({' and '.join(method.transfers)}): trained on {seen.get('train', '?')} "
                     f"unlabelled slices ({sources or 'sources not recorded'}), validated on {seen.get('val', '?')}; "
                     f"{meta['epochs_run']} epochs, kept epoch {meta['best_epoch']} (validation loss "
                     f"{meta['best_val_loss']:.4f}); collapse monitor: {state}{took.get(m, '')}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """``1 min 38 s`` (or ``38 s``): as Make's progress lines say how long a notebook took."""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def pretraining_times(ws: Workspace, methods, reference: str = "simsiam") -> dict[str, str]:
    """Per method, "; pretraining took T (r× SimSiam's)": the wall time of its stage-02 notebook as Papermill recorded
    it, and its multiple of ``reference``'s where that method ran too (what a method costs beside the study's
    SimSiam; under Make each pretraining has its share of the cores, so the ratio compares like with like only when
    they ran alike). Methods without an executed notebook are left out."""
    from .ssl import get_method

    durations = stage_durations(ws.executed).set_index("notebook")["wall_s"].dropna()
    seconds = {m: float(durations[f"02_pretrain-{m}"]) for m in methods if f"02_pretrain-{m}" in durations.index}
    base = seconds.get(reference)
    words = {}
    for m, t in seconds.items():
        ratio = f" ({t / base:.1f}× {get_method(reference).display}'s)" if base and m != reference else ""
        words[m] = f"; pretraining took {_duration(t)}{ratio}"
    return words


def unavailable_note(unavailable: pd.DataFrame) -> str:
    """One quoted line per initialisation that could not be trained (stage 04's ``unavailable.csv``), with why."""
    return "\n\n".join(f"> **{init}: unavailable** — not trained, not replaced by random weights. {reason}"
                       for init, reason in unavailable.groupby("init")["reason"].first().items())


def health_note(health: pd.DataFrame) -> str:
    """The health check in a sentence (stage 04's ``health_checks.csv``: empty when every run learned)."""
    if health.empty:
        return "**Health check**: every run's training loss fell and every run segments RV, MYO and LV."
    return ("**Health check: problems found** (a flat training loss, or a structure a model never predicts — numbers "
            "from such runs describe a model that did not learn):")
