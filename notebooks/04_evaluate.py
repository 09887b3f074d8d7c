# ---
# jupyter:
#   kernelspec:
#     display_name: Python (cmr-ssl)
#     language: python
#     name: cmr-ssl
# ---

# %% [markdown]
# # 04 · Evaluation on the test split: the study's IoU, ACDC's metrics, patient-level bootstrap statistics
#
# **Inputs**: every run of stage 03 (its validation-selected model) and the test split of stage 01.
# **Outputs**: `runs/<data>/<profile>/evaluate/` (per-run, per-slice and per-volume scores); tables and figures
# in `reports/<data>/<profile>/`.
# **Parameters**: `params/<profile>.yaml` (the plan of runs); `external` (`EXTERNAL=`): labelled folders in any
# supported layout on which every run is also scored (external validation; empty: none).
#
# **Two grids.** Every test volume is predicted as a new scan is (`cmr_utils.inference.predict_volume`: in physical
# geometry the whole field at the training spacing; where it is larger than the training window, the heart is
# located in it first and the window around it predicted). 3D metrics on each volume's original grid: predictions
# are mapped back and compared with the original labels, as the ACDC challenge does; the study's IoU is on the
# model's grid (the training window of the same prediction against the prepared test labels, `data.image_size` px, e.g. 128 px).
# **The study's statistic** ("IoU", column `test_iou_model_grid`) is the intersection over union of the three
# foreground classes as segmentation-models-pytorch computes it with `reduction="micro"`: true positives, false
# positives and false negatives are summed over every test slice and over RV, MYO and LV, then
# IoU = TP / (TP + FP + FN). Per slice (`per_slice`, also on the model's grid), the same sum runs over that slice
# only ("micro-imagewise").
# **ACDC's metrics** (the headline: Dice per structure, `per_volume`) are computed per patient and phase on the
# volume's original grid, from the softmax probabilities mapped back and then argmax'd: Dice, IoU and the 95th
# percentile Hausdorff distance (HD95, mm when the source records voxel spacing, original pixels otherwise), and
# the ejection fraction EF = (EDV − ESV) / EDV of the LV and RV cavities, predicted versus true.
# The test split chooses nothing: every model was selected on the validation split.

# %% tags=["parameters"]
profile = "default"
data = ""
external = ""

# %%
from IPython.display import display

from cmr_utils import evaluate, figures, framing, label_efficiency, paths, ssl, tables
from cmr_utils.params import load_profile
from cmr_utils.plan import external_sources, plan_runs
from cmr_utils.prepare import Prepared
from cmr_utils.training import inference_device

params = load_profile(profile)
ws = paths.workspace(profile, data)
prepared = Prepared.open(ws.prepared)
results = evaluate.read_results(plan_runs(profile, data).runs, ws.finetune_dir)  # the same runs as the Makefile's
reference = evaluate.reference_budget(results)  # `all`, or the largest trained budget of a low-label profile
results, unavailable = evaluate.trained_runs(results)
for init, reason in unavailable.groupby("init")["reason"].first().items():
    print(f"UNAVAILABLE initialisation {init!r}: {reason}")
device = inference_device(params["trainer"]["accelerator"])  # the GPU where there is one (and the profile allows it)

# %%
scored = evaluate.evaluate_runs(results, prepared, ws.finetune_dir, device=device,
                                flips=params["evaluate"]["test_time_flips"])  # per_slice: model grid; others original
ws.evaluation.mkdir(parents=True, exist_ok=True)
for name, df in {**scored, "unavailable": unavailable}.items():
    df.to_csv(ws.evaluation / f"{name}.csv", index=False)
results, per_slice, per_volume, ef = scored["runs"], scored["per_slice"], scored["per_volume"], scored["ef"]

# %% [markdown]
# ## Headline: the study's IoU and the 3D Dice per initialisation and label budget
# One row per initialisation and budget (`headline.csv`, the report's first table): the study's IoU of the whole
# test split on the model grid (mean over seeds) beside the 3D Dice per patient and phase on the original grid (mean
# over RV, MYO and LV) with its 95 % patient-level bootstrap interval (2,000 resamples; seeds pooled).

