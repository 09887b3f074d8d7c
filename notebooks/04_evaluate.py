# ---
# jupyter:
#   kernelspec:
#     display_name: Python (cmr-ssl)
#     language: python
#     name: cmr-ssl
# ---

# %% [markdown]
# # 04 · Evaluation on the test split: the study's IoU, ACDC's metrics, statistics across seeds
#
# **Inputs**: every run of stage 03 (its validation-selected model) and the test split of stage 01.
# **Outputs**: `runs/<data>/<profile>/evaluate/` (per-run, per-slice and per-volume scores); tables and figures
# in `reports/<data>/<profile>/`.
# **Parameters**: `params/<profile>.yaml` (the plan of runs).
#
# **The study's statistic** ("IoU") is the intersection over union of the three foreground classes as
# segmentation-models-pytorch computes it with `reduction="micro"`: true positives, false positives and false
# negatives are summed over every test slice and over RV, MYO and LV, then IoU = TP / (TP + FP + FN). Per
# slice, the same sum runs over that slice only ("micro-imagewise").
# **ACDC's metrics** are computed per patient and phase on the 3D stack of test slices: Dice, IoU and the 95th
# percentile Hausdorff distance (HD95, mm when the source records voxel spacing, pixels otherwise), and the
# ejection fraction EF = (EDV − ESV) / EDV of the LV and RV cavities, predicted versus true.
# The test split chooses nothing: every model was selected on the validation split.

# %% tags=["parameters"]
profile = "default"
data = ""

# %%
import pandas as pd

from cmr_utils import evaluate, paths, plots, stats
from cmr_utils.params import load_profile
from cmr_utils.plan import finetune_runs
from cmr_utils.prepare import Prepared

params = load_profile(profile)
ws = paths.workspace(profile, data)
prepared = Prepared.open(ws.prepared)
results = evaluate.read_results(finetune_runs(params), ws.finetune_dir)
unavailable = results[results["status"] != "ok"]
for init, reason in unavailable.groupby("init")["reason"].first().items():
    print(f"UNAVAILABLE initialisation {init!r}: {reason}")
results = results[results["status"] == "ok"].copy()
results["n_labelled"] = results["n_labelled"].astype(int)

# %%
images, truth, slices = prepared.images("test"), prepared.labels("test"), prepared.slices("test")
per_slice, per_volume, ef, split_iou = [], [], [], {}
for run in results.itertuples():
    scored = evaluate.evaluate_run(ws.finetune_dir(run.name), images, truth, slices)
    keys = {"run": run.name, "init": run.init, "budget": run.budget, "seed": run.seed}
    split_iou[run.name] = scored["split_iou"]
    per_slice.append(scored["per_slice"].assign(**keys))
    per_volume.append(scored["per_volume"].assign(**keys))
    ef.append(scored["ef"].assign(**keys))
per_slice, per_volume, ef = (pd.concat(x, ignore_index=True) for x in (per_slice, per_volume, ef))
results["test_iou"] = results["name"].map(split_iou)
ws.evaluation.mkdir(parents=True, exist_ok=True)
for name, df in {"runs": results, "per_slice": per_slice, "per_volume": per_volume, "ef": ef}.items():
    df.to_csv(ws.evaluation / f"{name}.csv", index=False)
unavailable.reindex(columns=["name", "init", "budget", "seed", "reason"]).to_csv(
    ws.evaluation / "unavailable.csv", index=False)

# %% [markdown]
# ## The study's table: best train / validation / test IoU per initialisation (all labels)
# Mean over seeds with the 95% confidence interval (t distribution); test IoU at the validation-selected epoch.

# %%
all_labels = results[results["budget"] == "all"]
table = pd.concat({col: stats.summarise(all_labels, ["init"], col).set_index("init")
                   for col in ("best_train_iou", "best_val_iou", "test_iou")}, axis=1)
table.to_csv(ws.table("iou_by_init.csv"))
table.style.format(precision=3)

# %% [markdown]
# ## Validation loss and IoU per epoch (all labels, mean over seeds)

# %%
histories = {init: pd.concat([pd.read_csv(ws.finetune_dir(n) / "history.csv") for n in group["name"]])
             .groupby("epoch").mean().reset_index() for init, group in all_labels.groupby("init")}
fig = plots.validation_curves(histories)
fig.savefig(ws.figure("validation_curves.png"), dpi=120, bbox_inches="tight")

# %% [markdown]
# ## Label-budget curve: test IoU against the number of labelled slices (mean and 95% CI over seeds)

# %%
budget_summary = stats.summarise(results, ["init", "budget", "n_labelled"], "test_iou")
budget_summary.to_csv(ws.table("iou_by_budget.csv"), index=False)
fig = plots.budget_curve(budget_summary)
fig.savefig(ws.figure("budget_curve.png"), dpi=120, bbox_inches="tight")
budget_summary.style.format(precision=3)

# %% [markdown]
# ## Paired comparisons between initialisations
# Pairs are the same seed, test patient and phase; the value is the mean 3D Dice over RV, MYO and LV.
# Wilcoxon signed-rank and paired t tests, Holm-adjusted over the comparisons of one budget.

# %%
volume_dice = per_volume.groupby(["init", "budget", "seed", "patient", "phase"])["dice"].mean().reset_index()
comparisons = pd.concat([stats.pairwise_comparisons(group, "init", ["seed", "patient", "phase"], "dice")
                         .assign(budget=budget) for budget, group in volume_dice.groupby("budget")
                         if group["init"].nunique() > 1], ignore_index=True)
comparisons.to_csv(ws.table("paired_comparisons.csv"), index=False)
comparisons

# %% [markdown]
# ## ACDC's metrics per structure and phase (all labels): Dice and HD95

# %%
acdc = (per_volume[per_volume["budget"] == "all"]
        .groupby(["init", "phase", "structure"])
        .agg(dice=("dice", "mean"), dice_sd=("dice", "std"), hd95=("hd95", "mean"), hd95_unit=("hd95_unit", "first"),
             volumes=("dice", "size")).reset_index())
acdc.to_csv(ws.table("acdc_metrics.csv"), index=False)
acdc.pivot_table(index=["init"], columns=["phase", "structure"], values=["dice", "hd95"]).style.format(precision=3)

# %% [markdown]
# ## Ejection fraction: predicted versus true (all labels)
# Bias = mean(predicted − true) in EF percentage points, limits of agreement = bias ± 1.96 SD, Pearson r.

# %%
ef_all = ef[ef["budget"] == "all"]
agreement = evaluate.ef_agreement_table(ef_all)
agreement.to_csv(ws.table("ef_agreement.csv"), index=False)
fig = plots.ef_scatter(ef_all)
fig.savefig(ws.figure("ef_agreement.png"), dpi=120, bbox_inches="tight")
agreement.style.format(precision=3)

# %% [markdown]
# ## A sample prediction: the test slice of median IoU for the best initialisation, every initialisation

# %%
fig = plots.sample_prediction(per_slice, results, images, truth, ws.finetune_dir)
fig.savefig(ws.figure("sample_prediction.png"), dpi=120, bbox_inches="tight")
