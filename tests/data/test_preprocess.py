"""The one preprocessing every path shares (imgclf.data.preprocess), on real photos."""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgclf.data.images import load_image
from imgclf.data.preprocess import center_crop_box, eval_array, resize_short_side, to_chw


def test_resampling_only_the_crop_matches_resize_then_crop(clothing):
    """eval_array resizes only the centre crop's region; the result is the resize-then-crop
    image up to rounding, on photos of several shapes (portrait, square, landscape)."""
    photos = sorted((clothing / "test").glob("*/*.jpg"))[::40][:12]
    photos = [load_image(p) for p in photos] + [load_image(photos[0]).transpose(Image.Transpose.ROTATE_90)]
    assert len({im.size for im in photos}) >= 3
    for image in photos:
        for image_size, resize_size, interpolation in (
            (224, 256, "bicubic"),
            (64, 73, "bilinear"),
            (200, 200, "bicubic"),
        ):
            fast = eval_array(image, image_size, resize_size, interpolation)
            resized = resize_short_side(image, resize_size, interpolation)
            slow = to_chw(resized.crop(center_crop_box(*resized.size, image_size)))
            assert fast.shape == slow.shape == (3, image_size, image_size) and fast.dtype == np.uint8
            difference = np.abs(fast.astype(int) - slow.astype(int))
            assert difference.max() <= 6 and difference.mean() < 0.5, (image.size, image_size, difference.max())


def test_a_photo_the_size_of_the_target_is_only_cropped(clothing):
    image = load_image(sorted((clothing / "test").glob("*/*.jpg"))[0]).resize((256, 300))
    assert (eval_array(image, 224, 256, "bicubic") == to_chw(image.crop(center_crop_box(256, 300, 224)))).all()


def test_normalize_is_the_mean_std_formula_for_an_image_and_a_batch(clothing):
    """normalize computes (x / 255 - mean) / std per channel (as x * scale + offset): float32,
    within float32 rounding of the float64 formula, for one CHW image and an NCHW batch."""
    from imgclf.data.preprocess import normalize

    chw = eval_array(load_image(sorted((clothing / "test").glob("*/*.jpg"))[0]), 224, 256, "bicubic")
    for mean, std in (((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        exact = (chw / 255.0 - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
        for batch, expected in ((chw, exact), (np.stack([chw, chw[:, ::-1]]), np.stack([exact, exact[:, ::-1]]))):
            result = normalize(batch, mean, std)
            assert result.dtype == np.float32 and result.shape == batch.shape
            assert np.abs(result - expected).max() < 1e-6
