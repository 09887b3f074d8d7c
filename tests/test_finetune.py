"""Label budgets and one short fine-tuning run."""

import numpy as np
import pandas as pd
import pytest

import torch

from cmr_utils.augment import augment_batch
from cmr_utils.finetune import SliceBatches, lr_factor, load_trained_model, sample_budgets, slice_loader, train_segmentation


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
    with pytest.raises(ValueError, match="expected 'all', a positive number of slices or p<k>"):
        sample_budgets(300, ["half"], 0)


def test_flips_are_joint_and_reach_every_combination():
    image = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8) / 64
    label = (torch.arange(64).reshape(1, 8, 8) % 4)
    seen = set()
    for seed in range(40):
        x, y = augment_batch(image, label, flips=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal((x[0, 0] * 64).round().long() % 4, y[0])
        seen.add(float(x[0, 0, 0, 0]))
    assert len(seen) == 4  # all four flip combinations occur


def test_rotation_and_scale_move_image_and_label_together():
    x, y = synthetic(16, size=64)
    image, label = torch.from_numpy(x)[:, None], torch.from_numpy(y).long()
    out, lab = augment_batch(image, label, rotation_deg=30, scale=0.2, gamma=0.3,
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == image.shape and lab.shape == label.shape and lab.dtype == label.dtype
    assert not torch.equal(lab, label)  # something moved
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3}  # nearest sampling: no invented labels
    assert out.min() >= 0 and out.max() <= 1
    # the synthetic image is label * 0.25 + noise: after the same warp, image and label still agree
    inside = lab > 0
    agree = (out[:, 0].mul(4).round().clamp(0, 3).long() == lab)[inside].float().mean()
    assert agree > 0.6  # gamma bends intensities, so agreement is partial but far above chance (0.25)
    same, _ = augment_batch(image, label)  # every augmentation off: nothing changes
    assert torch.equal(same, image)


def test_crops_are_windows_of_the_slice_at_its_pixel_size():
    """``crop``: a crop x crop window at the slice's own pixel size, inside the slice, placed anew for every slice
    and every batch, image and label cut from the same place."""
    size, crop = 64, 32
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = ((yy // 8 + xx // 8) % 4)[None].repeat(6, 1, 1)  # 8-pixel squares of labels 0-3
    image = (0.5 + 0.1 * label.float())[:, None]  # positive everywhere: a pixel from outside the slice would be 0
    corners = set()
    for seed in range(4):
        out, lab = augment_batch(image, label, crop=crop, generator=torch.Generator().manual_seed(seed))
        assert out.shape == (6, 1, crop, crop) and lab.shape == (6, crop, crop) and lab.dtype == label.dtype
        assert out.min() > 0.45  # never outside the slice
        # same pixel size: the squares stay 8 pixels wide (count label changes along each row: 3-5 of them)
        changes = (lab[:, :, 1:] != lab[:, :, :-1]).sum(-1).float().mean()
        assert 3 <= changes <= 5, changes
        agree = ((out[:, 0] - 0.5) / 0.1).round().long() == lab
        assert agree.float().mean() > 0.8  # image and label from one window (bilinear blurs only the edges)
        corners.update(int(v) for v in lab[:, 0, 0])
    assert len(corners) > 1  # the window moves
    with pytest.raises(ValueError, match="crop must be a whole number of pixels up to the slices' 64 x 64, got 96"):
        augment_batch(image, label, crop=96)


def test_runs_that_train_the_encoder_crop_all_but_their_last_whole_epochs(tmp_path):
    """``whole_epochs``: every epoch but the last ``whole_epochs`` trains on crops, those on whole slices; a run with a
    frozen encoder never crops (on ACDC it cost a frozen encoder 0.08 validation Dice)."""
    import pytorch_lightning as pl

    from cmr_utils.finetune import SegmentationModule, crop_epochs

    assert [crop_epochs(14, 7, 96, False), crop_epochs(20, 7, 96, False), crop_epochs(14, 7, 96, True),
            crop_epochs(14, 0, 0, False), crop_epochs(3, 7, 96, False)] == [7, 13, 0, 0, 0]
    images, labels = synthetic(8, size=64)
    recipe = {**WORKING_RECIPE, "augment": {**WORKING_RECIPE["augment"], "crop": 32, "whole_epochs": 2}}
    for frozen, expected in ((False, [32, 32, 64, 64]), (True, [64, 64, 64, 64])):
        seen = []

        class Recording(SegmentationModule):
            def training_step(self, batch, batch_idx):
                seen.append(batch[0].shape[-1])
                return super().training_step(batch, batch_idx)

        module = Recording("random", lr=1e-3, freeze_encoder=frozen, recipe=recipe)
        trainer = pl.Trainer(max_epochs=4, limit_train_batches=1, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", devices=1)
        trainer.fit(module, slice_loader(SliceBatches(images, labels), 4, shuffle=True))
        assert seen == expected, (frozen, seen)


def test_in_memory_batches_are_gathers_of_the_chosen_slices():
    x, y = synthetic(10)
    ds = SliceBatches(x, y, indices=np.array([7, 2, 5]))
    assert len(ds) == 3
    batches = list(slice_loader(ds, batch_size=2, shuffle=True, seed=0))
    assert [len(b[0]) for b in batches] == [2]  # the last, short batch is dropped when shuffling
    seen = {float(img.sum()) for img in ds.images}
    assert {float(img.sum()) for img in batches[0][0]} <= seen
    full = list(slice_loader(ds, batch_size=2, shuffle=False))
    assert [len(b[0]) for b in full] == [2, 1] and torch.equal(full[0][1][0], torch.from_numpy(y[7]).long())


def test_learning_rate_schedules():
    assert [lr_factor(s, 100, 10, "constant") for s in (0, 9, 10, 99)] == [0.1, 1.0, 1.0, 1.0]
    assert lr_factor(10, 100, 10, "warmup_cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "warmup_cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "warmup_cosine") == pytest.approx(0.0)
    assert lr_factor(100, 100, 0, "poly") == pytest.approx(0.0) and lr_factor(0, 100, 0, "poly") == 1.0
    with pytest.raises(ValueError, match="finetune.schedule"):
        lr_factor(50, 100, 0, "step")


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


CPU = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto", "num_workers": 0,
       "channels_last": False}
WORKING_RECIPE = {"loss": "dice_ce", "optimizer": "adamw", "weight_decay": 1e-4, "schedule": "warmup_cosine",
                  "warmup_epochs": 1, "augment": {"flips": True, "rotation_deg": 10, "scale": 0.1, "gamma": 0.2}}


def test_one_run_keeps_the_best_validation_checkpoint(tmp_path):
    x, y = synthetic(24)
    xv, yv = synthetic(8, seed=1)
    result = train_segmentation(x, y, xv, yv, tmp_path, init="random", indices=np.arange(16), seed=0, epochs=3,
                                batch_size=8, lr=1e-3, freeze_encoder=False, trainer=CPU, recipe=WORKING_RECIPE)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert {"train_loss", "val_loss", "train_iou", "val_iou", "val_dice", "val_dice_LV"} <= set(history.columns)
    assert result["best_epoch"] == int(history["val_dice"].idxmax())
    assert result["best_val_dice"] == pytest.approx(history["val_dice"].max())
    # the saved model reproduces the best epoch's validation IoU
    from cmr_utils import metrics
    from cmr_utils.inference import predict

    model = load_trained_model(tmp_path)
    pred, _ = predict(model, xv)
    assert metrics.study_iou(*metrics.slice_stats(pred, yv)) == pytest.approx(result["best_val_iou"], abs=1e-5)
    assert result["precision"] == "32-true"
    # loaded channels-last (faster on a CPU), predicting what the same weights predict in the default layout
    from cmr_utils.models import build_segmentation_model

    assert model.encoder.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_segmentation_model("random")
    plain.load_state_dict(model.state_dict())
    assert not plain.encoder.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(predict(plain.eval(), xv)[0], pred)


def test_validating_every_other_epoch_selects_among_the_validated_epochs(tmp_path, capfd, monkeypatch):
    """val_every=2: epochs 1 and 3 of 4 are validated (the last always), the others have no validation scores in the
    history nor in the progress line, and the kept model is the best validated epoch's."""
    monkeypatch.setenv("CMR_PROGRESS", "plain")
    x, y = synthetic(16)
    xv, yv = synthetic(4, seed=1)
    result = train_segmentation(x, y, xv, yv, tmp_path, init="random", indices=np.arange(8), seed=0, epochs=4,
                                batch_size=8, lr=1e-3, freeze_encoder=False, trainer=CPU, recipe=WORKING_RECIPE,
                                val_every=2, name="every2")
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3] and history["train_loss"].notna().all()
    assert history["val_dice"].isna().tolist() == [True, False, True, False]
    assert result["best_epoch"] in (1, 3) and result["val_every"] == 2
    assert result["best_val_dice"] == pytest.approx(history["val_dice"].max())
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("every2: epoch")]
    assert ["val_dice" in line for line in lines] == [False, True, False, True], lines
    with pytest.raises(ValueError, match=r"val_every: expected a positive integer dividing epochs \(3\), got 2"):
        train_segmentation(x, y, xv, yv, tmp_path / "bad", init="random", indices=np.arange(8), seed=0, epochs=3,
                           batch_size=8, lr=1e-3, freeze_encoder=False, trainer=CPU, val_every=2)
    assert not (tmp_path / "bad").exists()


def test_frozen_encoder_does_not_change(tmp_path):
    x, y = synthetic(16)
    train_segmentation(x, y, x[:4], y[:4], tmp_path, init="random", indices=np.arange(8), seed=1, epochs=1,
                       batch_size=4, lr=1e-2, freeze_encoder=True, trainer=CPU)
    from cmr_utils.models import build_segmentation_model
    from pytorch_lightning import seed_everything

    seed_everything(1, verbose=False)
    fresh = build_segmentation_model("random")
    trained = load_trained_model(tmp_path)
    for key, value in fresh.encoder.state_dict().items():
        assert torch.equal(trained.encoder.state_dict()[key], value), key
    assert not all(torch.equal(trained.decoder.state_dict()[k], v) for k, v in fresh.decoder.state_dict().items())


def test_real_acdc_frozen_encoder_learns_with_dice_ce_but_not_with_dice_alone(tmp_path):
    """The root cause of the frozen-encoder runs that learned nothing (loss 0.754 at every epoch, every structure
    at Dice 0): the study's Dice loss alone, at Adam 1e-4, falls into predicting background everywhere, where the
    Dice gradient vanishes through the softmax. Dice + cross-entropy with the CPU profiles' schedule learns."""
    from conftest import real_dir

    from cmr_utils.prepare import normalise_volume, resize_volume
    from cmr_utils.readers import open_source

    source = open_source(real_dir("CMR_ACDC_DIR"))
    patients = source.patients()

    def slices(members):
        pairs = [resize_volume(normalise_volume(v.image), v.label, 64, "pad", 0.8)[:2] for v in source.volumes(members)]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

    x, y = slices(patients[:8])
    xv, yv = slices(patients[70:74])
    torch.set_num_threads(1)
    study = {"loss": "dice", "optimizer": "adam", "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0,
             "augment": {"flips": True, "rotation_deg": 0, "scale": 0, "gamma": 0}}
    runs = {}
    for name, recipe, lr in (("study", study, 1e-4), ("working", {**WORKING_RECIPE, "augment": study["augment"]}, 1e-3)):
        runs[name] = train_segmentation(x, y, xv, yv, tmp_path / name, init="random", indices=np.arange(len(x)),
                                        seed=0, epochs=4, batch_size=4, lr=lr, freeze_encoder=True, trainer=CPU,
                                        recipe=recipe)
        runs[name]["history"] = pd.read_csv(tmp_path / name / "history.csv")
    flat = runs["study"]["history"]["train_loss"]
    assert flat.iloc[1:].max() - flat.iloc[1:].min() < 0.01 and runs["study"]["best_val_dice"] < 0.05
    learning = runs["working"]["history"]["train_loss"]
    assert learning.iloc[-1] < learning.iloc[0] - 0.2 and runs["working"]["best_val_dice"] > 0.3


def test_trainer_deterministic_switches_pytorchs_deterministic_algorithms():
    """``trainer.deterministic``: true (the default) trains with deterministic algorithms (on a GPU, a warning where
    PyTorch has none); false allows the non-deterministic ones (the paper profiles: 3x faster on an H200); anything
    but a boolean is an error naming the parameter."""
    import pytorch_lightning as pl
    import torch

    from cmr_utils.training import trainer_options

    base = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "strategy": "auto"}
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for setting, enabled in ((None, True), (True, True), (False, False)):
            trainer = base if setting is None else {**base, "deterministic": setting}
            options = trainer_options(trainer)
            assert options["deterministic"] is enabled  # on the CPU strictly: every CPU operation has one
            torch.use_deterministic_algorithms(not enabled, warn_only=True)  # the opposite first: the Trainer sets it
            pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **options)
            assert torch.are_deterministic_algorithms_enabled() == enabled
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            on_gpu = trainer_options({**trainer, "accelerator": "gpu"})["deterministic"]
            assert on_gpu == ("warn" if enabled else False)
        with pytest.raises(ValueError, match="trainer.deterministic: expected true or false, got 'yes'"):
            trainer_options({**base, "deterministic": "yes"})
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_optimisers_take_the_fused_step_where_torch_has_one():
    """Fine-tuning's Adam/AdamW and pretraining's SGD (SimSiam) and Adam (SwAV) run torch's fused step on the CPU
    (a third of the multi-tensor step's time); the same update up to rounding; no fused step elsewhere."""
    import pytorch_lightning as pl

    from cmr_utils import ssl
    from cmr_utils.finetune import SegmentationModule
    from cmr_utils.training import fused_optimizer

    assert fused_optimizer([torch.nn.Parameter(torch.zeros(3))]) == {"fused": True}
    assert fused_optimizer([torch.nn.Parameter(torch.zeros(3, device="meta"))]) == {}
    assert fused_optimizer([]) == {}
    images, labels = synthetic(4)
    for optimizer in ("adam", "adamw"):
        module = SegmentationModule("random", lr=1e-3, recipe={**WORKING_RECIPE, "optimizer": optimizer})
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", devices=1)
        trainer.fit(module, slice_loader(SliceBatches(images, labels), 4, shuffle=True))
        assert trainer.optimizers[0].defaults["fused"] is True, optimizer
    for module in (ssl.SimSiamModule(max_epochs=2), ssl.SwAVModule(proj_hidden_dim=16, proj_dim=4, n_prototypes=8)):
        configured = module.configure_optimizers()
        optimiser = configured["optimizer"] if isinstance(configured, dict) else configured
        assert optimiser.defaults["fused"] is True, type(module).__name__

    # one fused AdamW step from the same state as the default one: the same weights up to rounding
    weights = torch.randn(64, 32)
    steps = []
    for options in ({}, {"fused": True}):
        p = torch.nn.Parameter(weights.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=1e-4, **options)
        for _ in range(3):
            p.grad = torch.sin(p.detach() * 3)
            opt.step()
        steps.append(p.detach())
    assert torch.allclose(steps[0], steps[1], atol=1e-6) and not torch.equal(steps[0], weights)


