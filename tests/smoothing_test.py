"""Tests for tf_consreg.smoothing: the sampling loop and CERTIFY/PREDICT.

The base classifiers are tiny Keras models whose smoothed behaviour is known in
closed form, so every expected value below comes from a formula, not from the
code under test.
"""

import fractions
import math

from absl.testing import parameterized
import keras
import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

import threshold_models  # tests/threshold_models.py
from tf_consreg import engine
from tf_consreg import noise
from tf_consreg import smoothing
from tf_consreg import stats

_SHAPE = (4, 4, 1)
_DIM = 16


def _linear_model(w: np.ndarray, b: float) -> keras.Model:
    """Two classes with logits [0, w.x + b]: f(x) = 1 iff w.x + b > 0.

    Under x + d, d ~ N(0, sigma^2 I), w.(x + d) + b ~ N(w.x + b, sigma^2 |w|^2),
    so P(f = 1) = Phi((w.x + b) / (sigma |w|)). The smoothed classifier g has
    the same decision hyperplane as f, so the exact robust radius of g at x is
    |w.x + b| / |w|, which is also sigma * Phi^-1(p_A) at the true p_A.
    """
    inputs = keras.Input(_SHAPE)
    dense = keras.layers.Dense(2)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    kernel = np.stack([np.zeros_like(w), w], axis=1).astype(np.float32)
    dense.set_weights([kernel, np.array([0.0, b], np.float32)])
    return model


def with_nan_weights(model: keras.Model) -> keras.Model:
    """`model` with every weight set to NaN, as a diverged training run saves it: every logit is NaN."""
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    return model


def partly_nonfinite_model(w: np.ndarray, b: float, pixel: int, threshold: float) -> keras.Model:
    """The model of `_linear_model` (logits [0, w.x + b]), but with NaN logits wherever x[pixel] > threshold.

    Standard layers only, so it saves and loads as a .keras file. A gate
    g = relu(1e30 (x_p - t)) is an exact 0 for x_p <= t; for x_p > t it is at
    least about 1e22 (the float32 spacing of 1e30 x_p), so 1e30 g overflows
    to +inf, the kernel [1, -1] makes (inf, -inf) of it and [[1, 1], [1, 1]]
    inf - inf = NaN in both outputs, which are added to the linear logits.
    With w[pixel] = 0 the NaN event and the linear class are independent
    under noise: P(no class) = 1 - q with q = Phi((t - x_p) / sigma), and
    P(f = 1) = q Phi((w.x + b) / (sigma |w|)), P(f = 0) = q - P(f = 1).
    """
    assert w.ravel()[pixel] == 0, "w[pixel] must be 0 for the closed form"
    inputs = keras.Input(_SHAPE)
    flat = keras.layers.Flatten()(inputs)
    linear = keras.layers.Dense(2)
    gate = keras.layers.Dense(1)
    overflow = keras.layers.Dense(1, use_bias=False)
    split = keras.layers.Dense(2, use_bias=False)
    cancel = keras.layers.Dense(2, use_bias=False)
    nan = cancel(split(overflow(keras.layers.ReLU()(gate(flat)))))
    model = keras.Model(inputs, keras.layers.Add()([linear(flat), nan]))
    linear.set_weights([np.stack([np.zeros_like(w.ravel()), w.ravel()], axis=1).astype(np.float32),
                        np.array([0.0, b], np.float32)])
    selector = np.zeros((w.size, 1), np.float32)
    selector[pixel] = 1e30
    gate.set_weights([selector, np.array([-1e30 * threshold], np.float32)])
    overflow.set_weights([np.array([[1e30]], np.float32)])
    split.set_weights([np.array([[1.0, -1.0]], np.float32)])
    cancel.set_weights([np.ones((2, 2), np.float32)])
    return model


