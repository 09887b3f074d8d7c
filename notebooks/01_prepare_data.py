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
# **Geometry** (`data.geometry`, `cmr_utils.geometry`). Where the labelled source carries voxel spacing, every
# slice is resampled in-plane to one target spacing in millimetres and cut to the central `data.image_size` window
# (`physical`): the heart then has the same size in model pixels whatever the scanner's pixel size or field of view,
# and a scan framed tightly around the heart is padded, a wide thorax searched for the heart first, at inference.
# `data.target_spacing: auto` picks the spacing at which that window holds every training heart (measured from the
# slice's centre) with 10 % to spare. Sources without spacing (the LA2018 HDF5 files; ACDC's HDF5 files without
# their `spacing.csv`) keep pixel geometry: made square (`data.resize`), cut to the central `data.field_of_view` of
# the square and resized, so a scan is seen relative to its own field of view. The log below says which geometry
# each source got; stage 04 maps predictions back through the same rule to score them on each volume's original grid.

# %% tags=["parameters"]
profile = "default"
data = ""

# %%
from cmr_utils import figures, paths
from cmr_utils.params import load_profile
from cmr_utils.prepare import Prepared, data_sources, prepare_dataset

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
    field_of_view=params["data"]["field_of_view"], geometry=params["data"]["geometry"],
    target_spacing=params["data"]["target_spacing"], parameters=params["data"],
)
prepared = Prepared.open(ws.prepared)
manifest["counts"]

# %% [markdown]
# ## Patients, slices and class pixel fractions per split

# %%
figures.make(ws, "data_summary.csv", prepared).style.format(precision=4)

# %% [markdown]
# ## Sample slices per source, ground truth overlaid (RV red, MYO green, LV blue)

# %%
figures.make(ws, "data_samples.png", prepared, sources)
