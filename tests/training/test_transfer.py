"""Transfer learning from the offline ImageNet weights: head on cached features, and finetune."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import imgclf
from imgclf.api import train
from imgclf.core.events import Message, Progress
from imgclf.models.pretrained import lite_weights_file

CLASSES = ("hat", "pants", "shoes", "skirt")


@pytest.fixture(scope="module")
def small_photos(clothing, tmp_path_factory):
    """A few real photos per class, keeping the given train/validation/test split."""
    root = tmp_path_factory.mktemp("photos")
    for split, n in (("train", 25), ("validation", 8), ("test", 8)):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for photo in sorted((clothing / split / label).glob("*.jpg"))[:n]:
                shutil.copy(photo, root / split / label / photo.name)
    return root


@pytest.mark.slow
def test_head_mode_beats_chance_and_reuses_cached_features(small_photos, tmp_path, monkeypatch):
    overrides = {"mode": "head", "image_size": 96}
    first = train(str(small_photos), tmp_path / "head", overrides)
    assert first.metrics["top1"] >= 0.25 + 0.35, first.metrics["top1"]  # 4 classes: chance is 0.25
    settings = json.loads((tmp_path / "head" / "settings.json").read_text())
    assert settings["model"]["pretrained"] == "on" and settings["train"]["mode"] == "head"

    events = []
    second = train(str(small_photos), tmp_path / "mlp", {**overrides, "head_hidden": 64}, events=events.append)
    extracted = [e for e in events if isinstance(e, Progress) and e.stage.startswith("features")]
    assert not extracted, "features were computed again instead of read from the cache"
    assert second.status == "finished" and second.metrics["top1"] >= 0.5
    clf = imgclf.load(tmp_path / "mlp")  # an MLP head is rebuilt from model.json before loading
    assert isinstance(clf.model.classifier, torch.nn.Sequential)


@pytest.mark.slow
def test_finetune_trains_later_layers_and_keeps_early_ones_frozen(small_photos, tmp_path):
    out = tmp_path / "ft"
    result = train(
        str(small_photos), out, {"mode": "finetune", "image_size": 96, "finetune_epochs": 1, "batch_size": 16}
    )
    assert result.status == "finished" and result.metrics["top1"] >= 0.6
    weights = load_file(str(out / "model.safetensors"))
    imagenet = torch.load(lite_weights_file("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(weights["conv_stem.weight"], imagenet["_conv_stem.weight"])  # frozen (stride 2)
    assert torch.equal(weights["bn1.running_mean"], imagenet["_bn0.running_mean"])  # BN statistics kept
    assert not torch.equal(weights["conv_head.weight"], imagenet["_conv_head.weight"])  # trained


def test_auto_mode_says_what_it_chose(small_photos, tmp_path):
    events = []
    train(str(small_photos), tmp_path / "auto", {"image_size": 64}, events=events.append)
    said = [e.text for e in events if isinstance(e, Message)]
    assert any(t.startswith("mode: head (25 training photos per class are too few to fine-tune") for t in said)


def test_auto_mode_finetunes_when_there_are_enough_photos():
    from imgclf.core.settings import Settings
    from imgclf.models.device import Runtime
    from imgclf.training.transfer import resolve_mode

    cpu = Runtime(torch.device("cpu"), None, False)
    assert resolve_mode(Settings(), True, cpu, 3000, 10)[0] == "finetune"
    assert resolve_mode(Settings(), True, cpu, 200, 10)[0] == "head"  # 20 per class
    assert resolve_mode(Settings(), True, cpu, 100_000, 10)[0] == "finetune"  # the plan may still take the head
    assert resolve_mode(Settings(), False, cpu, 3000, 10)[0] == "full"  # nothing pretrained at hand


def test_scratch_model_cannot_use_head_mode(small_photos, tmp_path):
    with pytest.raises(ValueError, match="needs a pretrained model"):
        train(str(small_photos), tmp_path / "x", {"model": "cnn1", "mode": "head"})