def partly_nonfinite_probabilities(images: np.ndarray, w: np.ndarray, b: float, pixel: int, threshold: float,
                                   sigma: float) -> np.ndarray:
    """The true (P(f = 0), P(f = 1)) [B, 2] of `partly_nonfinite_model` under N(0, sigma^2 I) noise."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    q = scipy_stats.norm.cdf((threshold - flat[:, pixel]) / sigma)
    p1 = q * scipy_stats.norm.cdf((flat @ w.ravel() + b) / (sigma * np.linalg.norm(w)))
    return np.stack([q - p1, p1], axis=1)


def _argmax_pixel_model(shape=(8, 8, 1)) -> keras.Model:
    """Classifies an image by the index of its largest pixel (one class per pixel).

    On a constant image, the class of x + d is the argmax of i.i.d. noise:
    uniform over the pixels, and a different noise vector almost always lands
    elsewhere, so counts reveal repeated or shared noise.
    """
    inputs = keras.Input(shape)
    return keras.Model(inputs, keras.layers.Flatten()(inputs))


def _true_margin(model_w, b, images):
    """(w.x + b) / |w| per image: signed exact radius of g."""
    return (images.reshape(len(images), -1) @ model_w + b) / np.linalg.norm(model_w)


class SampleCountsTest(tf.test.TestCase, parameterized.TestCase):

    def _counts(self, model, images, n, batch_size, seed, num_classes=64):
        fn = tf.function(lambda x, s: smoothing.sample_counts(
            model, x, n, sigma=0.5, num_classes=num_classes, batch_size=batch_size, seed=s))
        return fn(tf.constant(images, tf.float32), tf.constant(seed, tf.int64)).numpy()

    @parameterized.named_parameters(
        ("several_chunks_per_image", 3, 2500, 1000),
        ("several_images_per_chunk", 5, 200, 1000),
        ("ragged", 3, 7, 3),
        ("one_sample", 2, 1, 64),
    )
    def test_rows_sum_to_num_samples(self, num_images, n, batch_size):
        images = np.full((num_images, 8, 8, 1), 0.5, np.float32)
        counts = self._counts(_argmax_pixel_model(), images, n, batch_size, [1, 2])
        self.assertEqual(counts.dtype, np.int64)
        self.assertAllEqual(counts.sum(axis=1), [n] * num_images)

    def test_zero_samples(self):
        counts = self._counts(_argmax_pixel_model(), np.full((2, 8, 8, 1), 0.5), 0, 10, [1, 2])
        self.assertAllEqual(counts, np.zeros((2, 64)))

    def test_noise_fresh_per_sample_and_chunk(self):
        # 8 chunks of 256: if samples or chunks shared noise, the counts would
        # be multiples of the repetition and fail this uniformity test.
        counts = self._counts(_argmax_pixel_model(), np.full((1, 8, 8, 1), 0.5), 2048, 256, [3, 4])[0]
        self.assertGreater(scipy_stats.chisquare(counts).pvalue, 1e-4)
        # The first chunk alone (same seed, same block) versus the second.
        first = self._counts(_argmax_pixel_model(), np.full((1, 8, 8, 1), 0.5), 256, 256, [3, 4])[0]
        two = self._counts(_argmax_pixel_model(), np.full((1, 8, 8, 1), 0.5), 512, 256, [3, 4])[0]
        self.assertNotAllEqual(two - first, first)

    def test_noise_differs_between_images_of_a_batch(self):
        counts = self._counts(_argmax_pixel_model(), np.full((4, 8, 8, 1), 0.5), 300, 1000, [5, 6])
        for i in range(4):
            for j in range(i):
                self.assertNotAllEqual(counts[i], counts[j])

    def test_image_noise_independent_of_batch(self):
        images = np.full((6, 8, 8, 1), 0.5, np.float32)
        seeds = np.array([[7, i] for i in range(6)], np.int64)
        batched = self._counts(_argmax_pixel_model(), images, 300, 1000, seeds)
        alone = self._counts(_argmax_pixel_model(), images[4:5], 300, 1000, seeds[4:5])
        self.assertAllEqual(batched[4], alone[0])

    def test_noise_in_pixel_space_with_sigma(self):
        # One pixel model f = [x > t]: P(f = 1) = Phi((x - t) / sigma), sigma = 0.5.
        w = np.zeros(_DIM, np.float32)
        w[0] = 1.0
        model = _linear_model(w, -0.3)
        images = np.full((1, *_SHAPE), 0.6, np.float32)
        counts = self._counts(model, images, 40000, 4000, [8, 9], num_classes=2)[0]
        expected = scipy_stats.norm.cdf(0.3 / 0.5)
        self.assertAllClose(counts[1] / 40000, expected, atol=5 * np.sqrt(expected * (1 - expected) / 40000))

    def test_bad_arguments(self):
        model = _argmax_pixel_model()
        with self.assertRaisesRegex(ValueError, "images"):
            smoothing.sample_counts(model, np.zeros((8, 8, 1)), 5, sigma=0.5, num_classes=64, batch_size=4,
                                    seed=[1, 2])
        with self.assertRaisesRegex(ValueError, "batch_size"):
            smoothing.sample_counts(model, np.zeros((1, 8, 8, 1)), 5, sigma=0.5, num_classes=64, batch_size=0,
                                    seed=[1, 2])
        with self.assertRaisesRegex(ValueError, "seed"):
            smoothing.sample_counts(model, np.zeros((1, 8, 8, 1)), 5, sigma=0.5, num_classes=64, batch_size=4,
                                    seed=[1, 2, 3])


class _LinearModelMixin:
    """Test case set-up: the linear two-class model of `_linear_model`, and images for it."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.w = rng.normal(size=_DIM).astype(np.float32)
        # Hyperplane through the centre of the cube, so margins of both signs.
        self.b = float(-0.5 * self.w.sum())
        self.model = _linear_model(self.w, self.b)
        self.rng = rng

    def _images(self, count):
        return self.rng.uniform(size=(count, *_SHAPE)).astype(np.float32)

    def _images_at(self, margins):
        """Images in [0, 1] whose signed exact radius (w.x + b) / |w| is margins[i], up to float32 rounding.

        Points near the centre of the cube, moved along w to the wanted distance.
        """
        unit = self.w.astype(np.float64) / np.linalg.norm(self.w)
        images = []
        for margin in margins:
            while True:
                x = 0.5 + self.rng.uniform(-0.15, 0.15, size=_DIM)
                x += (margin - _true_margin(self.w, self.b, x[None])[0]) * unit
                if np.all((x >= 0) & (x <= 1)):
                    images.append(x.reshape(_SHAPE))
                    break
        return np.asarray(images, np.float32)