def test_validation_scores_are_stage_04s_scores_of_the_same_slices():
    """The epoch's validation IoU and Dice per structure, from the counts the module sums, equal ``metrics``'
    study IoU and ``structure_scores`` of the stacked slices, an absent structure (RV here) included: Dice 1."""
    import types

    from cmr_utils import metrics
    from cmr_utils.finetune import SegmentationModule

    target = np.zeros((2, 6, 6), dtype=np.int64)
    pred = target.copy()
    target[0, 1:4, 1:4], pred[0, 1:4, 2:5] = 3, 3  # LV: tp 6, fp 3, fn 3
    target[1, 0, :4], pred[1, 0, :2] = 2, 2  # MYO: tp 2, fn 2
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 4).permute(0, 3, 1, 2).float()

    class Module:  # what _step and _log_scores use of a SegmentationModule, its "model" predicting ``pred``
        trainer, device, _stats, logged = types.SimpleNamespace(world_size=1), "cpu", {}, {}

        def __call__(self, image):
            return logits

        def loss(self, logits, label):
            return logits.sum() * 0

        def log(self, name, value, **_):
            self.logged[name] = float(value)

    module = Module()
    SegmentationModule._step(module, (torch.zeros(2, 1, 6, 6), torch.from_numpy(target)), "val")
    SegmentationModule._log_scores(module, "val")
    logged = module.logged
    scores = metrics.structure_scores(pred, target)
    evaluated = metrics.study_iou(*metrics.slice_stats(pred, target))
    assert logged["val_iou"] == pytest.approx(evaluated) and evaluated == pytest.approx(8 / 16)
    dice = {name: s["dice"] for name, s in scores.items()}
    assert {name: logged[f"val_dice_{name}"] for name in scores} == pytest.approx(dice)
    assert dice == pytest.approx({"RV": 1.0, "MYO": 2 / 3, "LV": 2 / 3})
    assert logged["val_dice"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_pretrained_weights_get_the_scaled_learning_rate(tmp_path):
    from cmr_utils.encoders import build_backbone
    from cmr_utils.finetune import SegmentationModule
    from cmr_utils.models import build_fpn
    from cmr_utils.ssl.train import save_pretrained

    encoder_path = tmp_path / "encoder.pt"
    save_pretrained({"encoder": build_backbone().state_dict(), "decoder": build_fpn(4).decoder.state_dict()},
                    encoder_path, {"method": "mim"})
    recipe = {**WORKING_RECIPE, "pretrained_lr_scale": 0.1}

    def group_sizes(module):
        return [(g["lr"], sum(p.numel() for p in g["params"])) for g in module.parameter_groups()]

    model = build_fpn(4)
    n_encoder, n_decoder, n_head = (sum(p.numel() for p in part.parameters())
                                    for part in (model.encoder, model.decoder, model.segmentation_head))
    random = SegmentationModule("random", lr=1e-3, recipe=recipe)
    assert group_sizes(random) == [(1e-3, n_encoder + n_decoder + n_head)]  # nothing pretrained: one lr
    simsiam = SegmentationModule("simsiam", str(encoder_path), lr=1e-3, recipe=recipe)
    assert group_sizes(simsiam) == [(1e-3, n_decoder + n_head), (pytest.approx(1e-4), n_encoder)]
    mim = SegmentationModule("mim", str(encoder_path), lr=1e-3, recipe=recipe,
                             decoder_path=str(encoder_path.with_name("decoder.pt")))
    assert group_sizes(mim) == [(1e-3, n_head), (pytest.approx(1e-4), n_encoder + n_decoder)]
    frozen = SegmentationModule("simsiam", str(encoder_path), lr=1e-3, freeze_encoder=True, recipe=recipe)
    assert group_sizes(frozen) == [(1e-3, n_decoder + n_head)]  # a frozen encoder is not in the optimiser
    with pytest.raises(ValueError, match=r"finetune.pretrained_lr_scale: expected a number in \(0, 1\], got 0"):
        SegmentationModule("random", lr=1e-3, recipe={**recipe, "pretrained_lr_scale": 0}).parameter_groups()
