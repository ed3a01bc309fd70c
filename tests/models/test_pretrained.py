"""Offline ImageNet weights: they are real ImageNet weights, and nothing else tries the network."""

from __future__ import annotations

import socket

import pytest
import timm
import torch
from PIL import Image

from imgclf.data.transforms import Preprocessing, eval_tensor, normalize_batch
from imgclf.models.factory import ModelError, create_model
from imgclf.models.pretrained import LITE_PACKAGES, lite_weights_file, load_pretrained

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", sorted(LITE_PACKAGES))
def test_lite_weights_are_imagenet_weights(name, no_network):
    from skimage import data

    assert lite_weights_file(name) is not None, f"{name}: weights package not installed"
    model = timm.create_model(name, num_classes=1000).eval()
    load_pretrained(model, name)  # strict: every backbone key mapped and used
    prep = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    x = normalize_batch(eval_tensor(Image.fromarray(data.chelsea()), prep)[None], prep)  # a real cat photo
    with torch.no_grad():
        top5 = set(model(x).topk(5).indices[0].tolist())
    assert len(top5 & CAT_CLASSES) >= 2, top5


def test_new_task_keeps_pretrained_backbone_and_fresh_classifier(no_network):
    torch.manual_seed(0)
    scratch = create_model("tf_efficientnet_lite0", 7)
    pretrained = create_model("tf_efficientnet_lite0", 7, pretrained=True)
    assert pretrained.classifier.out_features == 7
    assert not torch.equal(scratch.conv_stem.weight, pretrained.conv_stem.weight)
    state = torch.load(lite_weights_file("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(pretrained.conv_stem.weight, state["_conv_stem.weight"])


def test_other_models_fail_at_once_offline_with_instructions(no_network):
    with pytest.raises(ModelError, match="--weights FILE.safetensors.*--download"):
        create_model("resnet18", 3, pretrained=True)


def test_local_safetensors_weights_and_no_pickles(tmp_path, no_network):
    from safetensors.torch import save_file

    source = create_model("resnet18", 1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "r18.safetensors")
    model = create_model("resnet18", 4, pretrained=True, weights=str(tmp_path / "r18.safetensors"))
    assert torch.equal(model.conv1.weight, source.conv1.weight) and model.fc.out_features == 4
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelError, match="must be a .safetensors file"):
        create_model("resnet18", 4, pretrained=True, weights=str(tmp_path / "r18.pth"))
