"""Tests of cmr_utils.ssl: augmentations, dataset, collapse monitor, one short fit of each method,
encoder files. Synthetic slices only; the two fits run once per module (fixtures)."""
from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision

from cmr_utils import ssl
from cmr_utils.encoders import build_backbone

IMAGE_SIZE = 32
BATCH = 4
SEED = 7
# small heads: the ResNet18 is the part under test, and CPU time is short
SIMSIAM_KWARGS = {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 16}
SWAV_KWARGS = {
    "proj_hidden_dim": 64,
    "proj_dim": 16,
    "n_prototypes": 32,
    "queue_length": 8,
    "transform_kwargs": {"n_local": 2},
}
SHORT_FIT = {"limit_train_batches": 2, "limit_val_batches": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def synthetic_slices(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """Bright disc (a 'ventricle') at a random place over noise, float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = 0.2 * rng.random((n, size, size), dtype=np.float32)
    for i in range(n):
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] += 0.7
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def fit(method: str, out_dir, method_kwargs, max_epochs: int = 2):
    return ssl.train_ssl(
        method,
        synthetic_slices(16),
        synthetic_slices(6, seed=1),
        out_dir,
        image_size=IMAGE_SIZE,
        batch_size=BATCH,
        max_epochs=max_epochs,
        patience=3,
        lr=0.01,
        seed=SEED,
        trainer_kwargs=SHORT_FIT,
        method_kwargs=dict(method_kwargs),
    )


@pytest.fixture(scope="module")
def simsiam_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("simsiam")
    return out_dir, fit("simsiam", out_dir, SIMSIAM_KWARGS)


@pytest.fixture(scope="module")
def swav_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("swav")
    return out_dir, fit("swav", out_dir, SWAV_KWARGS, max_epochs=1)


# ---------------------------------------------------------------------------------------------
# augmentations and views


def test_grayscale_augmentation_keeps_one_channel_and_unit_range():
    augment = ssl.make_grayscale_augmentation(IMAGE_SIZE)
    torch.manual_seed(0)
    for image in (torch.rand(1, 40, 48), torch.ones(1, 40, 48), torch.zeros(1, 40, 48)):
        for _ in range(10):
            view = augment(image)
            assert view.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
            assert view.dtype == torch.float32
            assert 0.0 <= float(view.min()) and float(view.max()) <= 1.0


def test_grayscale_augmentation_changes_the_image():
    augment = ssl.make_grayscale_augmentation(IMAGE_SIZE)
    torch.manual_seed(0)
    image = torch.from_numpy(synthetic_slices(1)[0])[None]
    views = [augment(image) for _ in range(4)]
    assert not torch.equal(views[0], views[1])


def test_grayscale_augmentation_rejects_rgb_and_integer_images():
    augment = ssl.make_grayscale_augmentation(IMAGE_SIZE)
    with pytest.raises(ValueError, match="one channel"):
        augment(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float"):
        augment(torch.zeros(1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment(torch.full((1, 32, 32), 2.0))


def test_simsiam_transform_gives_two_views_at_image_size():
    views = ssl.make_simsiam_transform(IMAGE_SIZE)(torch.rand(1, 48, 48))
    assert [tuple(v.shape) for v in views] == [(1, IMAGE_SIZE, IMAGE_SIZE)] * 2


def test_swav_transform_gives_two_global_then_local_views():
    views = ssl.make_swav_transform(IMAGE_SIZE, n_local=3)(torch.rand(1, 48, 48))
    half = IMAGE_SIZE // 2
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, half, half)] * 3
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in views)


def test_slice_dataset_reads_a_memmap_without_loading_it(tmp_path):
    slices = synthetic_slices(5)
    np.save(tmp_path / "slices.npy", slices)
    memmap = np.load(tmp_path / "slices.npy", mmap_mode="r")
    dataset = ssl.SliceDataset(memmap, ssl.make_simsiam_transform(IMAGE_SIZE), fixed_seed=3)
    assert isinstance(dataset.slices, np.memmap)  # kept on disk, not copied
    assert len(dataset) == 5
    first, again = dataset[2], dataset[2]
    assert len(first) == 2 and first[0].shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # fixed seed: same views
    assert not torch.equal(dataset[2][0], dataset[3][0])


def test_slice_dataset_rejects_bad_arrays():
    transform = ssl.make_simsiam_transform(IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ssl.SliceDataset(np.zeros((4, 32), np.float32), transform)
    with pytest.raises(TypeError, match="float"):
        ssl.SliceDataset(np.zeros((4, 32, 32), np.uint8), transform)
    out_of_range = np.zeros((2, 32, 32), np.float32)
    out_of_range[1, 0, 0] = 255.0
    with pytest.raises(ValueError, match="slice 1"):
        ssl.SliceDataset(out_of_range, transform)[1]


# ---------------------------------------------------------------------------------------------
# collapse monitor


def test_embedding_std_of_identical_vectors_is_zero_and_collapsed():
    z = torch.tensor([[3.0, 4.0, 0.0]]).repeat(10, 1)
    std = ssl.embedding_std(z)
    assert std == pytest.approx(0.0, abs=1e-7)
    assert ssl.is_collapsed(std, 3)


def test_embedding_std_hand_computed():
    # rows normalise to (1, 0) and (0, 1); each column is {1, 0}: unbiased std sqrt(0.5)
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    assert ssl.embedding_std(z) == pytest.approx(math.sqrt(0.5), rel=1e-6)


def test_embedding_std_of_gaussian_vectors_is_one_over_sqrt_d():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 128, generator=generator)
    std = ssl.embedding_std(z)
    assert std == pytest.approx(1 / math.sqrt(128), rel=0.10)
    assert not ssl.is_collapsed(std, 128)


def test_is_collapsed_threshold_is_strict():
    assert not ssl.is_collapsed(0.05, 4)  # ratio exactly 0.1
    assert ssl.is_collapsed(0.04, 4)  # ratio 0.08
    with pytest.raises(ValueError, match="dim"):
        ssl.is_collapsed(0.1, 0)


# ---------------------------------------------------------------------------------------------
# methods and training


def test_get_method_lists_known_methods_for_an_unknown_one():
    assert ssl.get_method("swav").model is ssl.SwAVModule
    with pytest.raises(ValueError, match="simsiam, swav, mim, glcl"):
        ssl.get_method("byol")


def test_train_ssl_rejects_a_pool_smaller_than_the_batch(tmp_path):
    with pytest.raises(ValueError, match=r"3 slices.*batch_size=4"):
        ssl.train_ssl("simsiam", synthetic_slices(3), synthetic_slices(4), tmp_path,
                      image_size=32, batch_size=4, max_epochs=1, patience=1, lr=0.01, seed=0)
    with pytest.raises(ValueError, match="val_slices is empty"):
        ssl.train_ssl("simsiam", synthetic_slices(8), np.zeros((0, 32, 32), np.float32), tmp_path,
                      image_size=32, batch_size=4, max_epochs=1, patience=1, lr=0.01, seed=0)
    with pytest.raises(ValueError, match="unknown SSL method"):
        ssl.train_ssl("moco", synthetic_slices(8), synthetic_slices(4), tmp_path,
                      image_size=32, batch_size=4, max_epochs=1, patience=1, lr=0.01, seed=0)


def test_train_ssl_refuses_views_too_small_for_bf16_on_the_cpu(tmp_path):
    """SwAV at 32 px takes local views of 16 px by default: refused in bf16 on the CPU before any training (they
    trained to NaN), accepted in fp32 and with local views at the minimum size."""
    from cmr_utils.training import BF16_CPU_MIN_INPUT

    args = (synthetic_slices(8), synthetic_slices(4, seed=1))
    kwargs = dict(image_size=32, batch_size=4, max_epochs=1, patience=1, lr=0.01, seed=0)
    bf16 = {**SHORT_FIT, "precision": "bf16-mixed", "accelerator": "cpu"}
    with pytest.raises(ValueError, match=r"smallest swav view.*local_size.*is 16 px.*32-true"):
        ssl.train_ssl("swav", *args, tmp_path / "bf16", trainer_kwargs=bf16,
                      method_kwargs={**SWAV_KWARGS, "queue_length": 0}, **kwargs)
    assert not (tmp_path / "bf16").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"smallest simsiam view \(image_size 16\) is 16 px"):
        ssl.train_ssl("simsiam", synthetic_slices(8, size=16), synthetic_slices(4, size=16, seed=1),
                      tmp_path / "s16", trainer_kwargs=bf16, method_kwargs=SIMSIAM_KWARGS, **{**kwargs, "image_size": 16})
    at_minimum = {**SWAV_KWARGS, "queue_length": 0, "transform_kwargs": {"n_local": 2, "local_size": BF16_CPU_MIN_INPUT}}
    for name, trainer_kwargs, method_kwargs in [("fp32", {**SHORT_FIT, "precision": "32-true"}, SWAV_KWARGS),
                                                ("minimum", bf16, at_minimum)]:
        result = ssl.train_ssl("swav", *args, tmp_path / name, trainer_kwargs=trainer_kwargs,
                               method_kwargs=dict(method_kwargs), **kwargs)
        assert np.isfinite(result["history"]["train_loss"]).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_resnet18_bf16_gradients_match_fp32_from_the_minimum_input_size(threads):
    """The threshold of require_bf16_safe_input is right for the installed PyTorch: at BF16_CPU_MIN_INPUT px, every
    weight gradient of ResNet18 in bf16 autocast stays within a few times fp32's largest (below it, 1e37 was seen)."""
    import copy

    from cmr_utils.training import BF16_CPU_MIN_INPUT

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    for _ in range(3):
        bf16_model = build_backbone().to(memory_format=torch.channels_last)
        fp32_model = copy.deepcopy(bf16_model)
        x = torch.rand(8, 1, BF16_CPU_MIN_INPUT, BF16_CPU_MIN_INPUT).contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, 512)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bf16_model(x)
        (y.float() * w).sum().backward()
        (fp32_model(x) * w).sum().backward()
        for (name, p), q in zip(bf16_model.named_parameters(), fp32_model.parameters()):
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() <= 5 * q.grad.abs().max() + 1e-6, name


def check_run(out_dir, result, max_epochs, method_kwargs, model_class):
    history = result["history"]
    assert list(history.columns) == ssl.HISTORY_COLUMNS
    assert list(history["epoch"]) == list(range(max_epochs))
    assert result["epochs_run"] == max_epochs
    losses = history[["train_loss", "val_loss", "embedding_std"]].to_numpy()
    assert np.isfinite(losses).all()
    d = result["embedding_dim"]
    assert d == method_kwargs["proj_dim"]
    assert np.allclose(history["embedding_std_ratio"], history["embedding_std"] * math.sqrt(d))
    # the kept checkpoint is the best val_loss epoch
    assert result["best_val_loss"] == pytest.approx(history["val_loss"].min(), rel=1e-6)
    assert result["best_epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    best_std = float(history.loc[history["epoch"] == result["best_epoch"], "embedding_std"].iloc[0])
    assert result["collapsed"] == ssl.is_collapsed(best_std, d)
    assert str(out_dir) in result["best_checkpoint"]
    # the returned weights are the checkpoint's backbone, and training moved them from the seeded init
    state = result["backbone_state"]
    assert list(state) == list(build_backbone().state_dict())
    saved = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[key], saved["backbone." + key]) for key in state)
    import pytorch_lightning as pl

    kwargs = {k: v for k, v in method_kwargs.items() if k != "transform_kwargs"}
    pl.seed_everything(SEED, verbose=False)
    initial = model_class(lr=0.01, max_epochs=max_epochs, **kwargs).backbone.state_dict()
    assert not torch.equal(state["conv1.weight"], initial["conv1.weight"])


