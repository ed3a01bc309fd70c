"""Every setting declared once; flags, config files and saved runs all go through it."""

from __future__ import annotations

import json

import pytest

from imgclf.cli import build_parser
from imgclf.core.settings import (
    SECTIONS,
    Settings,
    SettingsError,
    apply_overrides,
    as_settings,
    from_dict,
    load_settings,
    section_fields,
)


def test_unknown_setting_suggests_the_close_name():
    with pytest.raises(SettingsError, match="did you mean 'epochs'"):
        apply_overrides(Settings(), {"epoch": 3})


def test_values_are_typed_and_checked():
    s = apply_overrides(Settings(), {"epochs": "7", "download": "yes", "lr": "0.01"})
    assert (s.train.epochs, s.model.download, s.train.lr) == (7, True, 0.01)
    with pytest.raises(SettingsError, match="augment"):
        apply_overrides(Settings(), {"augment": "medium"})
    with pytest.raises(SettingsError, match="expected int"):
        apply_overrides(Settings(), {"epochs": "many"})
    with pytest.raises(SettingsError, match="leave room"):
        apply_overrides(Settings(), {"val_fraction": 0.6, "test_fraction": 0.5})


def test_defaults_then_config_then_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"epochs": 5, "lr": 0.5}, "image_size": 96}))
    s = load_settings(config, {"lr": 0.25})
    assert (s.train.epochs, s.train.lr, s.model.image_size, s.train.batch_size) == (5, 0.25, 96, 64)


def test_saved_settings_round_trip():
    s = apply_overrides(Settings(), {"model": "cnn1", "seed": 9})
    assert from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_every_setting_is_a_flag_with_its_default_in_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for section in ("data", "model", "train"):
        for spec in section_fields(section):
            flag = "--" + spec.name.replace("_", "-")
            assert flag in help_text, flag
            assert spec.metadata["help"], f"{spec.name} has no help"
    assert "(default: tf_efficientnet_lite0)" in " ".join(help_text.split())  # argparse wraps lines


def test_flags_override_only_what_is_given():
    args = build_parser().parse_args(["train", "data", "--epochs", "3", "--no-download"])
    from imgclf.cli.parser import overrides

    assert overrides(args, "train") == {"epochs": 3, "download": False}


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("top_k", 0, "at least 1"),
        ("max_pixels", 0, "max_pixels and predict_batch_size must be at least 1"),
        ("image_size", -5, "image_size -5 is too small"),
        ("drop_rate", 1.5, "0 to 0.99"),
        ("label_smoothing", float("nan"), "0 to 0.99"),
        ("workers", -2, "at least -1"),
        ("min_side", 0, "at least 1"),
        ("patience", -1, "at least 0"),
        ("max_aspect", -3.0, "at least 0"),
    ],
)
def test_settings_out_of_range_are_refused_with_the_range(name, value, allowed):
    """BAD_INPUTS case 60: each is refused naming the setting and what it may be."""
    with pytest.raises(SettingsError) as raised:
        as_settings({name: value})
    assert allowed in str(raised.value) and name in str(raised.value)


def test_every_numeric_range_admits_its_default():
    from dataclasses import fields

    for section in SECTIONS:
        for spec in fields(getattr(Settings(), section)):
            low, high = spec.metadata.get("low"), spec.metadata.get("high")
            if low is not None:
                assert spec.default >= low and (high is None or spec.default <= high), spec.name
