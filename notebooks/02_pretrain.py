# ---
# jupyter:
#   kernelspec:
#     display_name: Python (cmr-ssl)
#     language: python
#     name: cmr-ssl
# ---

# %% [markdown]
# # 02 · Self-supervised pretraining (one method of the registry `cmr_utils.ssl.METHODS`)
#
# **Inputs**: the unlabelled pretraining pool of stage 01: every slice of the training and validation patients'
# volumes and of every extra source in `DATA` (no test patient is in it); `pretrain.val_fraction` of its patients
# give the validation loss, the rest are trained on.
# **Outputs**: `runs/<data>/<profile>/pretrain/<method>/encoder.pt` (a plain state_dict with the encoder key
# names of segmentation-models-pytorch) and its JSON sidecar; `decoder.pt` for the methods that pretrain the FPN
# decoder too (masked image modelling, global + local contrastive); for other libraries, `encoder.safetensors`
# (torchvision's ResNet18 keys) and `MODEL_CARD.md` (`cmr_utils.export`); `history.csv`; the loss-curve figure.
# **Parameters**: `method` (`simsiam`, `swav`, `mim`, `glcl`, ...), and `params/<profile>.yaml`, section `pretrain`
# (its common keys, then the method's registered defaults, then the profile's block for the method).
#
# The pool is split by patient into training and validation. With `keep: best` training stops early on the
# validation loss and keeps its lowest epoch; with `keep: last` every epoch runs and the last is kept. A
# collapse monitor (the standard deviation of the l2-normalised embeddings, about $1/\sqrt{d}$ when healthy,
# near 0 when every image maps to the same point) is logged every epoch.

# %% tags=["parameters"]
profile = "default"
data = ""
method = "simsiam"

# %%
import json

from cmr_utils import export, figures, paths, ssl
from cmr_utils.distributed import is_main_process
from cmr_utils.params import load_profile, pretrain_settings
from cmr_utils.prepare import Prepared, split_pool
from cmr_utils.training import trainer_options

params = load_profile(profile)
cfg = params["pretrain"]
ws = paths.workspace(profile, data)
spec = ssl.get_method(method)  # fails early, listing the known methods
training, method_kwargs = pretrain_settings(params, method)
prepared = Prepared.open(ws.prepared)
pool, pool_slices = prepared.pool_images(), prepared.pool_slices()
train_idx, val_idx = split_pool(pool_slices, cfg["val_fraction"], cfg["seed"])
seen = pool_slices.iloc[train_idx].groupby("folder").size().to_dict()  # the slices the method trains on, by source
print(f"{spec.display}: pool of {len(pool)} slices; {len(train_idx)} for training ({seen}), {len(val_idx)} for "
      f"validation ({pool_slices.iloc[val_idx]['patient'].nunique()} validation patients); {training}")

# %%
out = ws.pretrain_dir(method)
positions = pool_slices["position"].to_numpy()
result = ssl.train_ssl(
    method, pool[train_idx], pool[val_idx], out, **training, seed=cfg["seed"],
    num_workers=params["trainer"]["num_workers"], trainer_kwargs=trainer_options(params["trainer"]),
    method_kwargs=method_kwargs, train_positions=positions[train_idx], val_positions=positions[val_idx],
)
history = result["history"]
main = is_main_process()  # under srun / torchrun every process runs this notebook; only the first writes
if main:
    history.to_csv(out / "history.csv", index=False)
history

# %%
if not history["embedding_std_ratio"].notna().any():
    print(f"{method}: no embedding, no collapse monitor (a reconstruction method)")
elif result["collapsed"]:
    print(f"WARNING: {method} COLLAPSED — the embeddings' spread is {history['embedding_std_ratio'].iloc[-1]:.3f} "
          "x 1/sqrt(d) (healthy is about 1). The encoder is exported anyway; treat its results with suspicion.")
else:
    print(f"{method}: no collapse (embedding std ratio {history['embedding_std_ratio'].iloc[-1]:.2f} x 1/sqrt(d))")

# %%
if main:
    ssl.save_pretrained(result["states"], ws.encoder_path(method), {
        "method": method, "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
        "best_val_loss": result["best_val_loss"], "collapsed": result["collapsed"],
        "parameters": {**training, **method_kwargs, "seed": cfg["seed"], "val_fraction": cfg["val_fraction"]},
        "image_size": training["image_size"], "data_manifest_sha256": prepared.manifest_hash,
        "pool_slices": {"train": len(train_idx), "val": len(val_idx), "train_by_source": seen},
    })
    print(json.dumps(json.loads(ws.encoder_path(method).with_suffix(".json").read_text()), indent=1)[:600])
    print("for other libraries:", *export.export_encoder(ws, method, prepared.manifest))

# %% [markdown]
# ## Loss curves (train and validation loss per epoch)

# %%
if main:
    figures.make(ws, f"pretrain_loss_{method}.png", {method: history}, f"{method} pretraining loss")
