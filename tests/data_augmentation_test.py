"""Augmentations and test-time views, checked against their definitions.

torchvision's RandomCrop/RandomResizedCrop/Resize/CenterCrop, with PIL as the
resizing reference, and scipy's tests for their randomness.
"""

import numpy as np
import scipy.stats
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

from tf_consreg import data


class RandomCropFlipTest(tf.test.TestCase):
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, per image."""

    def test_every_output_is_a_padded_crop_or_its_mirror_with_uniform_draws(self):
        n = 900
        images = np.random.default_rng(0).integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)
        out = data.random_crop_flip(tf.constant(images), tf.constant([3, 4])).numpy()
        padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
        rows, cols, flips = [], [], []
        for k in range(n):
            found = [(i, j, f) for i in range(9) for j in range(9) for f in (0, 1)
                     if np.array_equal(out[k], (lambda c: c[:, ::-1] if f else c)(padded[k, i:i + 32, j:j + 32]))]
            self.assertLen(found, 1, f"image {k} is not a crop of its padded original")
            rows.append(found[0][0])
            cols.append(found[0][1])
            flips.append(found[0][2])
        # Offsets uniform on {0, ..., 8} (chi-square), flips Binomial(n, 1/2).
        for offsets in (rows, cols):
            self.assertGreater(scipy.stats.chisquare(np.bincount(offsets, minlength=9)).pvalue, 1e-4)
        self.assertGreater(scipy.stats.binomtest(sum(flips), n, 0.5).pvalue, 1e-4)

    def test_stateless_given_the_seed(self):
        images = tf.constant(np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
        first = data.random_crop_flip(images, tf.constant([5, 6]))
        self.assertAllEqual(first, data.random_crop_flip(images, tf.constant([5, 6])))
        self.assertNotAllEqual(first, data.random_crop_flip(images, tf.constant([5, 7])))


def _encode(image, fmt="jpeg"):
    if fmt == "jpeg":
        return tf.io.encode_jpeg(image, quality=95)
    return tf.io.encode_png(image)


def _smooth_image(height, width, seed=0):
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 64 * 4], -1)
    noise = np.random.default_rng(seed).normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


class ImagenetViewsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters((300, 400), (400, 300), (256, 300), (500, 333), (100, 150))
    def test_test_view_matches_torchvision_resize_and_center_crop(self, height, width):
        image = _smooth_image(height, width)
        ours = data.resize_center_crop(tf.constant(image)).numpy().astype(int)
        # torchvision: Resize(256) keeps the ratio with int() on the long side
        # (PIL bilinear), CenterCrop(224) offsets int(round((side - 224) / 2)).
        if width <= height:
            new_w, new_h = 256, int(256 * height / width)
        else:
            new_h, new_w = 256, int(256 * width / height)
        pil = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)).astype(int)
        top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
        reference = pil[top:top + 224, left:left + 224]
        self.assertEqual(ours.shape, (224, 224, 3))
        self.assertLessEqual(np.abs(ours - reference).max(), 1)  # PIL rounds in fixed point.
        self.assertLess(np.abs(ours - reference).mean(), 0.3)

    def test_crop_window_bounds_and_ranges(self):
        height, width = 300, 400
        windows = np.stack([data.random_resized_crop_window(height, width, tf.constant([s, 0])).numpy()
                            for s in range(400)])
        top, left, h, w = windows.T
        self.assertTrue(np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)))
        self.assertTrue(np.all((h > 0) & (w > 0)))
        area = h * w / (height * width)
        # Rounding each side to a pixel moves the area and ratio a little.
        self.assertTrue(np.all((area > 0.08 * 0.97) & (area <= 1.0)))
        self.assertTrue(np.all((w / h > 0.75 * 0.97) & (w / h < 4 / 3 * 1.03)))
        self.assertGreater(len({tuple(x) for x in windows}), 390)  # Draws differ across seeds.
        self.assertLess(area.min(), 0.15)
        self.assertGreater(area.max(), 0.85)

    @parameterized.parameters(((10, 1000), (0, 493, 10, 13)), ((1000, 10), (493, 0, 13, 10)))
    def test_crop_window_fallback(self, size, expected):
        # No draw fits a 10-pixel side (an area >= 800 at a ratio within
        # [3/4, 4/3] needs sides >= 24). torchvision then takes the whole image
        # cut to the nearest ratio bound, centered: 10x1000 (ratio 100) gives
        # h = 10, w = round(10 * 4/3) = 13, left = (1000 - 13) // 2 = 493;
        # 1000x10 (ratio 0.01) gives w = 10, h = round(10 / (3/4)) = 13, top = 493.
        height, width = size
        window = data.random_resized_crop_window(height, width, tf.constant([1, 2])).numpy()
        self.assertEqual(tuple(window), expected)

    @parameterized.parameters("jpeg", "png")
    def test_training_view_is_a_resized_crop_or_its_mirror(self, fmt):
        image = _smooth_image(120, 160, seed=2)
        encoded = _encode(image, fmt)
        decoded = tf.io.decode_image(encoded, channels=3).numpy()  # JPEG is lossy: compare with what it decodes to.
        for s in range(5):
            seed = tf.constant([s, 9], tf.int64)
            out = data.random_resized_crop(encoded, seed).numpy().astype(int)
            self.assertEqual(out.shape, (224, 224, 3))
            # The window random_resized_crop draws: its first split seed (see there).
            window_seed = tf.random.experimental.stateless_split(seed, 2)[0]
            top, left, h, w = data.random_resized_crop_window(120, 160, window_seed).numpy()
            crop = decoded[top:top + h, left:left + w]
            reference = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BILINEAR)).astype(int)
            diff = min(np.abs(out - reference).mean(), np.abs(out - reference[:, ::-1]).mean())
            # decode_and_crop_jpeg may differ from decode-then-crop by a level
            # or two at block edges; the resize itself agrees with PIL to 1.
            self.assertLess(diff, 1.5)

    def test_flip_rate_is_one_half(self):
        image = _smooth_image(64, 64, seed=3)
        encoded = _encode(image, "png")
        flips = 0
        n = 200
        for s in range(n):
            out = data.random_resized_crop(encoded, tf.constant([s, 1]), size=16).numpy().astype(int)
            # Column 0 of the image is dark in the red channel (x * 255 / width).
            flips += int(out[:, 0, 0].mean() > out[:, -1, 0].mean())
        self.assertGreater(scipy.stats.binomtest(flips, n, 0.5).pvalue, 1e-4)


if __name__ == "__main__":
    tf.test.main()
