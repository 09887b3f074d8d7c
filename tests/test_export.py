"""The exported encoder (cmr_utils.export): loads into torchvision, timm and smp and gives the project's features on a
grey image; its model card says what it is and how to feed it."""
import pytest
import torch

MANIFEST = {"sources": [{"folder": "/data/ACDC", "layout": "acdc-nifti", "patients": 100, "role": "labelled"},
                        {"folder": "/data/Sunnybrook", "layout": "dicom", "patients": 5, "role": "pretraining only"}],
            "geometry": "physical", "target_spacing": 1.4, "window_mm": 179.2, "image_size": 128, "resize": "pad",
            "field_of_view": 1.0, "normalise_percentiles": [1.0, 99.0]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """A simsiam encoder as stage 02 saves it (random weights, BatchNorm statistics away from their initial values so
    that eval mode uses them), exported."""
    from cmr_utils.encoders import build_backbone
    from cmr_utils.export import export_encoder
    from cmr_utils.paths import workspace
    from cmr_utils.ssl.train import save_pretrained

    ws = workspace("tiny", str(tmp_path_factory.mktemp("export-data")))
    torch.manual_seed(0)
    backbone = build_backbone()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    save_pretrained({"encoder": backbone.state_dict()}, ws.encoder_path("simsiam"), {
        "method": "simsiam", "epochs_run": 7, "best_epoch": 5, "best_val_loss": -0.91, "collapsed": False,
        "parameters": {"lr": 0.05}, "image_size": 96, "data_manifest_sha256": "ab" * 32,
        "pool_slices": {"train": 1234, "val": 150, "train_by_source": {"ACDC": 1000, "Sunnybrook": 234}}})
    return ws, backbone.eval(), export_encoder(ws, "simsiam", MANIFEST)


def test_the_export_loads_into_torchvision_timm_and_smp_with_the_projects_features(exported):
    import segmentation_models_pytorch as smp
    import timm
    import torchvision
    from safetensors.torch import load_file

    from cmr_utils.models import build_segmentation_model

    ws, backbone, (tensors_path, _) = exported
    assert tensors_path == ws.pretrain_dir("simsiam") / "encoder.safetensors"
    state = load_file(tensors_path)
    assert not any(k.startswith("fc.") for k in state) and state["conv1.weight"].shape == (64, 3, 7, 7)
    # summed over its channels, conv1 is the project's single-channel kernel again (smp's rule for in_channels=1)
    assert torch.allclose(state["conv1.weight"].sum(1, keepdim=True), backbone.conv1.weight, atol=1e-6)
    grey = torch.rand(2, 1, 64, 64)
    rgb = grey.repeat(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone(grey)  # the project's pooled features (B, 512)
        tv = torchvision.models.resnet18()
        missing, unexpected = tv.load_state_dict(state, strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
        tv.fc = torch.nn.Identity()
        assert torch.allclose(tv.eval()(rgb), expected, rtol=1e-4, atol=1e-5)
        tm = timm.create_model("resnet18", pretrained=False, num_classes=0)  # no classifier: a strict load
        tm.load_state_dict(state, strict=True)
        assert torch.allclose(tm.eval()(rgb), expected, rtol=1e-4, atol=1e-5)
        encoder = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=4).encoder
        encoder.load_state_dict(state, strict=True)
        ours = build_segmentation_model("simsiam", encoder_path=ws.encoder_path("simsiam")).encoder.eval()
        features, reference = encoder.eval()(rgb), ours(grey)
        assert len(features) == len(reference) == 6
        for level, (a, b) in enumerate(zip(features[1:], reference[1:]), start=1):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5), level


def test_the_model_card_says_what_the_encoder_is_and_how_to_feed_it(exported):
    from cmr_utils.provenance import git_state

    ws, _, (_, card_path) = exported
    card = card_path.read_text()
    assert card_path == ws.pretrain_dir("simsiam") / "MODEL_CARD.md"
    assert card.startswith("# SimSiam ResNet18 encoder for cardiac MRI")
    assert "epochs run: 7, kept: 5" in card and "1234 for training (ACDC: 1000, Sunnybrook: 234), 150 for validation" \
        in card
    assert f"the project's commit: {git_state()};" in card
    assert "- `ACDC` (acdc-nifti, 100 patients, labelled)" in card and "`Sunnybrook` (dicom, 5 patients" in card
    assert "each volume clipped between its percentiles 1 and 99 and scaled to [0, 1]" in card
    assert "resampled to 1.4 mm per pixel, a 128 px window (179.2 mm)" in card
    assert f"`reports/{ws.tag}/tiny/report.html`" in card
    assert 'safetensors.torch.load_file("encoder.safetensors"), strict=False' in card


def test_an_encoder_that_is_not_there_is_an_error_and_nothing_is_written(tmp_path):
    from cmr_utils.export import export_encoder
    from cmr_utils.paths import workspace

    ws = workspace("tiny", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="encoder file not found: .*swav/encoder.pt"):
        export_encoder(ws, "swav", MANIFEST)
    assert not ws.pretrain_dir("swav").exists()