def test_train_ssl_simsiam_returns_best_backbone_and_history(simsiam_run):
    out_dir, result = simsiam_run
    check_run(out_dir, result, 2, SIMSIAM_KWARGS, ssl.SimSiamModule)


def test_train_ssl_swav_returns_best_backbone_and_history(swav_run):
    out_dir, result = swav_run
    check_run(out_dir, result, 1, SWAV_KWARGS, ssl.SwAVModule)


def test_train_ssl_keep_last_runs_every_epoch_and_returns_the_last(tmp_path):
    """keep="last": no early stopping, and the returned weights are the last epoch's checkpoint, whatever the loss."""
    result = ssl.train_ssl("simsiam", synthetic_slices(16), synthetic_slices(6, seed=1), tmp_path,
                           image_size=IMAGE_SIZE, batch_size=BATCH, max_epochs=3, patience=1, lr=0.01, seed=SEED,
                           trainer_kwargs=SHORT_FIT, method_kwargs=dict(SIMSIAM_KWARGS), keep="last")
    assert result["epochs_run"] == 3 and result["best_epoch"] == 2
    assert Path(result["best_checkpoint"]).name == "last-epoch=2.ckpt"
    saved = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(result["backbone_state"]["conv1.weight"], saved["backbone.conv1.weight"])
    with pytest.raises(ValueError, match="keep: expected 'best'"):
        ssl.train_ssl("simsiam", synthetic_slices(8), synthetic_slices(4), tmp_path, image_size=32, batch_size=4,
                      max_epochs=1, patience=1, lr=0.01, seed=0, keep="final")