# %%
volume_dice = tables.volume_dice(per_volume)  # per patient and phase: mean 3D Dice over RV, MYO and LV
figures.make(ws, "headline.csv", results, per_volume).style.format(precision=3).hide(axis="index")

# %% [markdown]
# ## External validation: every run on the `EXTERNAL=` folders
# Each run's selected model segments every labelled volume of each external folder with the preprocessing it was
# trained with (`cmr_utils.predict_scans.open_run`), and is scored on the volume's own grid exactly as the test
# split is (Dice, IoU, HD95 per structure; EF). `external_cross_dataset.csv`: the mean 3D Dice (over RV, MYO and
# LV, per patient and phase) of the all-label runs per initialisation, dataset and, where the layout records it
# (M&Ms), vendor, with 95 % patient-level bootstrap intervals (2,000 resamples; seeds pooled);
# `external_drop.csv`: external minus internal test Dice, the interval from resampling both sets' patients.

# %%
external_sets = external_sources(external)  # {dataset name: source}, any layout
if external_sets:
    ext_per_volume, ext_ef = evaluate.external_validation(results, external_sets, profile, data, device)
    ext_per_volume.to_csv(ws.evaluation / "external_per_volume.csv", index=False)
    ext_ef.to_csv(ws.evaluation / "external_ef.csv", index=False)
    cross, drop = evaluate.external_tables(per_volume[per_volume["budget"] == reference],
                                           ext_per_volume[ext_per_volume["budget"] == reference])
    for name, df in {"external_cross_dataset.csv": cross, "external_drop.csv": drop}.items():
        display(figures.save(ws, name, df).style.format(precision=3, na_rep="–").hide(axis="index"))
else:
    print("no EXTERNAL= folders: external validation skipped")

# %% [markdown]
# ## Framing test: the test patients framed as other centres frame them
# The all-label run of the first seed of each initialisation (the framings cost about six passes over the test
# split) segments every test volume as `make predict` would (`cmr_utils.framing`): in its original framing, cut to a
# square around the heart of 1, 1.25 and 1.5 times the heart's extent, and zero-padded to 1.5 and 2 times its field
# of view. `framing_by_init.csv`: mean 3D Dice over RV, MYO and LV and the test volumes per framing, and the worst
# framing's difference to the original (each framed volume scored on its own grid).

# %%
first_seed = results["seed"].min() if len(results) else 0
framing_runs = results[(results["budget"] == "all") & (results["seed"] == first_seed)]  # none in a low-label profile
framing_scores = framing.framing_test(framing_runs, profile, data, "test", device)
framing_scores.to_csv(ws.evaluation / "framing.csv", index=False)
figures.make(ws, "framing_by_init.csv", framing_scores).style.format(precision=3).hide(axis="index")

# %% [markdown]
# ## Health check: did every model learn?
# A training loss that stays flat, or a structure that a model never predicts (mean test Dice below 0.05), is a
# bug to find, not a property of short runs. The table lists every run that shows either; empty is good.

# %%
health = figures.make(ws, "health_checks.csv", results, per_volume)
print("every run learned and segments RV, MYO and LV" if health.empty else
      f"WARNING: {len(health)} problem(s) found:\n{health.to_string(index=False)}")

# %% [markdown]
# ## The study's table: best train / validation / test IoU per initialisation (all labels)
# `best_train_iou` (the highest training IoU over the epochs), `best_val_iou` (the validation IoU of the selected
# epoch, the one of best validation Dice) and `test_iou_model_grid` (the study's IoU of the whole test split on the
# model grid, from that epoch's checkpoint) are one number per run: mean over seeds and the range over seeds
# (`seed_min`, `seed_max`), no interval (a t interval over a handful of seeds means nothing). Over test patients:
# `test_slice_iou` (the study's IoU per test slice, model grid; slices with neither truth nor prediction left out)
# and `test_dice` (3D Dice of each patient and phase on the volume's original grid, mean over RV, MYO and LV), each
# with its mean and its 95 % patient-level bootstrap interval (2,000 resamples over test patients; seeds pooled).

