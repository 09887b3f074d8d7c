# ---
# jupyter:
#   kernelspec:
#     display_name: Python (cmr-ssl)
#     language: python
#     name: cmr-ssl
# ---

# %% [markdown]
# # 05 · Explanations: Seg-Grad-CAM, a slice-by-slice viewer, and numbers for explanations
#
# **Inputs**: the fine-tuned models of stage 03 (all labels) and the per-slice test scores of stage 04.
# **Outputs**: figures `explain_*.png` and the table `xai_summary.csv` in `reports/<data>/<profile>/`;
# per-slice numbers in `runs/<data>/<profile>/explain/`.
# **Parameters**: `params/<profile>.yaml`, section `explain`.
#
# Seg-Grad-CAM (Vinogradova et al. 2020) explains a segmentation class *c* by the gradient of the sum of c's
# logits over a region (by default the predicted mask of c) at a chosen layer (by default the encoder's last
# block, as in the study), through pytorch-grad-cam's `SemanticSegmentationTarget`. Beyond the study's
# side-by-side look, three kinds of numbers compare the initialisations:
#
# - **localisation**: the share of CAM energy inside the ground-truth structure and in a 3-pixel ring around it,
#   and the pointing game (is the CAM's maximum inside the structure);
# - **faithfulness**: deletion / insertion — the class logit summed over the region as the most relevant pixels
#   are blurred away first (deletion; lower area is more faithful) or restored first (insertion; higher is
#   better), against a random order;
# - **sanity**: the rank correlation between the CAM of the trained model and that of the same architecture with
#   randomised weights; a map that merely reflects the image would correlate highly.

# %% tags=["parameters"]
profile = "default"
data = ""

# %%
import pandas as pd
from IPython.display import Markdown, display

from cmr_utils import evaluate, explain, paths, plots, report, viewer
from cmr_utils.finetune import load_trained_model
from cmr_utils.params import load_profile
from cmr_utils.prepare import Prepared
from cmr_utils.training import inference_device, predicts_in_bf16

params = load_profile(profile)
cfg = params["explain"]
ws = paths.workspace(profile, data)
prepared = Prepared.open(ws.prepared)
images, truth, meta = prepared.images("test"), prepared.labels("test"), prepared.slices("test")
runs = pd.read_csv(ws.evaluation / "runs.csv")
runs = runs[runs["budget"] == evaluate.reference_budget(runs)].sort_values(["init", "seed"])
per_slice = pd.read_csv(ws.evaluation / "per_slice.csv")
region = cfg["target"].replace("predicted", "prediction")
first = runs.groupby("init").first()  # the figures show each initialisation's first seed
device = inference_device(params["trainer"]["accelerator"])  # the GPU where there is one (and the profile allows it)
models = {init: load_trained_model(ws.finetune_dir(run["name"])).to(device) for init, run in first.iterrows()}
print("explained:", ", ".join(f"{i} ({r['name']})" for i, r in first.iterrows()))

# %% [markdown]
# ## Best, median and worst test slices per initialisation (per-slice Dice), Seg-Grad-CAM on the last encoder block

# %%
for stale in ws.figures.glob("explain_*.png"):  # this stage's figures: none may survive from an earlier sweep
    stale.unlink()
selected = {}
for init, run in first.iterrows():
    scores = per_slice[per_slice["run"] == run["name"]]["dice"].to_numpy()
    groups = explain.select_slices(scores, cfg["n_best"], cfg["n_worst"], cfg["n_median"])
    selected[init] = groups
    order = [(g, int(i)) for g in ("best", "median", "worst") for i in groups[g]]
    titles = [f"{g}: " + explain.row_title(meta.iloc[i]["patient"], int(meta.iloc[i]["slice"]), scores[i],
                                            meta.iloc[i]["phase"]) for g, i in order]
    rows = explain.build_rows(models[init], images, truth, [i for _, i in order], titles,
                              layer=cfg["layers"][0], region=region)
    fig = explain.plot_explanations(rows)
    fig.suptitle(f"{init}: best / median / worst test slices", y=1.0)
    alt = (f"Seg-Grad-CAM of the {init} model (all labels) on its best, median and worst test slices by Dice: "
           f"{len(order)} rows ({'; '.join(titles)}), each showing the image, the ground truth, the prediction and "
           f"the CAM on {cfg['layers'][0]} for RV, MYO and LV.")
    plots.show_figure(plots.save_figure(fig, ws.figure(f"explain_{init}_best_median_worst.png"), alt, dpi=100))

