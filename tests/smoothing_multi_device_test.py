"""Mirrored certification: each image's samples split across 2 logical CPU devices (set in conftest.py).

The base classifiers are those of smoothing_test.py, whose smoothed behaviour
is known in closed form; expected values come from formulas, not from the
code under test.
"""

from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

from smoothing_test import _SHAPE, _DIM, _argmax_pixel_model, _linear_model, _true_margin
import threshold_models  # tests/threshold_models.py
from tf_consreg import distribute
from tf_consreg import noise
from tf_consreg import smoothing


def _mirrored():
    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, "conftest.py should have made 2 logical CPU devices"
    return strategy


def _counts(strategy, model, images, n, batch_size, seed, num_classes=64, sigma=0.5, grid=None):
    if strategy is None:
        fn = tf.function(lambda x, s: smoothing.sample_counts(
            model, x, n, sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=s, grid=grid))
    else:
        fn = tf.function(lambda x, s: smoothing.mirrored_sample_counts(
            strategy, model, x, n, sigma=sigma, num_classes=num_classes, batch_size=batch_size, seed=s, grid=grid))
    return fn(tf.constant(images, tf.float32), tf.constant(seed, tf.int64)).numpy()


class MirroredSampleCountsTest(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.strategy = _mirrored()
        with cls.strategy.scope():
            cls.model = _argmax_pixel_model()

    @parameterized.named_parameters(
        ("odd", 3, 1001, 100),
        ("several_images_per_chunk", 5, 200, 1000),
        ("one_sample", 2, 1, 64),  # One replica gets no sample.
        ("none", 2, 0, 64),
    )
    def test_rows_sum_to_num_samples(self, num_images, n, batch_size):
        images = np.full((num_images, 8, 8, 1), 0.5, np.float32)
        counts = _counts(self.strategy, self.model, images, n, batch_size, [1, 2])
        self.assertEqual(counts.dtype, np.int64)
        self.assertAllEqual(counts.sum(axis=1), [n] * num_images)

    def test_replicas_draw_different_noise(self):
        # The argmax-pixel model maps noise on a constant image to a uniform
        # class. If the two replicas drew the same noise, each class would
        # be counted twice: every count even (chance 2^-64 otherwise), and
        # the spread of the counts doubled.
        counts = _counts(self.strategy, self.model, np.full((1, 8, 8, 1), 0.5), 2048, 256, [3, 4])[0]
        self.assertFalse(np.all(counts % 2 == 0))
        self.assertGreater(scipy_stats.chisquare(counts).pvalue, 1e-4)

    def test_noise_differs_between_images(self):
        counts = _counts(self.strategy, self.model, np.full((3, 8, 8, 1), 0.5), 300, 1000, [5, 6])
        for i in range(3):
            for j in range(i):
                self.assertNotAllEqual(counts[i], counts[j])

    def test_reproducible_for_a_seed_and_not_the_default_noise(self):
        images = np.full((2, 8, 8, 1), 0.5, np.float32)
        first = _counts(self.strategy, self.model, images, 1000, 250, [7, 8])
        self.assertAllEqual(first, _counts(self.strategy, self.model, images, 1000, 250, [7, 8]))
        self.assertNotAllEqual(first, _counts(self.strategy, self.model, images, 1000, 250, [7, 9]))
        # Documented: other noise than one device with the same seed.
        self.assertNotAllEqual(first, _counts(None, self.model, images, 1000, 250, [7, 8]))

    @parameterized.parameters(True, False)
    def test_probability_of_a_linear_model(self, built_in_scope):
        # One pixel model f = [x > t]: P(f = 1) = Phi((x - t) / sigma).
        w = np.zeros(_DIM, np.float32)
        w[0] = 1.0
        if built_in_scope:
            with self.strategy.scope():
                model = _linear_model(w, -0.3)
        else:
            model = _linear_model(w, -0.3)
        images = np.full((1, *_SHAPE), 0.6, np.float32)
        counts = _counts(self.strategy, model, images, 40000, 4000, [8, 9], num_classes=2)[0]
        expected = scipy_stats.norm.cdf(0.3 / 0.5)
        self.assertAllClose(counts[1] / 40000, expected, atol=5 * np.sqrt(expected * (1 - expected) / 40000))

    def test_grid_noise_follows_the_closed_form(self):
        # f(x) = [x_p > 1/2] under grid noise: P(f = 1) = Phi((a / 255 - 1/2) / sigma) exactly for the rounded
        # Gaussian (smoothing_test.GridNoiseTest); 5 binomial standard deviations. The two replicas' shares
        # (n is odd) sum to n.
        with self.strategy.scope():
            model = threshold_models.threshold_model(_SHAPE, 5, 0.5)
        images = np.full((1, *_SHAPE), 140 / 255, np.float32)
        n = 20001
        counts = _counts(self.strategy, model, images, n, 4000, [3, 4], num_classes=2, sigma=0.25,
                         grid=noise.grid_noise_table(0.25))[0]
        self.assertEqual(counts.sum(), n)
        expected = scipy_stats.norm.cdf((140 / 255 - 0.5) / 0.25)
        self.assertAllClose(counts[1] / n, expected, atol=5 * np.sqrt(expected * (1 - expected) / n))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "images"):
            smoothing.mirrored_sample_counts(self.strategy, self.model, np.zeros((8, 8, 1)), 5, sigma=0.5,
                                             num_classes=64, batch_size=4, seed=[1, 2])
        with self.assertRaisesRegex(ValueError, "seed"):
            smoothing.mirrored_sample_counts(self.strategy, self.model, np.zeros((1, 8, 8, 1)), 5, sigma=0.5,
                                             num_classes=64, batch_size=4, seed=[1, 2, 3])


class MirroredSmoothTest(tf.test.TestCase):

    def test_certified_radius_valid_beyond_alpha_rate(self):
        # As smoothing_test's single-device test: with probability >= 1 - alpha
        # the class is g(x) and the radius at most the true one.
        rng = np.random.default_rng(0)
        w = rng.normal(size=_DIM).astype(np.float32)
        b = float(-0.5 * w.sum())
        strategy = _mirrored()
        with strategy.scope():
            model = _linear_model(w, b)
        smooth = smoothing.Smooth(model, 2, 0.25, strategy=strategy, noise="float")
        sigma, alpha, count = 0.25, 0.1, 400
        images = rng.uniform(size=(count, *_SHAPE)).astype(np.float32)
        margin = _true_margin(w, b, images)
        classes, radii = smooth.certify_batch(images, n0=20, n=51, alpha=alpha, batch_size=1000, seed=1)
        certified = classes != smooth.ABSTAIN
        wrong = certified & ((classes != (margin > 0)) | (radii > np.abs(margin) + 1e-5))
        self.assertLessEqual(int(wrong.sum()), scipy_stats.binom.isf(1e-6, count, alpha))
        self.assertGreater(certified.sum(), count // 2)
        # Far images get all n = 51 estimation samples right, the largest
        # certificate n samples allow: p_lower = alpha^(1/n). More samples
        # (say, both replicas drawing all 51) would give a larger one.
        self.assertAllClose(np.max(radii), sigma * scipy_stats.norm.ppf(alpha ** (1 / 51)), rtol=1e-5)

        # One trace for every batch size, sample count and mode, as on one device.
        smooth.predict_batch(images[:3], 30, 0.01, 16, seed=3)
        self.assertEqual(smooth._counts_fn.experimental_get_tracing_count(), 1)  # pylint: disable=protected-access


if __name__ == "__main__":
    tf.test.main()
