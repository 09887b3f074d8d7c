"""Label budgets and one short fine-tuning run."""

import numpy as np
import pandas as pd
import pytest

from cmr_utils.finetune import SliceSegmentationDataset, load_trained_model, sample_budgets, train_segmentation


def test_budgets_are_nested_deterministic_and_within_the_training_split():
    budgets = sample_budgets(300, ["all", 200, 120, 50, 10], seed=3)
    assert len(budgets["all"]) == 300
    for small, large in (("10", "50"), ("50", "120"), ("120", "200")):
        assert set(budgets[small]) < set(budgets[large])
    assert all(b.max() < 300 and len(set(b)) == len(b) for b in budgets.values())
    again = sample_budgets(300, [10, 200], seed=3)
    assert np.array_equal(again["10"], budgets["10"]) and np.array_equal(again["200"], budgets["200"])
    assert not np.array_equal(sample_budgets(300, [50], seed=4)["50"], budgets["50"])


def test_budget_errors():
    with pytest.raises(ValueError, match="budget 500: larger than the 300 slices"):
        sample_budgets(300, [500], 0)
    with pytest.raises(ValueError, match="expected 'all' or a positive number"):
        sample_budgets(300, ["half"], 0)


def test_flips_are_joint():
    image = np.arange(64, dtype=np.float32).reshape(1, 8, 8) / 64
    label = (np.arange(64).reshape(1, 8, 8) % 4).astype(np.uint8)
    ds = SliceSegmentationDataset(image, label, flips=True)
    seen = set()
    for _ in range(40):
        x, y = ds[0]
        assert np.array_equal((x[0].numpy() * 64).round().astype(int) % 4, y.numpy())
        seen.add(float(x[0, 0, 0]))
    assert len(seen) == 4  # all four flip combinations occur


def synthetic(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(4, 7)
        d = np.hypot(yy - cy, xx - cx)
        lab = np.select([d < r, d < r + 3, (d < r + 7) & (xx < cx)], [3, 2, 1], 0).astype(np.uint8)
        images.append((lab * 0.25 + rng.normal(0, 0.05, lab.shape)).clip(0, 1).astype(np.float32))
        labels.append(lab)
    return np.stack(images), np.stack(labels)


def test_one_run_keeps_the_best_validation_checkpoint(tmp_path):
    x, y = synthetic(24)
    xv, yv = synthetic(8, seed=1)
    result = train_segmentation(x, y, xv, yv, tmp_path, init="random", indices=np.arange(16), seed=0, epochs=3,
                                batch_size=8, lr=1e-3, freeze_encoder=False, flips=True,
                                trainer={"accelerator": "cpu", "devices": 1, "precision": "32-true",
                                         "strategy": "auto", "num_workers": 0, "channels_last": False})
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert {"train_loss", "val_loss", "train_iou", "val_iou"} <= set(history.columns)
    assert result["best_epoch"] == int(history["val_iou"].idxmax())
    assert result["best_val_iou"] == pytest.approx(history["val_iou"].max())
    # the saved model reproduces the best epoch's validation IoU
    from cmr_utils import metrics
    from cmr_utils.explain import predict

    pred, _ = predict(load_trained_model(tmp_path), xv)
    assert metrics.study_iou(*metrics.slice_stats(pred, yv)) == pytest.approx(result["best_val_iou"], abs=1e-5)


def test_frozen_encoder_does_not_change(tmp_path):
    x, y = synthetic(16)
    train_segmentation(x, y, x[:4], y[:4], tmp_path, init="random", indices=np.arange(8), seed=1, epochs=1,
                       batch_size=4, lr=1e-2, freeze_encoder=True, flips=False,
                       trainer={"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto",
                                "num_workers": 0})
    import torch
    from cmr_utils.models import build_segmentation_model
    from pytorch_lightning import seed_everything

    seed_everything(1, verbose=False)
    fresh = build_segmentation_model("random")
    trained = load_trained_model(tmp_path)
    for key, value in fresh.encoder.state_dict().items():
        assert torch.equal(trained.encoder.state_dict()[key], value), key
    assert not all(torch.equal(trained.decoder.state_dict()[k], v) for k, v in fresh.decoder.state_dict().items())