def test_diverging_loss_raises_a_clear_error():
    module = ssl.SimSiamModule(**SIMSIAM_KWARGS)
    nan_views = [torch.full((2, 1, 32, 32), float("nan"))] * 2
    with pytest.raises(FloatingPointError, match="diverged"):
        module.training_step(nan_views, 0)


def test_swav_needs_at_least_as_many_prototypes_as_dimensions():
    with pytest.raises(ValueError, match=r"n_prototypes \(64\) must be at least proj_dim \(128\)"):
        ssl.SwAVModule(proj_dim=128, n_prototypes=64)


def test_swav_queue_is_used_only_once_filled():
    torch.manual_seed(0)
    module = ssl.SwAVModule(proj_hidden_dim=16, proj_dim=4, n_prototypes=5, queue_length=6)
    batch = [torch.randn(4, 4) for _ in range(2)]
    assert module._queue_prototypes(batch) is None  # empty queue: nothing to add yet
    assert int(module.queue_filled) == 4
    scores = module._queue_prototypes(batch)  # 4 entries queued by the first call
    assert [tuple(s.shape) for s in scores] == [(4, 5), (4, 5)]
    assert int(module.queue_filled) == 6  # capped at queue_length
    assert torch.equal(module.queues[0].bank[:4], batch[0])