class SmoothTest(_LinearModelMixin, tf.test.TestCase, parameterized.TestCase):

    def test_certified_radius_valid_beyond_alpha_rate(self):
        # CERTIFY's guarantee: with probability >= 1 - alpha the returned class
        # is g(x) and the radius does not exceed the true one. With a large
        # alpha and few samples the bound is tight, so a too-optimistic bound
        # would show up as too many failures.
        sigma, alpha, count = 0.25, 0.1, 400
        smooth = smoothing.Smooth(self.model, 2, sigma, noise="float")
        images = self._images(count)
        margin = _true_margin(self.w, self.b, images)
        classes, radii = smooth.certify_batch(images, n0=20, n=50, alpha=alpha, batch_size=1000, seed=1)
        certified = classes != smooth.ABSTAIN
        wrong = certified & ((classes != (margin > 0)) | (radii > np.abs(margin) + 1e-5))
        failures = int(wrong.sum())
        # Allowed: the 1 - 1e-6 quantile of Binomial(count, alpha).
        self.assertLessEqual(failures, scipy_stats.binom.isf(1e-6, count, alpha))
        # Not vacuous: the one-sided bound is tight enough to fail now and
        # then (about alpha / 2 of the images here).
        self.assertGreater(failures, 0)
        self.assertGreater(certified.sum(), count // 2)

    def test_certified_radius_approaches_true_radius(self):
        sigma = 0.5
        smooth = smoothing.Smooth(self.model, 2, sigma, noise="float")
        images = self._images(200)
        z = _true_margin(self.w, self.b, images) / sigma
        keep = (np.abs(z) > 0.3) & (np.abs(z) < 1.5)
        images, true_radius = images[keep][:20], np.abs(z[keep][:20]) * sigma
        gaps = []
        for n in (100, 1000, 10000):
            classes, radii = smooth.certify_batch(images, n0=100, n=n, alpha=0.001, batch_size=2000, seed=2)
            self.assertTrue(np.all(radii <= true_radius + 1e-5))
            gaps.append(np.mean(true_radius - radii))
        self.assertLess(gaps[1], gaps[0])
        self.assertLess(gaps[2], gaps[1])
        # At n = 10^4 the bound loses about 3.1 standard errors of p_A:
        # well under 0.15 sigma of radius for Phi^-1(p_A) in (0.3, 1.5).
        self.assertTrue(np.all(classes >= 0))
        self.assertLess(np.max(true_radius - radii), 0.15 * sigma)

    def test_selection_and_estimation_use_different_noise(self):
        # The counts that CERTIFY decides from, recorded as the engine gets them.
        recorded = []
        smooth = smoothing.Smooth(_argmax_pixel_model(), 64, 0.5, noise="float")
        real = smooth._certify_fn  # pylint: disable=protected-access

        def spy(selection, estimation, n, alpha, slack):
            recorded.append((selection.numpy(), estimation.numpy()))
            return real(selection, estimation, n, alpha, slack)

        self.enter_context(tf.compat.v1.test.mock.patch.object(smooth, "_certify_fn", spy))
        smooth.certify(np.full((8, 8, 1), 0.5), n0=500, n=500, alpha=0.01, batch_size=250, seed=3)
        (selection, estimation), = recorded
        self.assertEqual(selection.sum(), 500)
        self.assertNotAllEqual(selection, estimation)

    def test_predict_abstains_on_tie_not_on_dominant_class(self):
        smooth = smoothing.Smooth(self.model, 2, 0.25, noise="float")
        # Points on the hyperplane w.x + b = 0 (P(class 1) = 1/2): project
        # random points onto it, keeping those inside the cube.
        images = self._images(50).reshape(50, -1)
        images -= np.outer(_true_margin(self.w, self.b, images), self.w / np.linalg.norm(self.w))
        tied = images[np.all((images >= 0) & (images <= 1), axis=1)][:5].reshape(-1, *_SHAPE)
        self.assertLen(tied, 5)
        self.assertAllEqual(smooth.predict_batch(tied, n=2000, alpha=0.001, batch_size=1000, seed=4), [-1] * 5)
        # Margins of at least sigma: P(top class) >= Phi(1) = 0.84.
        images = self._images(100)
        margin = _true_margin(self.w, self.b, images)
        far = np.abs(margin) > 0.25
        predicted = smooth.predict_batch(images[far], n=2000, alpha=0.001, batch_size=1000, seed=4)
        self.assertAllEqual(predicted, (margin[far] > 0).astype(int))
        self.assertEqual(smooth.predict(images[far][0], n=2000, alpha=0.001, batch_size=1000, seed=4),
                         predicted[0])

    def test_reproducible_with_seed(self):
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        images = self._images(3)
        first = smooth.certify_batch(images, 100, 2000, 0.01, 500, seed=5)
        again = smooth.certify_batch(images, 100, 2000, 0.01, 500, seed=5)
        other = smooth.certify_batch(images, 100, 2000, 0.01, 500, seed=6)
        self.assertAllEqual(first[0], again[0])
        self.assertAllEqual(first[1], again[1])
        # Radii come from counts of 2000 samples: another seed moves them.
        self.assertNotAllEqual(first[1], other[1])
        self.assertAllEqual(smooth.predict_batch(images, 500, 0.01, 100, seed=7),
                            smooth.predict_batch(images, 500, 0.01, 100, seed=7))

    def test_result_independent_of_batch(self):
        # What makes resumed certification runs equal uninterrupted ones.
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        images = self._images(6)
        ids = [10, 11, 12, 13, 14, 15]
        classes, radii = smooth.certify_batch(images, 50, 300, 0.01, 128, seed=8, image_ids=ids)
        alone = smooth.certify_batch(images[3:4], 50, 300, 0.01, 128, seed=8, image_ids=ids[3:4])
        self.assertEqual((classes[3], radii[3]), (alone[0][0], alone[1][0]))

    def test_traced_once(self):
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        smooth.certify_batch(self._images(3), 10, 100, 0.01, 64, seed=1)
        smooth.certify_batch(self._images(5), 20, 2000, 0.01, 512, seed=2)
        smooth.predict_batch(self._images(1), 30, 0.01, 16, seed=3)
        self.assertEqual(smooth._counts_fn.experimental_get_tracing_count(), 1)  # pylint: disable=protected-access

    def test_single_image_forms(self):
        smooth = smoothing.Smooth(self.model, 2, 0.25, noise="float")
        x = self._images(1)[0]
        cls, radius = smooth.certify(x, 100, 1000, 0.001, 500, seed=9)
        self.assertIsInstance(cls, int)
        self.assertIsInstance(radius, float)
        self.assertEqual((cls, radius), tuple(v[0] for v in smooth.certify_batch(x[None], 100, 1000, 0.001, 500,
                                                                                 seed=9)))

    @parameterized.named_parameters(
        ("n0", dict(n0=0), "n0"),
        ("n", dict(n=0), "^n must"),
        ("alpha_zero", dict(alpha=0.0), "alpha"),
        ("alpha_one", dict(alpha=1.0), "alpha"),
        ("batch_size", dict(batch_size=0), "batch_size"),
        ("float_n", dict(n=10.5), "^n must"),
        ("huge_n", dict(n=2**31), "^n must"),
        ("seed", dict(seed="x"), "seed"),
    )
    def test_bad_certify_arguments(self, override, word):
        smooth = smoothing.Smooth(self.model, 2, 0.25, noise="float")
        args = dict(n0=10, n=100, alpha=0.01, batch_size=10, seed=0)
        args.update(override)
        with self.assertRaisesRegex(ValueError, word):
            smooth.certify(np.full(_SHAPE, 0.5), **args)

    @parameterized.named_parameters(
        ("wrong_shape", np.full((5, 4, 1), 0.5), "shape"),
        ("above_one", np.full(_SHAPE, 1.5), r"\[0, 1\]"),
        ("below_zero", np.full(_SHAPE, -0.1), r"\[0, 1\]"),
        ("nan", np.full(_SHAPE, np.nan), r"images\[0, 0, 0, 0\] = nan is outside \[0, 1\]"),
        ("batched", np.full((1, *_SHAPE), 0.5), "one image"),
    )
    def test_bad_images(self, image, word):
        smooth = smoothing.Smooth(self.model, 2, 0.25, noise="float")
        with self.assertRaisesRegex(ValueError, word):
            smooth.certify(image, 10, 100, 0.01, 10)
        with self.assertRaisesRegex(ValueError, word):
            smooth.predict(image, 100, 0.01, 10)

    @parameterized.parameters((0.0, 2), (-0.5, 2), (float("nan"), 2), (0.5, 1))
    def test_bad_construction(self, sigma, num_classes):
        with self.assertRaises(ValueError):
            smoothing.Smooth(self.model, num_classes, sigma, noise="float")


class ClosedFormInBothDtypesTest(tf.test.TestCase, parameterized.TestCase):
    """CERTIFY's soundness against a closed form, for the float32 network and for the bfloat16 one.

    A certificate holds for the function sampled. The bfloat16 network of a
    linear model rounds its input to bfloat16, so it is not the float32
    linear function; a threshold on one pixel, f(x) = [x_p > t] with t = 1/2,
    stays one in bfloat16, at the shifted threshold t' = 1/2 + 2^-9 (derived
    in tests/threshold_models.py). Under N(0, sigma^2 I) noise either one has
    P(f = 1) = Phi((x_p - t) / sigma), so g's exact L2 radius at x is
    |x_p - t| (the distance to the hyperplane x_p = t), with t = 1/2 in
    float32 and t' in bfloat16.
    """

    SHAPE, PIXEL = (4, 4, 1), 5

    def _model(self, compute_dtype):
        model = threshold_models.in_dtype(threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5),
                                          compute_dtype)
        threshold = 0.5 if compute_dtype == "float32" else threshold_models.bfloat16_threshold(0.5)
        return model, threshold

    def _images(self, rng, pixel_values):
        images = rng.uniform(size=(len(pixel_values), int(np.prod(self.SHAPE)))).astype(np.float32)
        images[:, self.PIXEL] = pixel_values
        return images.reshape(-1, *self.SHAPE)

    @parameterized.parameters("float32", "bfloat16")
    def test_the_network_is_the_closed_form(self, compute_dtype):
        model, threshold = self._model(compute_dtype)
        self.assertEqual(model.layers[-2].compute_dtype, compute_dtype)  # The hidden layer really computes in it.
        # Both sides of the threshold, one float32 step apart, and both sides of the other dtype's threshold.
        t = np.float32(threshold)
        points = np.array([np.nextafter(t, np.float32(0)), t, np.nextafter(t, np.float32(1)), 0.5,
                           np.nextafter(np.float32(0.5), np.float32(1)), 0.5 + 2**-9, 0.4, 0.6], np.float32)
        classes = np.argmax(model(self._images(np.random.default_rng(0), points)).numpy(), axis=1)
        self.assertAllEqual(classes, (points > t).astype(int))

    @parameterized.parameters("float32", "bfloat16")
    def test_certified_radius_valid_beyond_alpha_rate(self, compute_dtype):
        # As SmoothTest's test of that name: with probability >= 1 - alpha
        # per image the class is g(x) and the radius at most |x_p - t|. The
        # only arithmetic between the closed form and the counts is float32's
        # rounding of x + d (half an ulp, 3e-8 near t = 0.5), which moves the
        # decision of samples in a band of that width on each side of t:
        # P(f = 1) moves by under 2 * 3e-8 / (sigma sqrt(2 pi)) < 1e-7. A
        # radius can exceed the true one only where the certified p_lower
        # can reach the true p, i.e. p <= 0.1^(1/50) = 0.955 (the most 50
        # samples certify at alpha = 0.1), where phi(Phi^-1(p)) >= 0.094: the
        # true radius moves by under sigma * 1e-7 / 0.094 < 3e-7. The radii
        # are compared with 1e-5 to spare, as SmoothTest does.
        sigma, alpha, count = 0.25, 0.1, 400
        model, threshold = self._model(compute_dtype)
        rng = np.random.default_rng(1)
        images = self._images(rng, rng.uniform(size=count).astype(np.float32))
        margin = images.reshape(count, -1)[:, self.PIXEL].astype(np.float64) - threshold
        smooth = smoothing.Smooth(model, 2, sigma, noise="float")
        classes, radii = smooth.certify_batch(images, n0=20, n=50, alpha=alpha, batch_size=1000, seed=1)
        certified = classes != smooth.ABSTAIN
        wrong = certified & ((classes != (margin > 0)) | (radii > np.abs(margin) + 1e-5))
        # Allowed: the 1 - 1e-6 quantile of Binomial(count, alpha); not vacuous: some failures (about alpha / 2).
        self.assertLessEqual(int(wrong.sum()), scipy_stats.binom.isf(1e-6, count, alpha))
        self.assertGreater(int(wrong.sum()), 0)
        self.assertGreater(certified.sum(), count // 2)


class StagedTest(_LinearModelMixin, tf.test.TestCase, parameterized.TestCase):
    """certify_staged_batch and predict_staged_batch on the closed-form linear model."""

    def test_radius_outside_true_radius_certified_at_most_alpha(self):
        # Every image has the exact radius m = 0.25 (sigma = 0.5: p_A =
        # Phi(0.5) = 0.6915), of either class. Asked about 0.9 m (threshold
        # Phi(0.45) = 0.6736) and 1.02 m (Phi(0.51) = 0.6950), the guarantee
        # is: per image, with probability >= 1 - alpha, no wrong class and no
        # certificate at 1.02 m. Failures are Binomial(count, q), q <= alpha:
        # allowed, the 1 - 1e-6 quantile of Binomial(count, alpha).
        sigma, alpha, count, m = 0.5, 0.05, 300, 0.25
        smooth = smoothing.Smooth(self.model, 2, sigma, noise="float")
        margins = np.where(np.arange(count) % 2 == 0, m, -m)
        images = self._images_at(margins)
        true_radius = _true_margin(self.w, self.b, images)
        self.assertAllClose(true_radius, margins, atol=1e-5)
        result = smooth.certify_staged_batch(images, 100, 10000, alpha, 10000, radii=[0.9 * m, 1.02 * m],
                                             stages=(100, 1000, 10000), seed=10)
        wrong_class = (result.classes >= 0) & (result.classes != (true_radius > 0))
        failures = int((wrong_class | result.certified[:, 1]).sum())
        self.assertLessEqual(failures, scipy_stats.binom.isf(1e-6, count, alpha))
        # A reported radius above the true one is a failure too (the same event as above, radius-wise).
        self.assertLessEqual(int((result.radii > np.abs(true_radius) + 1e-5).sum()),
                             scipy_stats.binom.isf(1e-6, count, alpha))
        # Not vacuous: at 10,000 samples, level alpha / 3, the bound is about
        # 0.6915 - 2.13 * 0.0046 = 0.6817 > 0.6736, so 0.9 m is certified
        # for most images (about 95%).
        self.assertGreater(result.certified[:, 0].mean(), 0.8)
        self.assertTrue(np.all(np.isin(result.samples, (100, 1000, 10000))))

    def test_agrees_with_certify_when_clearly_separated(self):
        # sigma = 0.5, radius 0.25 asked. Exact radii 0.6 (p_A = Phi(1.2) =
        # 0.885: fixed-n certifies 0.5 Phi^-1(0.875) = 0.58 >= 0.25) and 0.1
        # (p_A = Phi(0.2) = 0.579: a class with radius about 0.08 < 0.25),
        # each several standard errors away from the thresholds at n = 10^4.
        # n0 = 1000 picks the right class but with probability about 1e-6
        # (P(Binomial(1000, 0.579) <= 500)).
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        margins = np.tile([0.6, -0.6, 0.1, -0.1], 10)
        images = self._images_at(margins)
        classes, radii = smooth.certify_batch(images, 1000, 10000, 0.001, 2000, seed=11)
        result = smooth.certify_staged_batch(images, 1000, 10000, 0.001, 2000, radii=[0.25], seed=11)
        self.assertAllEqual(classes, (margins > 0).astype(int))
        self.assertAllEqual(result.classes, classes)
        self.assertAllEqual(result.certified[:, 0], radii >= 0.25)
        self.assertAllEqual(result.certified[:, 0], np.abs(margins) > 0.25)
        # Default stages from n0: 1000, 3000, 5000, 10000. All stop early; at
        # radius 0.6 at the first stage, whose bound (level alpha / 4) is about
        # 0.885 - 3.48 * 0.0101 = 0.85 > Phi(0.5) = 0.69.
        self.assertTrue(np.all(result.samples < 10000))
        self.assertAllEqual(result.samples[np.abs(margins) == 0.6], [1000] * 20)
        self.assertAllEqual(result.radii[result.classes >= 0] > 0, [True] * 40)

    def test_samples_are_stage_counts_and_batch_does_not_matter(self):
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        images, ids, stages = self._images(8), np.arange(100, 108), (100, 400, 2000)
        batch = smooth.certify_staged_batch(images, 100, 2000, 0.01, 256, radii=[0.1, 0.3], stages=stages, seed=12,
                                            image_ids=ids)
        self.assertTrue(np.all(np.isin(batch.samples, stages)))
        self.assertGreater(len(set(batch.samples.tolist())), 1)  # Images stop at different stages.
        for i in (2, 5):
            alone = smooth.certify_staged_batch(images[i:i + 1], 100, 2000, 0.01, 256, radii=[0.1, 0.3],
                                                stages=stages, seed=12, image_ids=ids[i:i + 1])
            for field in batch._fields:
                self.assertAllEqual(getattr(alone, field)[0], getattr(batch, field)[i], msg=field)
        predicted = smooth.predict_staged_batch(images, 2000, 0.01, 256, stages=stages, seed=12, image_ids=ids)
        self.assertTrue(np.all(np.isin(predicted.samples, stages)))
        alone = smooth.predict_staged_batch(images[3:4], 2000, 0.01, 256, stages=stages, seed=12, image_ids=ids[3:4])
        self.assertEqual((alone.classes[0], alone.samples[0]), (predicted.classes[3], predicted.samples[3]))

    def test_selection_as_certify_and_fresh_noise_per_stage(self):
        recorded = []
        smooth = smoothing.Smooth(_argmax_pixel_model(), 64, 0.5, noise="float")
        real = smooth._counts  # pylint: disable=protected-access

        def spy(images, num_samples, batch_size, keys, stream):
            counts = real(images, num_samples, batch_size, keys, stream)
            recorded.append((num_samples, stream, counts))
            return counts

        self.enter_context(tf.compat.v1.test.mock.patch.object(smooth, "_counts", spy))
        image = np.full((1, 8, 8, 1), 0.5, np.float32)
        # On a constant image the 64 classes are equally likely: no tie is
        # ever rejected, so PREDICT runs every stage and abstains.
        result = smooth.predict_staged_batch(image, 2000, 0.01, 250, stages=(500, 1000, 2000), seed=13)
        self.assertAllEqual(result.classes, [-1])
        self.assertAllEqual(result.samples, [2000])
        self.assertEqual([(n, stream) for n, stream, _ in recorded], [(500, 4), (500, 6), (1000, 8)])
        self.assertNotAllEqual(recorded[0][2], recorded[1][2])  # Same size, other noise.
        self.assertGreater(scipy_stats.chisquare(sum(c for _, _, c in recorded)[0]).pvalue, 1e-4)
        # CERTIFY's selection samples are certify_batch's own (stream 0);
        # estimation stage k uses stream 3 + 2 k.
        recorded.clear()
        smooth.certify_staged_batch(image, 500, 2000, 0.01, 250, radii=[0.5], stages=(500, 2000), seed=13)
        self.assertEqual([(n, stream) for n, stream, _ in recorded][:2], [(500, 0), (500, 3)])
        selection = recorded[0][2]
        recorded.clear()
        smooth.certify_batch(image, 500, 2000, 0.01, 250, seed=13)
        self.assertAllEqual(recorded[0][2], selection)

    def test_streams_distinct(self):
        streams = [smoothing.staged_stream(kind, k) for kind in (smoothing.ESTIMATION, smoothing.PREDICTION)
                   for k in range(1000)]
        self.assertLen(set(streams), 2000)
        self.assertEmpty(set(streams) & {smoothing.SELECTION, smoothing.ESTIMATION, smoothing.PREDICTION})
        with self.assertRaises(ValueError):
            smoothing.staged_stream(smoothing.SELECTION, 0)

    def test_traced_once(self):
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        smooth.certify_batch(self._images(3), 10, 100, 0.01, 64, seed=1)
        smooth.certify_staged_batch(self._images(5), 20, 2000, 0.01, 512, radii=[0.2, 0.4], seed=2)
        smooth.predict_staged_batch(self._images(2), 300, 0.01, 16, stages=(100, 300), seed=3)
        self.assertEqual(smooth._counts_fn.experimental_get_tracing_count(), 1)  # pylint: disable=protected-access

    def test_stage_rules(self):
        smooth = smoothing.Smooth(self.model, 2, 0.5, noise="float")
        images = self._images(2)
        # One stage below n0 is fixed-n CERTIFY: allowed, as certify_batch allows n < n0.
        result = smooth.certify_staged_batch(images, 100, 50, 0.01, 64, radii=[0.1], stages=(50,), seed=4)
        self.assertAllEqual(result.samples, [50, 50])
        # The default stages start at max(n0, 100).
        result = smooth.certify_staged_batch(images, 300, 1000, 0.01, 512, radii=[5.0], seed=4)
        self.assertTrue(np.all(np.isin(result.samples, (300, 500, 1000))))

    @parameterized.named_parameters(
        ("radius_zero", dict(radii=[0.0]), "^radii must"),
        ("radius_negative", dict(radii=[0.5, -0.5]), "^radii must"),
        ("radius_inf", dict(radii=[float("inf")]), "^radii must"),
        ("radius_nan", dict(radii=[float("nan")]), "^radii must"),
        ("no_radii", dict(radii=[]), "^radii must"),
        ("stages_not_increasing", dict(stages=(200, 100, 1000)), "^stages must strictly increase"),
        ("stages_not_ending_at_n", dict(stages=(100, 500)), "^stages must end at n=1000"),
        ("stage_below_n0", dict(stages=(50, 1000)), "^stages must start at n0=100"),
        ("stage_zero", dict(stages=(0, 1000)), "^stages must be integers >= 1"),
        ("n0", dict(n0=0), "^n0 must"),
        ("n", dict(n=0), "^n must"),
    )
    def test_bad_certify_arguments(self, override, word):
        smooth = smoothing.Smooth(self.model, 2, 0.25, noise="float")
        args = dict(n0=100, n=1000, alpha=0.01, batch_size=100, radii=[0.25], stages=None, seed=0)
        args.update(override)
        with self.assertRaisesRegex(ValueError, word):
            smooth.certify_staged_batch(self._images(1), **args)

    @parameterized.named_parameters(
        ("stages_not_ending_at_n", dict(stages=(100, 500)), "^stages must end at n=1000"),
        ("stages_not_increasing", dict(stages=(500, 500, 1000)), "^stages must strictly increase"),
        ("alpha", dict(alpha=1.5), "^alpha must"),
    )
    def test_bad_predict_arguments(self, override, word):
        smooth = smoothing.Smooth(self.model, 2, 0.25, noise="float")
        args = dict(n=1000, alpha=0.01, batch_size=100, stages=None, seed=0)
        args.update(override)
        with self.assertRaisesRegex(ValueError, word):
            smooth.predict_staged_batch(self._images(1), **args)


class NonFiniteLogitsTest(_LinearModelMixin, tf.test.TestCase):
    """A sample whose logits are not finite votes for no class (sample_counts); the bounds count it as a failure."""

    SIGMA, PIXEL, THRESHOLD = 0.5, 0, 0.8

    def setUp(self):
        super().setUp()
        self.w[self.PIXEL] = 0.0  # The NaN event must not depend on the linear class (closed form).
        self.b = float(-0.5 * self.w.sum())
        self.model = _linear_model(self.w, self.b)

    def _partly_nonfinite_images(self, margins, pixel_values):
        """Images at the signed radii `margins` of the linear part, with x[PIXEL] = pixel_values.

        Returns the images and each one's true (P(f = 0), P(f = 1)) [B, 2]
        (see `partly_nonfinite_model`).
        """
        images = self._images_at(margins).reshape(len(margins), -1)
        images[:, self.PIXEL] = pixel_values  # w[PIXEL] = 0: the margins do not move.
        images = images.reshape(-1, *_SHAPE)
        self.assertAllClose(_true_margin(self.w, self.b, images), margins, atol=1e-5)
        return images, partly_nonfinite_probabilities(images, self.w, self.b, self.PIXEL, self.THRESHOLD, self.SIGMA)

    def test_nan_weights_give_no_certificate_and_no_prediction(self):
        # argmax over all-NaN logits is 0: counted as votes, every sample
        # would be class 0 and certify it with p_lower = alpha^(1/n).
        smooth = smoothing.Smooth(with_nan_weights(self.model), 2, self.SIGMA, noise="float")
        images = self._images(4)
        counts = tf.function(lambda x: smoothing.sample_counts(
            smooth.base_model, x, 300, sigma=self.SIGMA, num_classes=2, batch_size=128, seed=[1, 2]))(images)
        self.assertAllEqual(counts, np.zeros((4, 2)))
        classes, radii = smooth.certify_batch(images, 100, 1000, 0.001, 500, seed=1)
        self.assertAllEqual(classes, [-1] * 4)
        self.assertAllEqual(radii, [0.0] * 4)
        self.assertAllEqual(smooth.predict_batch(images, 1000, 0.001, 500, seed=1), [-1] * 4)
        staged = smooth.certify_staged_batch(images, 100, 1000, 0.001, 500, radii=[0.1, 0.5], seed=1)
        self.assertAllEqual(staged.classes, [-1] * 4)
        self.assertAllEqual(staged.radii, [0.0] * 4)
        self.assertFalse(staged.certified.any())
        predicted = smooth.predict_staged_batch(images, 1000, 0.001, 500, seed=1)
        self.assertAllEqual(predicted.classes, [-1] * 4)
        self.assertAllEqual(predicted.samples, [1000] * 4)  # Abstains only at n_max.

    def test_partly_nonfinite_logits_count_for_no_class(self):
        # x_p = 0.55, t = 0.8, sigma = 0.5: q = Phi(0.5) = 0.6915 of the
        # samples vote; the rest have NaN logits. The voting count of each
        # image is Binomial(n, q): within 5 standard errors of n q (a false
        # alarm has probability < 1e-6 per image).
        model = partly_nonfinite_model(self.w, self.b, self.PIXEL, self.THRESHOLD)
        images, truth = self._partly_nonfinite_images([0.3, -0.3, 0.0], [0.55] * 3)
        n = 20000
        counts = tf.function(lambda x: smoothing.sample_counts(
            model, x, n, sigma=self.SIGMA, num_classes=2, batch_size=5000, seed=[3, 4]))(images).numpy()
        q = scipy_stats.norm.cdf(0.5)
        self.assertAllClose(counts.sum(axis=1) / n, [q] * 3, atol=5 * np.sqrt(q * (1 - q) / n))
        p = truth / truth.sum(axis=1, keepdims=True)  # Class shares among the voting samples.
        self.assertAllClose(counts / counts.sum(axis=1, keepdims=True), p, atol=5 * np.sqrt(0.25 / (n * q)))

    def test_partly_nonfinite_certificates_stay_sound(self):
        # CERTIFY's guarantee for the smoothed classifier that returns no
        # class for a NaN sample: with probability >= 1 - alpha, the bound
        # is below P(f = the returned class), i.e. the radius is at most
        # sigma Phi^-1 of it. Failures are Binomial(count, <= alpha): allowed
        # up to the (1 - 1e-6) quantile of Binomial(count, alpha). Counting
        # NaN samples as class 0 (argmax's answer) adds 1 - q in [0.16, 0.42]
        # to P(f = 0), far beyond the bound's slack at n = 500, so then most
        # images that return class 0 would fail.
        alpha, count = 0.1, 300
        smooth = smoothing.Smooth(partly_nonfinite_model(self.w, self.b, self.PIXEL, self.THRESHOLD), 2,
                                  self.SIGMA, noise="float")
        margins = self.rng.uniform(-0.5, 0.5, count)
        images, truth = self._partly_nonfinite_images(margins, self.rng.uniform(0.3, 0.7, count))
        limit = scipy_stats.binom.isf(1e-6, count, alpha)

        def failures(classes, radii):
            certified = classes >= 0
            p_true = truth[np.arange(count), np.maximum(classes, 0)]
            # Radii sigma Phi^-1(p) at p <= 1/2 are <= 0: any certificate of such a class fails.
            return int((certified & (radii > self.SIGMA * scipy_stats.norm.ppf(p_true) + 1e-5)).sum())

        classes, radii = smooth.certify_batch(images, 100, 500, alpha, 1000, seed=5)
        self.assertLessEqual(failures(classes, radii), limit)
        self.assertGreater((classes == 0).sum(), count // 10)  # Not vacuous: class 0 is certified often.
        staged = smooth.certify_staged_batch(images, 100, 2000, alpha, 1000, radii=[0.05, 0.2],
                                             stages=(100, 500, 2000), seed=5)
        self.assertLessEqual(failures(staged.classes, staged.radii), limit)
        self.assertGreater((staged.classes == 0).sum(), count // 10)



class GuardrailTest(tf.test.TestCase, parameterized.TestCase):
    """What Smooth refuses before any sampling (issue 24): pixels outside [0, 1], a model of the wrong width."""

    SHAPE, PIXEL = (4, 4, 1), 5

    @parameterized.parameters(("float", 1.5), ("grid", 1.5), ("float", -0.25), ("grid", -0.25),
                              ("float", np.nan), ("grid", np.nan))
    def test_pixel_outside_the_unit_interval_named_in_both_modes(self, mode, value):
        # On-grid images but one pixel; in grid mode too the message is about [0, 1], not the grid.
        images = np.full((2, *self.SHAPE), 128 / np.float32(255), np.float32)
        images[1, 2, 3, 0] = value
        smooth = smoothing.Smooth(threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5), 2, 0.25, noise=mode)
        with self.assertRaisesRegex(ValueError, r"^images\[1, 2, 3, 0\] = [-.0-9na]+ is outside \[0, 1\]"):
            smooth.certify_batch(images, 10, 10, 0.01, 100, seed=1)
        with self.assertRaisesRegex(ValueError, r"^images\[1, 2, 3, 0\] = "):
            smooth.sample_counts(images, 1, 100, seed=1)

    def test_model_of_another_width_refused(self):
        # Three logits for two classes: a sample voting class 2 would be counted in the next image's cells.
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5, num_classes=3)
        with self.assertRaisesRegex(ValueError, "outputs 3 logits per image, but num_classes=2"):
            smoothing.Smooth(model, 2, 0.25)
        with self.assertRaisesRegex(ValueError, "outputs 3 logits per image, but num_classes=2"):
            smoothing.sample_counts(model, np.zeros((1, *self.SHAPE), np.float32), 4, sigma=0.25, num_classes=2,
                                    batch_size=4, seed=[1, 2])

    def test_sample_counts_draws_its_own_stream(self):
        # f = [x_p > 1/2] at x_p = 128/255 (just above 1/2): Smooth.sample_counts counts num_samples per image from
        # the PROBE stream, reproducibly, and not the noise of CERTIFY's selection samples (stream 0).
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5)
        images = np.full((3, *self.SHAPE), 128 / np.float32(255), np.float32)
        smooth = smoothing.Smooth(model, 2, 0.25)
        counts = smooth.sample_counts(images, 200, 100, seed=4)
        self.assertAllEqual(counts.sum(axis=1), [200] * 3)
        self.assertAllEqual(counts, smooth.sample_counts(images, 200, 100, seed=4))
        keys = np.stack([np.full(3, 4), np.arange(3)], axis=1)
        selection = smooth._counts(images, 200, 100, keys, smoothing.SELECTION)  # pylint: disable=protected-access
        self.assertNotAllEqual(counts, selection)


