"""Several processes on this CPU (Lightning's DDP over gloo): fine-tuning, SimSiam and SwAV with two processes.

Each training runs in a fresh interpreter that first uses torch's thread pool, then lets Lightning fork its two
processes (``ddp_notebook``, which ``strategy: auto`` becomes), as a notebook's kernel does: pytest's own process
has run many tests' threads, and forking it is not what a user's run looks like. Every file renamed into place
(``os.replace``: how ``cmr_utils.files`` writes atomically) is recorded with the writing process, so the tests see
who wrote what, and how often.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from cmr_utils.distributed import ShardedBatches
from cmr_utils.paths import PROJ_ROOT

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

PRELUDE = f"""
import json, os, sys
sys.path.insert(0, {TESTS_DIR!r})
import numpy as np
import torch

MAIN = os.getpid()
_replace = os.replace
def _recorded_replace(src, dst, *args, **kwargs):
    with open("writes.log", "a") as log:
        log.write(f"{{os.getpid()}} {{os.path.relpath(os.fspath(dst))}}\\n")
    return _replace(src, dst, *args, **kwargs)
os.replace = _recorded_replace

# a kernel that has already used torch's thread pool before its training cell
torch.set_num_threads(2)
torch.ones(256, 256) @ torch.ones(256, 256)
TRAINER = {{"accelerator": "cpu", "devices": 2, "num_nodes": 1, "precision": "32-true", "strategy": "auto",
           "num_workers": 0, "channels_last": False}}
"""


SCRIPT = PRELUDE + """
from cmr_utils import ssl
from cmr_utils.files import write_json_atomic
from cmr_utils.finetune import train_segmentation
from cmr_utils.training import trainer_options
from test_finetune import WORKING_RECIPE, synthetic

out = {"main": MAIN}
x, y = synthetic(16)
xv, yv = synthetic(7, seed=1)  # odd: the two processes score 4 and 3 slices
result = train_segmentation(x, y, xv, yv, "finetune", init="random", indices=np.arange(16), seed=0, epochs=2,
                            batch_size=4, lr=3e-3, freeze_encoder=False, trainer=TRAINER, recipe=WORKING_RECIPE)
write_json_atomic("finetune/result.json", result)  # as the notebook does
out["finetune"] = {"processes": result["processes"], "best_epoch": result["best_epoch"]}

slices = np.random.default_rng(0).random((24, 32, 32), dtype=np.float32)
METHOD_KWARGS = {
    "simsiam": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 8},
    # the queue from the first step: the distributed queue and Sinkhorn step take part
    "swav": {"proj_dim": 16, "n_prototypes": 16, "queue_length": 16, "start_queue_at_epoch": 0,
             "transform_kwargs": {"n_local": 1}},
}
for method, kwargs in METHOD_KWARGS.items():
    result = ssl.train_ssl(method, slices[:16], slices[16:], method, image_size=32, batch_size=8, max_epochs=2,
                           patience=2, lr=1e-3, seed=0, trainer_kwargs=trainer_options(TRAINER), method_kwargs=kwargs)
    ssl.save_encoder(result["backbone_state"], f"{method}/encoder.pt", {"method": method})  # as the notebook does
    history = result["history"]
    out[method] = {"epochs": history["epoch"].tolist(), "train_loss": history["train_loss"].tolist(),
                   "val_loss": history["val_loss"].tolist(), "ratio": history["embedding_std_ratio"].tolist(),
                   "best_val_loss": result["best_val_loss"]}

# SwAV's queue and Sinkhorn step on two processes, each with half of a global batch, against one process
from lightly.loss.swav_loss import sinkhorn
from cmr_utils.ssl import SwAVModule

def codes(module, z):
    # the queue step, then Sinkhorn over this process's batch and share of the queue (as SwaVLoss does)
    queued = module._queue_prototypes([z, z])
    scores = module.prototypes(z, 0).float()
    if queued is not None:
        scores = torch.cat([scores, queued[0]])
    return sinkhorn(scores, gather_distributed=True)[: len(z)], module.queues[0].bank.clone()

def swav_module():
    torch.manual_seed(0)
    return SwAVModule(proj_dim=8, n_prototypes=8, queue_length=12)

batches = [torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(s)), dim=1)
           for s in range(3)]
single = swav_module()
expected = [codes(single, b) for b in batches]  # steps 2 and 3 use the queue that the earlier steps filled

