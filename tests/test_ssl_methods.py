"""Tests of the pretraining registry and the whole-network methods (masked image modelling, global + local
contrastive): known answers of their masks and losses, what each method transfers, and the patient budgets that
measure them. Synthetic slices only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmr_utils import ssl
from cmr_utils.finetune import run_schedule, sample_budgets
from cmr_utils.models import build_fpn, build_segmentation_model, known_inits, pretrained_parts
from cmr_utils.params import ParameterError, load_profile, pretrain_settings, validate
from cmr_utils.budgets import patient_count
from cmr_utils.plan import budget_variants, kept_budgets
from cmr_utils.ssl.glcl import global_contrastive_loss, local_contrastive_loss, partition_of
from cmr_utils.ssl.mim import random_patch_mask
from test_ssl import synthetic_slices as slices  # bright discs over noise, float32 in [0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ------------------------------------------------------------------------------------------------ the registry
def test_every_registered_method_is_an_initialisation_with_a_colour_and_a_name():
    assert list(ssl.METHODS) == ["simsiam", "swav", "mim", "glcl"]
    assert known_inits() == ("random", "imagenet", "simsiam", "swav", "mim", "glcl")
    for name, method in ssl.METHODS.items():
        assert method.display and method.colour and method.summary and method.model.method_name == name
    assert pretrained_parts("simsiam") == ("encoder",) and pretrained_parts("mim") == ("encoder", "decoder")
    assert pretrained_parts("random") == ()
    with pytest.raises(ValueError, match="already registered"):
        ssl.register(ssl.METHODS["mim"])
    from dataclasses import replace

    with pytest.raises(ValueError, match="is a built-in initialisation"):  # the factory's own names stay its own
        ssl.register(replace(ssl.METHODS["mim"], name="imagenet"))
    assert list(ssl.METHODS) == ["simsiam", "swav", "mim", "glcl"]


def test_a_new_method_is_one_module(tmp_path, monkeypatch):
    """What the registry promises: a method written as one module (here a file outside the package, SimSiam's
    network under a new name at batch 8) reaches the parameter schema, the plan, pretraining, the model factory and
    the report's colours without a line changed anywhere else. In this process it is imported by hand; in the
    package, its import line in ``cmr_utils/ssl/__init__.py`` is what makes Make and the notebooks see it."""
    (tmp_path / "toy_method.py").write_text(
        "from cmr_utils.ssl.registry import Method, register\n"
        "from cmr_utils.ssl.simsiam import SimSiamModule\n"
        "from cmr_utils.ssl.views import make_simsiam_transform\n\n"
        "class ToyModule(SimSiamModule):\n"
        "    method_name = 'toy'\n\n"
        "register(Method(name='toy', display='Toy', colour='tab:olive', model=ToyModule,\n"
        "                views=make_simsiam_transform, defaults={'lr': 0.05, 'batch_size': 8}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    try:
        importlib.import_module("toy_method")
        assert "toy" in known_inits() and pretrained_parts("toy") == ("encoder",)
        params = load_profile("tiny")
        params["pretrain"]["methods"].append("toy")
        params["pretrain"]["toy"] = {"max_epochs": 1}
        params["finetune"]["inits"].append("toy")
        params = validate(params)
        training, _ = pretrain_settings(params, "toy")
        assert training["batch_size"] == 8 and training["max_epochs"] == 1  # its default, then the profile's block
        from cmr_utils.plan import finetune_runs
        from cmr_utils.plots import init_colour

        runs = finetune_runs(params)
        toy = sorted(r["name"] for r in runs if r["init"] == "toy")
        assert toy and toy == sorted(r["name"].replace("random-", "toy-") for r in runs if r["init"] == "random")
        result = ssl.train_ssl("toy", slices(16), slices(6, seed=1), tmp_path / "toy", image_size=32, batch_size=4,
                               max_epochs=1, patience=1, lr=0.05, seed=0,
                               trainer_kwargs={"limit_train_batches": 2, "limit_val_batches": 1})
        encoder = tmp_path / "out" / "encoder.pt"
        ssl.save_pretrained(result["states"], encoder, {"method": "toy"})
        model = build_segmentation_model("toy", encoder)
        for key, value in result["states"]["encoder"].items():
            assert torch.equal(model.encoder.state_dict()[key], value)
        assert init_colour("toy") == "tab:olive"
    finally:
        ssl.METHODS.pop("toy", None)
        sys.modules.pop("toy_method", None)
    assert list(ssl.METHODS) == ["simsiam", "swav", "mim", "glcl"]


def test_a_profile_block_overrides_only_what_it_names():
    params = load_profile("tiny")
    training, model = pretrain_settings(params, "swav")
    assert training["lr"] == 1.0e-3 and training["image_size"] == params["pretrain"]["image_size"]
    assert model["proj_dim"] == 16 and model["transform_kwargs"] == {"n_local": 2, "local_size": 24}
    del params["pretrain"]["glcl"]
    training, model = pretrain_settings(params, "glcl")  # no block: the registered defaults
    assert training["keep"] == "last" and training["max_epochs"] == 60 and model["global_epochs"] == 30
    params["pretrain"]["glcl"] = {"max_epochs": 4, "global_epochs": 2, "transform_kwargs": {"blur_prob": 0.0}}
    training, model = pretrain_settings(validate(params), "glcl")
    assert training["max_epochs"] == 4 and model["transform_kwargs"] == {"n_views": 2, "blur_prob": 0.0}


def test_glcl_settings_that_would_fail_in_stage_02_are_refused_when_the_profile_loads():
    params = load_profile("tiny")
    params["pretrain"]["glcl"] = {"max_epochs": 20}  # the registered global stage alone is 30 epochs
    with pytest.raises(ParameterError, match=r"pretrain.glcl: global_epochs \(30\) must be below max_epochs \(20\)"):
        validate(params)
    params["pretrain"]["glcl"] = {"max_epochs": 4, "global_epochs": 2, "keep": "best"}
    with pytest.raises(ParameterError, match="pretrain.glcl: keep: expected 'last'"):
        validate(params)
    params["pretrain"]["methods"] = ["simsiam"]  # a method the profile does not run is not checked
    params["finetune"]["inits"] = ["random", "simsiam"]
    validate(params)


def test_a_profile_block_with_an_unknown_key_or_method_is_refused():
    params = load_profile("tiny")
    params["pretrain"]["mim"] = {"mask_ration": 0.5}
    with pytest.raises(ParameterError, match=r"pretrain.mim: unknown key\(s\) \['mask_ration'\]"):
        validate(params)
    params = load_profile("tiny")
    params["pretrain"]["methods"] = ["simsiam", "byol"]
    with pytest.raises(ParameterError, match="unknown method 'byol'"):
        validate(params)
    params = load_profile("tiny")
    params["pretrain"]["methods"] = ["simsiam", "swav"]
    params["finetune"]["inits"] = ["random", "mim"]  # fine-tuned but never pretrained
    with pytest.raises(ParameterError, match=r"finetune.inits \['mim'\]: not pretrained"):
        validate(params)


@pytest.mark.parametrize("name", list(ssl.METHODS))
def test_each_method_gives_a_finite_loss_and_transfers_into_the_fpn(name):
    method = ssl.METHODS[name]
    _, kwargs = pretrain_settings(load_profile("tiny"), name)
    transform = method.views(32, **kwargs.pop("transform_kwargs", {}))
    torch.manual_seed(0)
    model = method.model(lr=1e-3, max_epochs=10, **kwargs)
    items = [transform(torch.from_numpy(s)[None]) for s in slices(4)]
    batch = [torch.stack(v) for v in zip(*items)]
    if method.positions:
        batch.append(torch.tensor([0.1, 0.3, 0.6, 0.9]))
    loss, _ = model.compute_loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    states = model.transfer_state()
    assert tuple(sorted(states)) == tuple(sorted(method.transfers))
    fpn = build_fpn()
    fpn.encoder.load_state_dict(states["encoder"], strict=True)
    if "decoder" in states:
        fpn.decoder.load_state_dict(states["decoder"], strict=True)


# ------------------------------------------------------------------------------------------------ masked images
def test_patch_mask_hides_exactly_the_ratio_of_whole_patches():
    mask = random_patch_mask(3, 32, 48, 8, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == (3, 1, 32, 48) and mask.dtype == torch.bool
    per_patch = mask.view(3, 4, 8, 6, 8).float().mean(dim=(2, 4))
    assert set(per_patch.unique().tolist()) == {0.0, 1.0}  # every 8 x 8 square wholly masked or wholly visible
    assert (per_patch.sum(dim=(1, 2)) == 12).all()  # 24 patches, half of them
    with pytest.raises(ValueError, match="multiple of patch_size"):
        random_patch_mask(1, 30, 32, 8, 0.5)


def test_masked_image_loss_counts_the_masked_pixels_only():
    module = ssl.MaskedImageModule(patch_size=8, mask_ratio=0.5).eval()
    image = torch.rand(2, 1, 32, 32)
    loss, embedding = module.compute_loss([image])
    assert embedding is None
    generator = torch.Generator().manual_seed(1234)  # validation draws its masks from this seed
    mask = random_patch_mask(2, 32, 32, 8, 0.5, generator)
    with torch.no_grad():
        output = module.network(image.masked_fill(mask, 0.0))
    expected = ((output - image) ** 2)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ contrastive
def test_partitions_of_the_short_axis():
    assert partition_of(torch.tensor([0.0, 0.24, 0.25, 0.5, 0.99]), 4).tolist() == [0, 0, 1, 2, 3]


def test_global_loss_is_low_when_partitions_cluster_and_log_n_when_all_alike():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    # each anchor: its positive at similarity 1, two negatives at 0, temperature 0.1
    expected = -math.log(math.exp(10) / (math.exp(10) + 2))
    assert global_contrastive_loss(clustered, labels, 0.1).item() == pytest.approx(expected, abs=1e-6)
    alike = torch.ones(4, 2)
    assert global_contrastive_loss(alike, labels, 0.1).item() == pytest.approx(math.log(3), rel=1e-5)


def test_local_loss_rewards_matching_regions_of_the_two_views():
    torch.manual_seed(0)
    f = torch.randn(2, 8, 8, 8)
    same = local_contrastive_loss(f, f, regions=4, temperature=0.1)
    shuffled = local_contrastive_loss(f, f[:, :, torch.randperm(8)], regions=4, temperature=0.1)
    assert same.item() < 0.5 < shuffled.item()


def test_dihedral_poses_are_undone_exactly():
    from cmr_utils.ssl.glcl import dihedral

    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    for k in range(8):
        poses = torch.tensor([k, 7 - k])
        turned = dihedral(x, poses)
        assert torch.equal(dihedral(turned, poses, inverse=True), x)
        assert k == 0 or not torch.equal(turned[0], x[0])  # every pose but the identity moves the image
    assert torch.equal(dihedral(x, torch.tensor([1, 4]))[0, 0, 0], x[0, 0, :, -1])  # a quarter turn: last column up


def test_glcl_freezes_the_encoder_in_its_local_stage():
    module = ssl.GlobalLocalContrastiveModule(global_epochs=1, max_epochs=2)
    module.trainer = None
    type(module).current_epoch = property(lambda self: self._epoch)  # the trainer's epoch, set by hand
    try:
        module._epoch = 0
        module.on_train_epoch_start()
        assert all(p.requires_grad for p in module.encoder.parameters())
        module._epoch = 1
        module.on_train_epoch_start()
        assert not any(p.requires_grad for p in module.encoder.parameters()) and not module.encoder.training
    finally:
        del type(module).current_epoch


def test_a_forced_glcl_stage_trains_only_its_part():
    torch.manual_seed(0)
    module = ssl.GlobalLocalContrastiveModule(global_epochs=1, max_epochs=2).train()
    batch = [torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32), torch.tensor([0.1, 0.3, 0.6, 0.9])]
    grads = {}
    for stage in module.stages:
        module.stage = stage
        module.on_train_epoch_start()
        module.zero_grad(set_to_none=True)
        module.compute_loss(batch)[0].backward()
        grads[stage] = {part: any(p.grad is not None for p in getattr(module, part).parameters())
                        for part in ("encoder", "decoder")}
    assert grads == {"global": {"encoder": True, "decoder": False}, "local": {"encoder": False, "decoder": True}}
    module.stage = "finetune"
    with pytest.raises(ValueError, match="expected one of"):
        module.compute_loss(batch)


# ------------------------------------------------------------------------------------------------ training
def test_train_and_save_a_whole_network_method(tmp_path):
    result = ssl.train_ssl("mim", slices(16), slices(6, seed=1), tmp_path / "mim", image_size=32, batch_size=4,
                           max_epochs=1, patience=1, lr=1e-3, seed=0, method_kwargs={"patch_size": 8},
                           trainer_kwargs={"limit_train_batches": 2, "limit_val_batches": 1})
    assert set(result["states"]) == {"encoder", "decoder"} and result["collapsed"] is False
    encoder = tmp_path / "out" / "encoder.pt"
    written = ssl.save_pretrained(result["states"], encoder, {"method": "mim"})
    assert [p.name for p in written] == ["encoder.pt", "decoder.pt"]
    model = build_segmentation_model("mim", encoder, decoder_path=tmp_path / "out" / "decoder.pt")
    for key, value in result["states"]["decoder"].items():
        assert torch.equal(model.decoder.state_dict()[key], value)
    with pytest.raises(ValueError, match="needs decoder_path"):
        build_segmentation_model("mim", encoder)
    with pytest.raises(ValueError, match="takes no decoder_path"):
        build_segmentation_model("simsiam", encoder, decoder_path=tmp_path / "out" / "decoder.pt")
    ssl.save_pretrained({"encoder": result["states"]["encoder"]}, encoder, {"method": "simsiam"})
    assert not (tmp_path / "out" / "decoder.pt").exists()  # no stale decoder beside an encoder-only method's file


def test_glcl_needs_the_slice_positions(tmp_path):
    with pytest.raises(ValueError, match="needs train_positions"):
        ssl.train_ssl("glcl", slices(8), slices(4), tmp_path, image_size=32, batch_size=4, max_epochs=2,
                      patience=1, lr=1e-3, seed=0)


# ------------------------------------------------------------------------------------------------ patient budgets
def test_patient_budgets_are_nested_whole_patients_the_same_for_every_initialisation():
    patients = np.repeat([f"patient{i:03d}" for i in range(10)], 4)
    budgets = sample_budgets(len(patients), ["all", "p1", "p3", "p7", 8], seed=2, patients=patients)
    chosen = {b: set(patients[budgets[b]]) for b in ("p1", "p3", "p7")}
    assert [len(chosen[b]) for b in ("p1", "p3", "p7")] == [1, 3, 7]
    assert chosen["p1"] < chosen["p3"] < chosen["p7"]
    assert len(budgets["p3"]) == 12  # every slice of the chosen patients
    again = sample_budgets(len(patients), ["p3"], seed=2, patients=patients)
    assert np.array_equal(again["p3"], budgets["p3"])
    assert np.array_equal(sample_budgets(len(patients), [8], seed=2)["8"], budgets["8"])  # slice budgets unchanged
    assert set(patients[sample_budgets(len(patients), ["p3"], seed=3, patients=patients)["p3"]]) != chosen["p3"]
    with pytest.raises(ValueError, match="only 10 patients"):
        sample_budgets(len(patients), ["p10"], seed=0, patients=patients)


def test_patient_budgets_in_the_plan_and_the_schedule():
    assert [patient_count(b) for b in ("p3", "all", 150, "p", "px")] == [3, None, None, None, None]
    ft = load_profile("acdc-cpu")["finetune"]
    assert budget_variants("p3", ft) == [("p3", "trained")]
    assert kept_budgets(["all", "p3", "p7", 150, 50], 100, 7) == (["all", "p3", 50], ["p7", 150])
    epochs, batch, every = run_schedule({**ft, "steps_patients": 600}, "p3", 60)  # 15 steps an epoch
    assert (epochs, batch, every) == (40, ft["batch_size_budget"], ft["val_every_budget"])
    assert run_schedule(ft, "all", 1000) == (ft["epochs"], ft["batch_size_all"], ft["val_every"])
    params = load_profile("tiny")
    params["finetune"]["budgets"] = ["all", "p0"]
    with pytest.raises(ParameterError, match="p<k>"):
        validate(params)
