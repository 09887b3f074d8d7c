"""The one model factory: every initialisation, strict encoder loading, both ImageNet paths."""
import time

import pytest
import torch

from cmr_utils.encoders import build_backbone
from cmr_utils.models import (
    SumMerge,
    WeightsUnavailable,
    build_segmentation_model,
    fold_to_one_channel,
    load_encoder_strict,
)


def torchvision_resnet18_state(seed=0):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()  # 3-channel conv1 and fc.*: the real format


def test_random_init_has_one_input_channel_and_four_classes():
    model = build_segmentation_model("random").eval()
    assert model.encoder.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4, 64, 64)


def test_backbone_keys_are_the_smp_encoder_keys():
    assert set(build_backbone().state_dict()) == set(build_segmentation_model("random").encoder.state_dict())


def test_imagenet_from_a_filled_cache_loads_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = torchvision_resnet18_state(seed=7)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_segmentation_model("imagenet")
    loaded = model.encoder.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    for key in ("bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.weight"):
        assert torch.equal(loaded[key], state[key])


def test_imagenet_offline_with_empty_cache_fails_fast_and_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for offline in ("1", "0"):  # announced offline, and a real (failing) download attempt
        monkeypatch.setenv("CMR_OFFLINE", offline)
        started = time.time()
        with pytest.raises(WeightsUnavailable, match=r"resnet18-f37072fd\.pth") as err:
            build_segmentation_model("imagenet")
        assert time.time() - started < 10
        assert str(tmp_path / "hub" / "checkpoints") in str(err.value)
    assert not list((tmp_path / "hub" / "checkpoints").glob("*.pth"))  # nothing half-downloaded left


def test_ssl_encoder_loads_strictly(tmp_path):
    from cmr_utils.encoders import save_encoder

    backbone = build_backbone()
    torch.nn.init.normal_(backbone.layer3[0].conv1.weight)
    path = tmp_path / "encoder.pt"
    save_encoder(backbone.state_dict(), path, {"method": "simsiam"})
    model = build_segmentation_model("simsiam", encoder_path=path)
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key


def test_strict_loading_rejects_partial_and_foreign_checkpoints():
    encoder = build_segmentation_model("random").encoder
    state = fold_to_one_channel(torchvision_resnet18_state())
    del state["layer4.1.bn2.bias"]
    with pytest.raises(ValueError, match=r"missing \['layer4.1.bn2.bias'\]"):
        load_encoder_strict(encoder, state, "ckpt")
    state = fold_to_one_channel(torchvision_resnet18_state())
    state["projection_head.0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unexpected.*projection_head"):
        load_encoder_strict(encoder, state, "ckpt")
    state = torchvision_resnet18_state()
    state.pop("fc.weight"), state.pop("fc.bias")
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1.weight: \(64, 3, 7, 7\)"):
        load_encoder_strict(encoder, state, "ckpt")


def test_unknown_init_and_missing_encoder_path():
    with pytest.raises(ValueError, match="init: expected one of"):
        build_segmentation_model("moco")
    with pytest.raises(ValueError, match="needs encoder_path"):
        build_segmentation_model("swav")


def test_sum_merge_gives_smp_fpn_output():
    """The factory's FPN adds the pyramid maps one by one (SumMerge) instead of smp's stack-and-sum: the same model,
    the same weights and outputs as smp's own FPN, in train mode (the same dropout; with gradients) and in
    eval mode."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    ours = build_segmentation_model("random")
    assert isinstance(ours.decoder.merge, SumMerge)
    reference = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=4)
    assert type(reference.decoder.merge).__name__ == "MergeBlock" and reference.decoder.merge.policy == "add"
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(reference, mode)()
        outputs = []
        for model in (ours, reference):
            torch.manual_seed(1)  # the same dropout masks
            outputs.append(model(x))
        a, b = outputs
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (mode, (a - b).abs().max())
    ours.train(), reference.train()
    for model in (ours, reference):
        torch.manual_seed(2)
        model(x).square().mean().backward()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
