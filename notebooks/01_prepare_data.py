# ---
# jupyter:
#   kernelspec:
#     display_name: Python (cmr-ssl)
#     language: python
#     name: cmr-ssl
# ---

# %% [markdown]
# # 01 · Data preparation: patient-level splits and 2D slice sets
#
# **Inputs**: the data sources named by `data` (comma-separated folders, the labelled ACDC source first;
# empty: the built-in cardiac phantom, generated on first use).
# **Outputs**: `runs/<data>/<profile>/prepared/` (split, slice arrays, pretraining pool, manifest);
# the split table and a figure of sample slices in `reports/<data>/<profile>/`.
# **Parameters**: `params/<profile>.yaml`, section `data`.
#
# Patients, not slices, are split into train / validation / test, so that no patient's anatomy is seen in two
# splits. The labelled set holds every end-diastolic (ED) and end-systolic (ES) slice with ground truth; the
# unlabelled pretraining pool holds every cine frame of the train and validation patients plus the extra
# sources — never a test patient.
#
# Every slice is made square (`data.resize`: `pad` with zeros to its longer side, or `crop` its centre to the
# shorter side), cut to the central `data.field_of_view` fraction of that square, and resized to
# `data.image_size` pixels (`cmr_utils.geometry.SliceGeometry`). On the 160 ACDC volumes every labelled structure
# lies within the central 0.67 of the padded square, so a field of view of 0.8 keeps all of them and magnifies
# the heart by 1 / 0.8 = 1.25 in each direction; stage 04 maps predictions back through the same rule to score
# them on each volume's original grid.

# %% tags=["parameters"]
profile = "default"
data = ""

# %%
from cmr_utils import paths, plots
from cmr_utils.params import load_profile
from cmr_utils.prepare import Prepared, data_sources, prepare_dataset, summary_table

params = load_profile(profile)
ws = paths.workspace(profile, data)
sources = data_sources(data, params["data"]["phantom"])
for source in sources:
    print(f"{source.layout:12s} {len(source.patients()):4d} patients  {source.folder}")

# %%
split = params["data"]["split"]
manifest = prepare_dataset(
    sources, ws.prepared,
    image_size=params["data"]["image_size"], resize=params["data"]["resize"],
    split_fractions=(split["train"], split["val"], split["test"]), split_seed=split["seed"],
    field_of_view=params["data"]["field_of_view"], parameters=params["data"],
)
prepared = Prepared.open(ws.prepared)
manifest["counts"]

# %% [markdown]
# ## Patients, slices and class pixel fractions per split

# %%
table = summary_table(prepared)
table.to_csv(ws.table("data_summary.csv"))
table.style.format(precision=4)

# %% [markdown]
# ## Sample slices per source, ground truth overlaid (RV red, MYO green, LV blue)

# %%
fig = plots.sample_slices(prepared, sources)
fig.savefig(ws.figure("data_samples.png"), dpi=120, bbox_inches="tight")
