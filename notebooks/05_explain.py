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

from cmr_utils import evaluate, explain, figures, paths, plots, report, viewer
from cmr_utils.explain import views
from cmr_utils.finetune import load_trained_model
from cmr_utils.params import load_profile
from cmr_utils.prepare import Prepared
from cmr_utils.training import inference_device

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
    selected[init] = explain.select_slices(scores, cfg["n_best"], cfg["n_worst"], cfg["n_median"])
    plots.show_figure(figures.make(ws, f"explain_{init}_best_median_worst.png", models[init], images, truth, meta,
                                   scores, selected[init], init=init, layer=cfg["layers"][0], region=region))

# %% [markdown]
# ## The same slices across initialisations
# Each initialisation's median slice, explained by every initialisation side by side.

# %%
for index in views.shared_medians(selected):
    plots.show_figure(figures.make(ws, f"explain_across_inits_slice{index}.png", models, images, truth, meta, index,
                                   layer=cfg["layers"][0], region=region))

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
montage = views.montage_selection(provider, selected)  # each initialisation's best slice, up to two structures
plots.show_figure(figures.make(ws, "explain_viewer_montage.png", provider, montage, cfg["layers"][0]))

# %% [markdown]
# ## Numbers for explanations
# On up to `max_slices` test slices (evenly spaced), for every seed's model with all labels and every layer in the
# parameters: means over slices, then mean and spread (SD) over seeds. The models predict (the explained region, the
# deletion and insertion curves) as stage 04 scored them: in bf16 where they trained in bf16 and the hardware runs it.

# %%
numbers = views.numbers_over_runs(runs, ws.finetune_dir, images, truth, layers=cfg["layers"], region=region,
                                  steps=cfg["deletion_steps"], max_slices=cfg["max_slices"], device=device)
ws.explanation.mkdir(parents=True, exist_ok=True)
numbers.to_csv(ws.explanation / "numbers.csv", index=False)  # with the pixels each CAM explains (report.py says why)
summary = figures.make(ws, "xai_summary.csv", numbers)
note = report.explanation_note(numbers, params["finetune"]["inits"], cfg["target"], images.shape[-1])
if note:
    display(Markdown(note))
summary.style.format(precision=3, na_rep="–").hide(axis="index")
