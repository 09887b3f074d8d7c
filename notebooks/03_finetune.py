# ---
# jupyter:
#   kernelspec:
#     display_name: Python (cmr-ssl)
#     language: python
#     name: cmr-ssl
# ---

# %% [markdown]
# # 03 · Fine-tuning one run: FPN-ResNet18 on a label budget
#
# **Inputs**: the prepared slices of stage 01; for a pretrained initialisation, what stage 02 exported: the encoder,
# and the decoder for the methods that pretrain it (the output head is always new).
# **Outputs**: `runs/<data>/<profile>/finetune/<run>/`: `model.pt` (the epoch with the best validation Dice),
# `plans.json` (all the run needs to predict: preprocessing, test-time flips, labels, model, recipe, versions; the
# folder alone is the model), `history.csv`, `labelled_slices.csv` (the run's label budget) and `result.json`.
# **Parameters**: `run` = `{init}-{budget}-s{seed}` and `params/<profile>.yaml`, sections `finetune`, `trainer`.
#
# The label budget is drawn from the training split only, nested across budgets for a given seed (150 within
# 500 within 700 within 1200; `p1` within `p3` within `p7`, every slice of 1, 3 or 7 training patients, the same
# patients for every initialisation). The encoder is frozen below `finetune.freeze_below` slices, as in the study
# (a patient budget always trains it; a pretrained decoder is always trained); with
# `budgets_below_freeze: frozen_and_trained` each such budget also has a `<budget>-trained` run (e.g.
# `random-150-trained-s0`): the same slices, the encoder trained. The validation split chooses the epoch; the test
# split is not touched here.

# %% tags=["parameters"]
profile = "default"
data = ""
run = "random-all-s0"

# %%
from cmr_utils import paths
from cmr_utils.distributed import is_main_process
from cmr_utils.files import write_json_atomic
from cmr_utils.finetune import run_schedule, sample_budgets, train_segmentation
from cmr_utils.models import WeightsUnavailable, pretrained_parts
from cmr_utils.params import RECIPE_KEYS, load_profile
from cmr_utils.plan import plan_runs
from cmr_utils.plans import Preprocessing
from cmr_utils.prepare import Prepared

params = load_profile(profile)
cfg = params["finetune"]
sweep = plan_runs(profile, data)  # the Makefile's plan: budgets >= the training split's slice count are dropped
plan = {r["name"]: r for r in sweep.runs}
if run not in plan:
    raise ValueError(sweep.refuse(run))
init, budget, seed = plan[run]["init"], plan[run]["budget"], plan[run]["seed"]
ws = paths.workspace(profile, data)
out = ws.finetune_dir(run)
out.mkdir(parents=True, exist_ok=True)
prepared = Prepared.open(ws.prepared)

# %%
train_slices = prepared.slices("train")
if len(train_slices) != sweep.n_train_slices:
    raise RuntimeError(f"the prepared training split has {len(train_slices)} slices, the plan counted "
                       f"{sweep.n_train_slices} in {sweep.folder}: stage 01 is out of date; re-run it")
budgets = sample_budgets(len(train_slices), sweep.budgets, seed, train_slices["patient"])  # nested per seed
indices = budgets[plan[run]["slices"]]  # a `150-trained` run: the slices of `150`, same seed
main = is_main_process()  # under srun / torchrun every process runs this notebook; only the first writes
if main:
    train_slices.iloc[indices][["patient", "phase", "slice"]].to_csv(out / "labelled_slices.csv")
frozen = len(indices) < cfg["freeze_below"] and plan[run]["encoder"] != "trained"  # the study's rule
epochs, batch_size, val_every = run_schedule(cfg, budget, len(indices))
parts = pretrained_parts(init)  # () for random and imagenet; the encoder, and the decoder for whole-network methods
print(f"{run}: {len(indices)} labelled slices from {train_slices.iloc[indices]['patient'].nunique()} patients; "
      f"encoder {'frozen' if frozen else 'trained'}; batch size {batch_size}; {epochs} epochs")

# %%
try:
    result = train_segmentation(
        prepared.images("train"), prepared.labels("train"), prepared.images("val"), prepared.labels("val"), out,
        init=init, indices=indices, seed=seed, epochs=epochs, batch_size=batch_size, lr=cfg["lr"],
        freeze_encoder=frozen, trainer=params["trainer"], name=run, val_every=val_every,
        recipe={k: cfg[k] for k in RECIPE_KEYS},
        encoder_path=ws.encoder_path(init) if "encoder" in parts else None,
        decoder_path=ws.decoder_path(init) if "decoder" in parts else None,
        preprocessing=Preprocessing.from_manifest(prepared.manifest, str(ws.prepared / "manifest.json")),
        test_time_flips=params["evaluate"]["test_time_flips"],  # written into plans.json with the model
    )
except WeightsUnavailable as err:
    # recorded, not hidden: the report lists this initialisation as unavailable (never trained from random)
    result = {"status": "unavailable", "init": init, "seed": seed, "reason": str(err)}
    print(f"UNAVAILABLE: {err}")
result.update(run=run, budget=budget, data_manifest_sha256=prepared.manifest_hash)
if main:
    write_json_atomic(out / "result.json", result)
result