if __name__ == "__main__":
    tf.test.main()


class GridNoiseTest(tf.test.TestCase, parameterized.TestCase):
    """Grid mode (`noise="grid"`) against the closed form of a threshold on one pixel.

    f(x) = [x_p > 1/2] sees (a + j) / 255 in grid mode (a the integer pixel, j
    the integer noise); 1/2 = 127.5 / 255 lies between two grid values, so
    f = 1 iff a + j >= 128, and under the exactly rounded Gaussian
    j = round(255 delta), P(j >= 128 - a) = P(255 delta >= 127.5 - a) =
    Phi((a / 255 - 1/2) / sigma): the smoothed f o round has the float closed
    form P(f = 1) = Phi((x_p - 1/2) / sigma), and g's exact L2 radius at x is
    |x_p - 1/2| (Cohen et al.'s theorem holds for the base classifier f o round).
    """

    SHAPE, PIXEL, SIGMA = (4, 4, 1), 5, 0.25

    def _images(self, rng, pixel_levels):
        levels = rng.integers(0, 256, size=(len(pixel_levels), int(np.prod(self.SHAPE))))
        levels[:, self.PIXEL] = pixel_levels
        return (levels.astype(np.float32) / np.float32(255)).reshape(-1, *self.SHAPE), levels[:, self.PIXEL]

    def _slack(self):
        # tv_slack(16) recomputed from the per-pixel slack: d * slack rounded up, in exact rationals.
        table = noise.grid_noise_table(self.SIGMA)
        exact = fractions.Fraction(table.tv_slack_per_pixel) * int(np.prod(self.SHAPE))
        value = float(exact)
        return value if fractions.Fraction(value) >= exact else math.nextafter(value, math.inf)

    def test_counts_follow_the_closed_form(self):
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5)
        images, levels = self._images(np.random.default_rng(0), [140])
        n = 40000
        counts = tf.function(lambda x, s: smoothing.sample_counts(
            model, x, n, sigma=self.SIGMA, num_classes=2, batch_size=4000, seed=s,
            grid=noise.grid_noise_table(self.SIGMA)))(tf.constant(images), tf.constant([8, 9], tf.int64)).numpy()[0]
        expected = scipy_stats.norm.cdf((levels[0] / 255 - 0.5) / self.SIGMA)
        # 5 binomial standard deviations; the table's law is within 1.5e-11 of the exact one (tv_slack).
        self.assertAllClose(counts[1] / n, expected, atol=5 * np.sqrt(expected * (1 - expected) / n))

    def test_image_noise_independent_of_batch_and_differs_from_float(self):
        model = _argmax_pixel_model()
        images = np.full((6, 8, 8, 1), 128 / 255, np.float32)
        seeds = np.array([[7, i] for i in range(6)], np.int64)
        table = noise.grid_noise_table(0.5)

        def counts(x, s, grid):
            return smoothing.sample_counts(model, tf.constant(x), 300, sigma=0.5, num_classes=64, batch_size=1000,
                                           seed=tf.constant(s), grid=grid).numpy()

        batched = counts(images, seeds, table)
        self.assertAllEqual(batched.sum(axis=1), [300] * 6)
        self.assertAllEqual(batched[4], counts(images[4:5], seeds[4:5], table)[0])
        self.assertNotAllEqual(batched[4], batched[3])
        self.assertNotAllEqual(batched, counts(images, seeds, None))

    def test_sample_counts_refuses_a_table_of_another_sigma(self):
        with self.assertRaisesRegex(ValueError, "sigma=0.5"):
            smoothing.sample_counts(_argmax_pixel_model(), np.zeros((1, 8, 8, 1)), 5, sigma=0.25, num_classes=64,
                                    batch_size=4, seed=[1, 2], grid=noise.grid_noise_table(0.5))

    def test_certified_radius_valid_beyond_alpha_rate(self):
        # As ClosedFormInBothDtypesTest's test: with probability >= 1 - alpha per
        # image the class is g(x) and the radius at most |x_p - 1/2|. Grid mode
        # has no float rounding between the closed form and the counts (the
        # decision a + j >= 128 is on integers); the margin a / 255 - 1/2 is
        # computed in float64 (error < 1e-16), so 1e-12 is ample.
        alpha, count = 0.1, 400
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5)
        rng = np.random.default_rng(1)
        images, levels = self._images(rng, rng.integers(0, 256, size=count))
        margin = levels / 255 - 0.5
        smooth = smoothing.Smooth(model, 2, self.SIGMA, noise="grid")
        classes, radii = smooth.certify_batch(images, n0=20, n=50, alpha=alpha, batch_size=1000, seed=1)
        certified = classes != smooth.ABSTAIN
        wrong = certified & ((classes != (margin > 0)) | (radii > np.abs(margin) + 1e-12))
        # Allowed: the 1 - 1e-6 quantile of Binomial(count, alpha); not vacuous: some failures (about alpha / 2).
        self.assertLessEqual(int(wrong.sum()), scipy_stats.binom.isf(1e-6, count, alpha))
        self.assertGreater(int(wrong.sum()), 0)
        self.assertGreater(certified.sum(), count // 2)

    def test_bounds_take_the_slack(self):
        # f(x) = [x_p > -1] on x_p = 1 (a = 255): every sample is class 1 in
        # both modes (grid: (255 + j) / 255 >= (255 - 455) / 255 > -1 for
        # |j| <= J = 455; float: 1 + 0.25 z > -1 needs z > -8, and the
        # sampler's tails stop at |z| ~ 5.7). So k = n, and CERTIFY's p_lower is
        # the engine's bound of (n, n) at alpha, lowered by the slack in grid mode.
        n, alpha = 200, 0.01
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, -1.0)
        images, _ = self._images(np.random.default_rng(2), [255])
        slack = self._slack()
        self.assertEqual(slack, smoothing.Smooth(model, 2, self.SIGMA, noise="grid").slack(images))
        results = {}
        for mode in ("float", "grid"):
            smooth = smoothing.Smooth(model, 2, self.SIGMA, noise=mode)
            staged = smooth.certify_staged_batch(images, 10, n, alpha, 1000, radii=[0.1], stages=[n], seed=3)
            self.assertAllEqual(staged.samples, [n])
            classes, radii = smooth.certify_batch(images, 10, n, alpha, 1000, seed=3)
            results[mode] = staged.p_lower[0], classes[0], radii[0]
        (float_lower, _, float_radius), (grid_lower, grid_class, grid_radius) = results["float"], results["grid"]
        self.assertEqual(float_lower, float(engine.clopper_pearson_lower(n, n, alpha)))
        # Engine: the float subtraction (half an ulp) then one step down: within 1.5 ulp below the exact difference.
        exact = fractions.Fraction(float_lower) - fractions.Fraction(slack)
        self.assertLessEqual(fractions.Fraction(grid_lower), exact)
        self.assertGreaterEqual(fractions.Fraction(grid_lower), exact - fractions.Fraction(3, 2) * fractions.Fraction(
            np.spacing(float_lower)))
        # Fixed-n CERTIFY decides on the same lowered bound: the engine's radius of it.
        expected = engine.certify_decision([1], engine.clopper_pearson_lower([n], n, alpha, slack), self.SIGMA)
        self.assertEqual((grid_class, grid_radius), (1, float(expected[1][0])))
        self.assertLess(grid_radius, float_radius)

    def test_predict_level_pays_n_slack(self):
        slack = self._slack()
        level = smoothing.grid_predict_alpha(0.001, 1000, slack)
        self.assertLessEqual(fractions.Fraction(level), fractions.Fraction(0.001) - 1000 * fractions.Fraction(slack))
        self.assertGreater(level, 0.001 - 1000 * slack - 1e-18)  # one rounding of a number near 1e-3: < 2.2e-19
        # A level that n slack uses up: PREDICT (full and staged) refuses to run rather than test at <= 0.
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5)
        images, _ = self._images(np.random.default_rng(3), [200])
        smooth = smoothing.Smooth(model, 2, self.SIGMA, noise="grid")
        with self.assertRaisesRegex(ValueError, "use up alpha"):
            smooth.predict_batch(images, 1000, 1e-9, 1000, seed=1)
        with self.assertRaisesRegex(ValueError, "use up alpha"):
            smooth.predict_staged_batch(images, 1000, 1e-9, 1000, stages=[100, 1000], seed=1)
        self.assertAllEqual(smooth.predict_batch(images, 1000, 0.001, 1000, seed=1), [1])
        self.assertAllEqual(smoothing.Smooth(model, 2, self.SIGMA, noise="float").predict_batch(
            images, 1000, 1e-9, 1000, seed=1), [1])

    def test_off_grid_image_refused_naming_the_pixel(self):
        model = threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5)
        images, _ = self._images(np.random.default_rng(4), [200, 201])
        images[1, 2, 3, 0] = np.nextafter(images[1, 2, 3, 0], np.float32(1))
        smooth = smoothing.Smooth(model, 2, self.SIGMA, noise="grid")
        with self.assertRaisesRegex(ValueError, r"images\[1, 2, 3, 0\] = .* is not on the 8-bit grid"):
            smooth.certify_batch(images, 10, 10, 0.01, 100, seed=1)
        # Float noise takes it; grid's message says so.
        smoothing.Smooth(model, 2, self.SIGMA, noise="float").certify_batch(images, 10, 10, 0.01, 100, seed=1)
        with self.assertRaisesRegex(ValueError, 'noise="float" is for inputs that are not quantized'):
            smooth.predict_batch(images, 10, 0.01, 100, seed=1)

    def test_grid_is_the_default(self):
        # certify_spec.DEFAULT_NOISE, written once: an off-grid image is refused by a Smooth built without `noise`.
        smooth = smoothing.Smooth(threshold_models.threshold_model(self.SHAPE, self.PIXEL, 0.5), 2, self.SIGMA)
        self.assertEqual(smooth.noise, "grid")
        with self.assertRaisesRegex(ValueError, r"images\[0, 0, 0, 0\] = 0.5 is not on the 8-bit grid.*noise=\"float"):
            smooth.certify_batch(np.full((1, *self.SHAPE), 0.5, np.float32), 10, 10, 0.01, 100, seed=1)

    def test_unknown_mode_refused(self):
        with self.assertRaisesRegex(ValueError, "noise must be one of"):
            smoothing.Smooth(_argmax_pixel_model(), 64, 0.5, noise="gird")