def rank(r, world):
    torch.set_num_threads(1)  # forked from a process that used several threads (see OneThreadWhenForked)
    torch.distributed.init_process_group("gloo", rank=r, world_size=world)
    module = swav_module()
    for b, (q, bank) in zip(batches, expected):
        got, got_bank = codes(module, b.tensor_split(world)[r])
        torch.testing.assert_close(got, q.tensor_split(world)[r], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_bank, bank)
    torch.distributed.destroy_process_group()

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + os.getpid() % 20000))
torch.multiprocessing.start_processes(rank, args=(2,), nprocs=2, start_method="fork")
out["swav_codes"] = {"queue_used": bool(expected[2][1].abs().sum() > 0), "checked_steps": len(batches)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Fine-tuning, SimSiam and SwAV, each on two processes, in one fresh interpreter (imports cost ~10 s here)."""
    cwd = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJ_ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=cwd, capture_output=True, text=True, timeout=400,
                          env=env)
    if done.returncode != 0:
        pytest.fail(f"two-process runs failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return cwd, json.loads(done.stdout.strip().splitlines()[-1])


def assert_written_once_by_the_main_process(runs, names: set[str]) -> None:
    cwd, out = runs
    lines = (line.split() for line in (cwd / "writes.log").read_text().splitlines())
    recorded = [(int(pid), path) for pid, path in lines if path in names]
    assert sorted(path for _, path in recorded) == sorted(names), recorded  # each exactly once
    assert {pid for pid, _ in recorded} == {out["main"]}, recorded  # by the notebook's process, never a forked rank
    assert not list(cwd.rglob("*.tmp")), "a temporary file was left behind"


def test_sharded_batches_give_each_process_its_own_share(monkeypatch):
    """Training: the two processes' parts of every batch are disjoint and together the single-process batch.
    Evaluation: every item once, no padding (7 items: shares of 4 and 3)."""
    import cmr_utils.distributed as D

    def batches(n, batch, shuffle, rank, world, epoch=0):
        monkeypatch.setattr(D, "rank_and_world", lambda: (rank, world))
        sampler = ShardedBatches(n, batch, shuffle, seed=3)
        sampler.set_epoch(epoch)
        return list(sampler)

    single = batches(22, 8, True, 0, 1)
    assert [len(b) for b in single] == [8, 8]  # the short last batch is dropped
    parts = [batches(22, 8, True, rank, 2) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 2  # the same number of steps on each process
    for step, whole in enumerate(single):
        assert not set(parts[0][step]) & set(parts[1][step])
        assert sorted(parts[0][step] + parts[1][step]) == sorted(whole)
    assert batches(22, 8, True, 0, 1, epoch=1) != single  # a new permutation each epoch
    evaluation = [batches(7, 32, False, rank, 2) for rank in (0, 1)]
    assert evaluation == [[[0, 1, 2, 3]], [[4, 5, 6]]]
    with pytest.raises(ValueError, match="batch size 6 is not a multiple of the 4 processes"):
        batches(22, 6, True, 0, 4)


def test_fine_tuning_on_two_processes_scores_the_whole_validation_set(runs):
    from test_finetune import synthetic

    from cmr_utils.finetune import load_trained_model

    cwd, out = runs
    assert out["finetune"]["processes"] == 2
    assert_written_once_by_the_main_process(runs, {"finetune/model.pt", "finetune/history.csv",
                                                   "finetune/result.json"})
    history = pd.read_csv(cwd / "finetune" / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    best = history.loc[history["epoch"] == out["finetune"]["best_epoch"]].iloc[0]
    assert best["val_dice"] == history["val_dice"].max()

    # the same checkpoint evaluated in this one process, on the same 7 slices, counted here with numpy
    xv, yv = synthetic(7, seed=1)
    with torch.no_grad():
        pred = load_trained_model(cwd / "finetune")(torch.from_numpy(xv)[:, None]).argmax(1).numpy()
    tp = np.array([((pred == c) & (yv == c)).sum() for c in (1, 2, 3)], dtype=float)
    fp = np.array([((pred == c) & (yv != c)).sum() for c in (1, 2, 3)], dtype=float)
    fn = np.array([((pred != c) & (yv == c)).sum() for c in (1, 2, 3)], dtype=float)
    dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    assert tp.sum() > 0, "the check needs a model that finds some structure"
    assert best["val_iou"] == pytest.approx(tp.sum() / (tp + fp + fn).sum(), abs=1e-6)
    for name, value in zip(("RV", "MYO", "LV"), dice):
        assert best[f"val_dice_{name}"] == pytest.approx(value, abs=1e-6), name
    assert best["val_dice"] == pytest.approx(dice.mean(), abs=1e-6)


@pytest.mark.parametrize("method", ["simsiam", "swav"])
def test_pretraining_on_two_processes(runs, method):
    cwd, out = runs
    run = out[method]
    assert run["epochs"] == [0, 1]
    assert np.isfinite(run["train_loss"]).all() and np.isfinite(run["val_loss"]).all()
    assert np.isfinite(run["ratio"]).all() and min(run["ratio"]) > 0
    assert run["best_val_loss"] == min(run["val_loss"])
    assert_written_once_by_the_main_process(runs, {f"{method}/encoder.pt", f"{method}/encoder.json"})
    from cmr_utils.encoders import load_encoder_state

    assert len(load_encoder_state(cwd / method / "encoder.pt")) > 0


def test_swav_codes_and_queue_on_two_processes_are_the_single_process_ones(runs):
    """Checked inside the two processes (an assertion there fails the run): for three steps, each process's
    Sinkhorn codes are its rows of the single-process codes of the whole batch, and its queue is the
    single-process queue."""
    assert runs[1]["swav_codes"] == {"queue_used": True, "checked_steps": 3}