# %% [markdown]
# ## The same slices across initialisations
# Each initialisation's median slice, explained by every initialisation side by side.

# %%
shared = list(dict.fromkeys(int(g["median"][0]) for g in selected.values() if len(g["median"])))
for index in shared:
    preds = {init: explain.predict(m, images[index:index + 1])[0][0] for init, m in models.items()}
    cams = {init: {c: explain.seg_grad_cam(m, images[index:index + 1], c, layer=cfg["layers"][0],
                                           masks=(truth[index:index + 1] == c) if region == "ground_truth" else None)[0]
                   for c in explain.STRUCTURES} for init, m in models.items()}
    title = explain.row_title(meta.iloc[index]["patient"], int(meta.iloc[index]["slice"]), phase=meta.iloc[index]["phase"])
    fig = explain.plot_initialisations(images[index], truth[index], preds, cams, title)
    alt = (f"Test slice {title} explained by each initialisation ({', '.join(models)}), one row each: the image, "
           f"the ground truth, that model's prediction and its Seg-Grad-CAM for RV, MYO and LV.")
    plots.show_figure(plots.save_figure(fig, ws.figure(f"explain_across_inits_slice{index}.png"), alt, dpi=100))

# %% [markdown]
# ## Slice by slice: the interactive viewer
# In JupyterLab, the widget below redraws image, ground truth, prediction and CAM overlay as the patient, slice,
# structure, initialisation and layer change. Headless runs cannot keep widget output, so the figure after it
# renders the same view statically for the selected slices.

# %%
provider = viewer.SliceProvider(images, truth, meta, models=models, region=region, layers=cfg["layers"])
viewer_widget = viewer.CamViewer(provider)
display(viewer_widget.widget)

# %%
montage = []
for init in models:  # each initialisation's best slice, with the (up to two) structures it predicts there
    index = int(selected[init]["best"][0])
    predicted = provider.prediction(init, index)
    shown = [name for code, name in explain.STRUCTURES.items() if (predicted == code).any()][:2] or ["MYO"]
    montage += [(index, name, init) for name in shown]
fig = viewer.static_montage(provider, montage, layer=cfg["layers"][0])
alt = ("The slice viewer drawn statically, one row per initialisation's best test slice and structure ("
       + "; ".join(f"{init}: slice {index}, {name}" for index, name, init in montage)
       + "): the image, the ground truth, the prediction and the Seg-Grad-CAM overlay.")
plots.show_figure(plots.save_figure(fig, ws.figure("explain_viewer_montage.png"), alt, dpi=100))

# %% [markdown]
# ## Numbers for explanations
# On up to `max_slices` test slices (evenly spaced), for every seed's model with all labels and every layer in the
# parameters: means over slices, then mean and spread (SD) over seeds. The models predict (the explained region, the
# deletion and insertion curves) as stage 04 scored them: in bf16 where they trained in bf16 and the hardware runs it.

# %%
import numpy as np

picks = np.unique(np.linspace(0, len(images) - 1, min(cfg["max_slices"], len(images))).round().astype(int))
tables = []
for run in runs.itertuples():
    model = load_trained_model(ws.finetune_dir(run.name)).to(device)
    bf16 = predicts_in_bf16(getattr(run, "precision", None), device)  # as stage 04: bf16 where it trained in bf16
    for layer in cfg["layers"]:
        numbers = explain.explanation_numbers(model, images[picks], truth[picks], layer=layer, region=region,
                                              steps=cfg["deletion_steps"], faithfulness=layer == cfg["layers"][0],
                                              bf16=bf16)
        # the pixels each CAM explains: a table with no numbers can then say why (cmr_utils.report)
        explained = truth[picks] if region == "ground_truth" else explain.predict(model, images[picks], bf16=bf16)[0]
        numbers = numbers.merge(report.explained_regions(explained, truth[picks]), on=["slice", "structure"])
        tables.append(numbers.assign(init=run.init, seed=run.seed, layer=layer, slice=picks[numbers["slice"]]))
numbers = pd.concat(tables, ignore_index=True)
ws.explanation.mkdir(parents=True, exist_ok=True)
numbers.to_csv(ws.explanation / "numbers.csv", index=False)
summary = explain.summarise_numbers(numbers)
summary.to_csv(ws.table("xai_summary.csv"), index=False)
note = report.explanation_note(numbers, params["finetune"]["inits"], cfg["target"], images.shape[-1])
if note:
    display(Markdown(note))
summary.style.format(precision=3, na_rep="–").hide(axis="index")
