"""Contract tests over every model name imgclf offers: ours and a timm one behave alike."""

from __future__ import annotations

import pytest
import timm
import torch

from imgclf.models.factory import ModelError, create_model, preprocessing_for
from imgclf.models.small_cnns import SMALL_CNNS

MODELS = [*SMALL_CNNS, "mobilenetv3_small_050"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [32, 64])
def test_every_model_classifies_any_size_and_exposes_features(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.shape == (2, 7)
    assert features.shape == (2, getattr(model, "head_hidden_size", None) or model.num_features)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("name", SMALL_CNNS)
def test_ours_are_in_timms_registry_and_learn(name):
    assert timm.is_model(name)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    patterns = torch.randn(3, 3, 32, 32)  # each class has its own pattern, under noise
    y = torch.arange(24) % 3
    x = patterns[y] + 0.5 * torch.randn(24, 3, 32, 32)

    def eval_loss() -> float:  # measured without dropout, so the comparison is not noise
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item()

    before = eval_loss()
    for _ in range(40):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < before * 0.5  # it learns the patterns
    model.eval()
    with torch.no_grad():
        fresh = patterns[y] + 0.5 * torch.randn(24, 3, 32, 32)
        assert (model(fresh).argmax(1) == y).float().mean() > 0.9  # and recognises new noisy copies


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(ModelError, match="did you mean.*cnn4"):
        create_model("cnn44", 3)


def test_scratch_models_have_no_pretrained_weights():
    with pytest.raises(ModelError, match="from scratch"):
        create_model("cnn4", 3, pretrained=True)


def test_preprocessing_comes_from_timms_config_for_timm_models():
    model = create_model("mobilenetv3_small_050", 3)
    prep = preprocessing_for(model, "mobilenetv3_small_050", 160)
    assert prep.image_size == 160 and prep.crop_pct == pytest.approx(0.875)
    assert prep.mean == pytest.approx((0.485, 0.456, 0.406))
    assert prep.interpolation == "bicubic"  # "auto": the pretrained config's filter
    chosen = preprocessing_for(model, "mobilenetv3_small_050", 160, interpolation="bilinear")
    assert chosen.interpolation == "bilinear" and chosen.mean == prep.mean and chosen.crop_pct == prep.crop_pct
    with pytest.raises(ValueError, match="mean and std"):
        preprocessing_for(create_model("cnn1", 3), "cnn1", 32)