# %%
figures.make(ws, "iou_by_init.csv", results, per_slice, per_volume, reference).style.format(precision=3)

# %% [markdown]
# ## Validation loss and IoU per epoch (all labels, mean over seeds)

# %%
histories = tables.validation_histories(results[results["budget"] == reference], ws.finetune_dir)
figures.make(ws, "validation_curves.png", histories)

# %% [markdown]
# ## Label-budget curve: test IoU (model grid) against the number of labelled slices
# The study's IoU per test slice on the model grid (slices with neither truth nor prediction left out): mean over
# the test slices of all seeds and its 95 % patient-level bootstrap interval (2,000 resamples over test patients;
# seeds pooled). `split_iou_seed_mean`: the study's IoU of the whole test split on the model grid
# (`test_iou_model_grid`), mean over seeds, for reference. `frozen_encoder`: the encoder was frozen (the study's
# rule below `freeze_below` slices); `<budget>-trained` rows (the same slices, the encoder trained) are the dashed lines.

# %%
budget_summary = figures.make(ws, "iou_by_budget.csv", results, per_slice)
figures.make(ws, "budget_curve.png", budget_summary, "test IoU per slice (model grid)")
budget_summary.style.format(precision=3)

# %% [markdown]
# ## Paired comparisons between initialisations
# Pairs are the same seed, test patient and phase; the value is the 3D Dice of a patient and phase, mean over RV,
# MYO and LV. The differences b − a are averaged per test patient first (the patients, not patient × seed rows,
# are the independent units); `mean_diff` is their mean over patients with its 95 % patient-level bootstrap
# interval (2,000 resamples over test patients; seeds pooled) and bootstrap p value (`boot_p`); `wilcoxon_p` is
# the Wilcoxon signed-rank test of the per-patient mean differences. `*_holm`: Holm-adjusted over the comparisons
# of one budget. With fewer than about ten test patients the bootstrap runs narrow: read the Wilcoxon p there.

# %%
figures.make(ws, "paired_comparisons.csv", per_volume)

# %% [markdown]
# ## Label efficiency: does pretraining pay with few labels?
# Test Dice (3D, native grid, mean over RV, MYO and LV) per initialisation and budget with its 95 % patient-level
# bootstrap interval (`dice_by_budget.csv`); each initialisation minus random, paired on seed, patient and phase
# (`gains_over_random.csv`), and per structure (`gains_by_structure.csv`); the figure puts the patient budgets (`p1`,
# `p3`, `p7`) beside all labels.

# %%
names = {name: method.display for name, method in ssl.METHODS.items()}
by_budget = figures.make(ws, "dice_by_budget.csv", volume_dice)
gains = figures.make(ws, "gains_over_random.csv", volume_dice)
figures.make(ws, "gains_by_structure.csv", per_volume)
if by_budget["labelled_patients"].notna().any():  # patient budgets (p1, p3, ...) in the sweep
    figures.make(ws, "label_efficiency.png", by_budget, prepared.manifest["counts"]["train_patients"], names)
print(label_efficiency.answer(gains, names, methods=ssl.METHODS, freeze_below=params["finetune"]["freeze_below"]))

# %% [markdown]
# ## ACDC's metrics per structure and phase (all labels): Dice and HD95

# %%
acdc = figures.make(ws, "acdc_metrics.csv", per_volume, reference)
acdc.pivot_table(index=["init"], columns=["phase", "structure"], values=["dice", "hd95"]).style.format(precision=3)

# %% [markdown]
# ## Ejection fraction: predicted versus true (all labels)
# Bias = mean(predicted − true) in EF percentage points, limits of agreement = bias ± 1.96 SD, Pearson r.

# %%
ef_all = ef[ef["budget"] == reference]
agreement = figures.make(ws, "ef_agreement.csv", ef_all)
figures.make(ws, "ef_agreement.png", ef_all)
agreement.style.format(precision=3)

# %% [markdown]
# ## A sample prediction: the test slice of median IoU (model grid) for the best initialisation, every initialisation

# %%
figures.make(ws, "sample_prediction.png", per_slice, results, prepared.images("test"), prepared.labels("test"),
             ws.finetune_dir)