# ---------------------------------------------------------------------------------------------
# encoder files


def test_save_and_load_encoder_round_trip_into_smp(simsiam_run, tmp_path):
    _, result = simsiam_run
    path = ssl.save_encoder(result["backbone_state"], tmp_path / "simsiam.pt", {"method": "simsiam", "seed": SEED})
    sidecar = json.loads((tmp_path / "simsiam.json").read_text())
    assert sidecar["method"] == "simsiam" and sidecar["seed"] == SEED
    assert sidecar["n_keys"] == len(result["backbone_state"])
    assert set(sidecar["versions"]) == {"torch", "lightly", "pytorch_lightning"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["simsiam.json", "simsiam.pt"]  # no temp left

    state = ssl.load_encoder_state(path)
    model = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=4)
    model.encoder.load_state_dict(state, strict=True)
    loaded = model.encoder.state_dict()
    assert all(torch.equal(loaded[key], result["backbone_state"][key]) for key in result["backbone_state"])


def test_load_encoder_drops_a_classifier_silently(tmp_path):
    state = build_backbone().state_dict()
    torch.save({**state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, tmp_path / "c.pt")
    assert list(ssl.load_encoder_state(tmp_path / "c.pt")) == list(state)


def test_load_encoder_names_missing_and_unexpected_keys(tmp_path):
    state = build_backbone().state_dict()
    missing = dict(state)
    del missing["layer4.1.bn2.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing\.pt.*missing keys: layer4\.1\.bn2\.weight"):
        ssl.load_encoder_state(tmp_path / "missing.pt")
    torch.save({**state, "head.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        ssl.load_encoder_state(tmp_path / "extra.pt")


def test_load_encoder_rejects_wrong_shapes(tmp_path):
    state = build_backbone().state_dict()
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match=r"shape mismatch: conv1\.weight \(64, 3, 7, 7\)"):
        ssl.load_encoder_state(tmp_path / "rgb.pt")
    resnet34 = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(resnet34, tmp_path / "resnet34.pt")
    with pytest.raises(ValueError, match=r"resnet34\.pt.*unexpected keys: layer1\.2\."):
        ssl.load_encoder_state(tmp_path / "resnet34.pt")


def test_load_encoder_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ssl.load_encoder_state(tmp_path / "nowhere.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="corrupt.pt is not a readable"):
        ssl.load_encoder_state(tmp_path / "corrupt.pt")
    torch.save(build_backbone().state_dict(), tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt is not a readable"):
        ssl.load_encoder_state(tmp_path / "cut.pt")
