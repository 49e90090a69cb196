"""Tests for tf_consreg.noise: the float sampler, the seeds, noise under 2 replicas, and the exact grid sampler.

The multi-replica tests use the 2 logical CPU devices that conftest.py makes.
"""

import decimal
import fractions
import os
import tempfile

from absl.testing import parameterized
import mpmath
import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

from tf_consreg import noise


def _mirrored():
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(cpus) >= 2, "conftest.py should have made 2 logical CPU devices"
    return tf.distribute.MirroredStrategy(cpus[:2], cross_device_ops=tf.distribute.ReductionToOneDevice())


class StandardNormalTest(tf.test.TestCase, parameterized.TestCase):

    def test_is_standard_normal(self):
        z = noise.standard_normal(tf.constant([50, 28, 28, 1]), tf.constant([1, 2], tf.int64)).numpy()
        self.assertEqual(z.shape, (50, 28, 28, 1))
        self.assertEqual(z.dtype, np.float32)
        flat = z.ravel().astype(np.float64)
        self.assertGreater(scipy_stats.kstest(flat, "norm").pvalue, 1e-4)
        # Mean and variance within 5 standard errors (n = 39,200).
        self.assertLess(abs(flat.mean()), 5 / np.sqrt(flat.size))
        self.assertLess(abs(flat.var() - 1), 5 * np.sqrt(2 / flat.size))
        # The two halves come from the cosine and sine of the same pairs:
        # independent, so uncorrelated.
        half = flat.size // 2
        self.assertLess(abs(np.corrcoef(flat[:half], flat[half:])[0, 1]), 5 / np.sqrt(half))

    @parameterized.parameters(1, 7, 784)
    def test_any_size(self, size):
        z = noise.standard_normal(tf.constant([size]), tf.constant([3, 4], tf.int64))
        self.assertEqual(z.shape, (size,))
        self.assertTrue(np.all(np.isfinite(z.numpy())))

    def test_deterministic_per_seed(self):
        shape = tf.constant([1000])
        a, b, c = (noise.standard_normal(shape, tf.constant(s, tf.int64)).numpy()
                   for s in ([5, 6], [5, 6], [5, 7]))
        self.assertAllEqual(a, b)
        self.assertGreater(np.abs(a - c).min(), 0)



class TrainingNoiseTest(tf.test.TestCase):

    def test_noise_has_sigma_and_differs_per_copy_and_example(self):
        images = tf.zeros([64, 8, 8, 1])
        seeds = noise.example_seeds(noise.step_seed(3, 1, 5), 64)
        drawn = noise.gaussian_noise(images, 2, 0.5, seeds).numpy().reshape(2, 64, -1)
        self.assertAllClose(drawn.std(), 0.5, rtol=0.02)
        self.assertAllClose(drawn.mean(), 0.0, atol=0.01)
        # Copies of one example, and different examples, are not correlated.
        self.assertLess(abs(np.corrcoef(drawn[0].ravel(), drawn[1].ravel())[0, 1]), 0.02)
        self.assertLess(abs(np.corrcoef(drawn[0, 0], drawn[0, 1])[0, 1]), 0.3)

    def test_steps_draw_fresh_noise_and_seed_reproduces(self):
        images = tf.zeros([4, 8, 8, 1])

        def draw(seed, step):
            return noise.gaussian_noise(images, 2, 1.0, noise.example_seeds(noise.step_seed(seed, 1, step), 4)).numpy()

        self.assertAllEqual(draw(1, 0), draw(1, 0))
        self.assertNotAllClose(draw(1, 0), draw(1, 1))
        self.assertNotAllClose(draw(1, 0), draw(2, 0))


class ReplicaNoiseTest(tf.test.TestCase):

    def test_replicas_draw_different_noise_for_identical_inputs(self):
        strategy = _mirrored()
        seed = noise.step_seed(0, 1, 0)

        def draw():
            images = tf.zeros([4, 5, 5, 1])  # Identical on both replicas.
            seeds = noise.example_seeds(seed, tf.shape(images)[0])
            return noise.gaussian_noise(images, 2, 1.0, seeds)

        per_replica = strategy.experimental_local_results(strategy.run(tf.function(draw)))
        self.assertLen(per_replica, 2)
        first, second = (t.numpy() for t in per_replica)
        self.assertGreater(np.abs(first - second).min(), 0.0)
        self.assertLess(abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]), 0.2)

    def test_noise_of_an_example_does_not_depend_on_the_replica_count(self):
        # The basis of the update test: the global batch's noise is the same
        # whether one device or two replicas draw it.
        strategy = _mirrored()
        seed = noise.step_seed(5, 1, 2)
        images = tf.zeros([8, 3, 3, 1])
        single = noise.gaussian_noise(images, 2, 1.0, noise.example_seeds(seed, 8)).numpy()

        def draw(local):
            return noise.gaussian_noise(local, 2, 1.0, noise.example_seeds(seed, tf.shape(local)[0]))

        ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(images).unbatch().batch(8))
        local = strategy.experimental_local_results(strategy.run(tf.function(draw), args=(next(iter(ds)),)))
        # Each replica returns its 4 examples copy-major: [copy0 x4, copy1 x4].
        halves = [t.numpy().reshape(2, 4, 3, 3, 1) for t in local]
        self.assertAllClose(single.reshape(2, 8, 3, 3, 1), np.concatenate(halves, axis=1))


# ---------------------------------------------------------------------------
# Exact grid noise. The references are mpmath at 60 digits (independent of
# the decimal series in noise.py), scipy's chi-squared quantiles, and plain
# numpy/integer reimplementations.
# ---------------------------------------------------------------------------

_TWO_64 = 1 << 64
_SIGMAS = (0.12, 0.25, 0.5, 1.0)
_FALSE_FAILURE = 1e-6  # the chance that a statistical check below fails although the code is right


_DIGITS = 60
_saved_digits = []


def setUpModule():  # pylint: disable=invalid-name
    # mpmath's precision is global: set it for this file's tests only.
    _saved_digits.append(mpmath.mp.dps)
    mpmath.mp.dps = _DIGITS


def tearDownModule():  # pylint: disable=invalid-name
    mpmath.mp.dps = _saved_digits.pop()


def _mp_cdf(twice_cut: int, sigma: float) -> mpmath.mpf:
    """Phi(c / (255 sigma)) in mpmath at the cut point c = twice_cut / 2 (c = j + 1/2: twice_cut = 2j + 1)."""
    return mpmath.ncdf(mpmath.mpf(twice_cut) / 2 / (255 * mpmath.mpf(sigma)))


def _mp_probabilities(table: noise.GridNoise):
    """The exact rounded-Gaussian P(j), j = -J..J, in mpmath."""
    cdf = [_mp_cdf(2 * j + 1, table.sigma) for j in range(-table.j_max - 1, table.j_max + 1)]
    return [b - a for a, b in zip(cdf[:-1], cdf[1:])]


class PhiTest(parameterized.TestCase):

    def test_pi_constant(self):
        self.assertLess(abs(mpmath.mpf(str(noise._PI)) - mpmath.pi), mpmath.mpf(10) ** -74)

    @parameterized.parameters(0.0, 1e-9, 0.3, -0.3, 1.0, -1.7, 2.5, 5.0, -5.0, 7.13, -7.2, 8.5, 12.0, 14.99, 15.0,
                              -15.0, 30.0, 1e6)
    def test_phi_within_its_error_bound(self, y):
        # mpmath at 60 digits is exact to ~1e-60, far below the stated bound 1e-45.
        got = noise._phi(decimal.Decimal(y))
        self.assertLessEqual(abs(mpmath.mpf(str(got)) - mpmath.ncdf(mpmath.mpf(y))), mpmath.mpf(10) ** -45)


class GridTableTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(*_SIGMAS)
    def test_j_max_is_the_smallest_with_tail_below_1e_12(self, sigma):
        table = noise.grid_noise_table(sigma)

        def tail(j_max):
            return 2 * (1 - _mp_cdf(2 * j_max + 1, sigma))

        self.assertLess(tail(table.j_max), 1e-12)
        self.assertGreaterEqual(tail(table.j_max - 1), 1e-12)
        self.assertGreaterEqual(table.tail_bound, tail(table.j_max))

    @parameterized.parameters(*_SIGMAS)
    def test_masses_are_the_floored_cdf_over_2_64(self, sigma):
        table = noise.grid_noise_table(sigma)
        masses = table.masses
        self.assertEqual(sum(masses), _TWO_64)
        self.assertEqual(masses, masses[::-1])
        self.assertGreaterEqual(min(masses), 0)
        # Each inner cut C(j + 1/2) is within 2^-64 + 1e-45 of Phi: floor of 2^64 Phi above 0, its mirror below.
        cut = 0
        slack = mpmath.mpf(_TWO_64) * mpmath.mpf(10) ** -45
        for j, mass in zip(range(-table.j_max, table.j_max), masses[:-1]):
            cut += mass
            exact = _TWO_64 * _mp_cdf(2 * j + 1, sigma)
            self.assertLessEqual(abs(cut - exact), 1 + slack, msg=f"cut {j} + 1/2")
            if j >= 0:
                self.assertEqual(cut, int(mpmath.floor(exact)), msg=f"cut {j} + 1/2")

    @parameterized.parameters(*_SIGMAS)
    def test_tv_slack_bounds_the_exact_total_variation(self, sigma):
        # TV between the table's law and the untruncated rounded Gaussian, in mpmath: half the sum of |differences|
        # over [-J, J] plus half the tail mass the table does not hold.
        table = noise.grid_noise_table(sigma)
        exact = _mp_probabilities(table)
        tail = 2 * (1 - _mp_cdf(2 * table.j_max + 1, sigma))
        tv = (mpmath.fsum(abs(mpmath.mpf(m) / _TWO_64 - p) for m, p in zip(table.masses, exact)) + tail) / 2
        self.assertLessEqual(tv, table.tv_slack_per_pixel)
        # The slack is dominated by the 1e-12 tail, with bins * 2^-64 on top.
        self.assertLess(table.tv_slack_per_pixel, 1e-12 + table.num_bins * 2.0**-63)
        self.assertGreaterEqual(fractions.Fraction(table.tv_slack(784)), 784 * fractions.Fraction(table.tv_slack_per_pixel))

    @parameterized.parameters(*_SIGMAS)
    def test_alias_table_reproduces_the_masses_exactly(self, sigma):
        table = noise.grid_noise_table(sigma)
        bits = table.index_bits
        capacity = 1 << (64 - bits)
        got = [0] * (1 << bits)
        for bucket, (threshold, alias) in enumerate(zip(table.thresholds.tolist(), table.aliases.tolist())):
            self.assertTrue(0 <= threshold <= capacity)
            got[bucket] += threshold
            got[alias] += capacity - threshold
        self.assertEqual(got, list(table.masses) + [0] * ((1 << bits) - table.num_bins))
        # The packed form grid_noise gathers decodes to min(threshold, capacity - 1) and the alias.
        packed = table.packed.astype(np.int64) + (1 << 31)
        self.assertAllEqual(packed & ((1 << bits) - 1), table.aliases)
        clipped = (packed >> bits << 32) + table.low_thresholds
        self.assertAllEqual(clipped, np.minimum(table.thresholds, capacity - 1))
        # Clipping a full bucket is harmless only because it aliases to itself.
        full = np.flatnonzero(table.thresholds == capacity)
        self.assertAllEqual(table.aliases[full], full)

    @parameterized.parameters(0.0, -0.25, float("nan"), float("inf"), 16.5)
    def test_bad_sigma(self, sigma):
        with self.assertRaisesRegex(ValueError, r"^grid noise: sigma must be in \(0, 16\], got"):
            noise.grid_noise_table(sigma)

    def test_tiny_sigma_is_all_zero_noise(self):
        # sigma = 1e-6: the cut at 1/2 is 1961 standard deviations out, so j = 0 always (J = 0, one bin).
        table = noise.grid_noise_table(1e-6)
        self.assertEqual((table.j_max, table.masses), (0, (_TWO_64,)))
        self.assertAllEqual(noise.grid_noise(tf.constant([1000]), tf.constant([1, 2], tf.int64), table), [0] * 1000)

    def test_cached_per_sigma(self):
        self.assertIs(noise.grid_noise_table(0.25), noise.grid_noise_table(0.25))


class FairBitsTest(tf.test.TestCase):
    """TensorFlow's full-range stateless integers, the bits grid_noise spends, are fair.

    2^20 words of each dtype grid_noise uses (int32 for the words, uint32 for
    the low bits of ties). Each of the 32 bit positions must be set in half
    the words: |ones - n/2| <= z sqrt(n/4), z from a Bonferroni split of
    `_FALSE_FAILURE` over all bits. Then a chi-squared test of the low 10 bits
    (the bucket index at sigma = 0.25), of the top 8 bits, and of the low 4
    bits jointly with the top 4 (they decide a bucket and its comparison),
    each at `_FALSE_FAILURE` / 3.
    """

    def _check(self, words: np.ndarray):
        n = words.size
        bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
        ones = bits.sum(axis=0)
        z = scipy_stats.norm.isf(_FALSE_FAILURE / 2 / 32)
        self.assertLess(np.abs(ones - n / 2).max(), z * np.sqrt(n / 4))
        for cells, name in ((words & 1023, "low 10 bits"), (words >> 24, "top 8 bits"),
                            (((words >> 28) << 4) | (words & 15), "low 4 with top 4 bits")):
            size = int(cells.max()) + 1
            counts = np.bincount(cells.astype(np.int64), minlength=size)
            chi2 = ((counts - n / size) ** 2 / (n / size)).sum()
            self.assertLess(chi2, scipy_stats.chi2.isf(_FALSE_FAILURE / 3, size - 1), msg=name)

    def test_int32_words(self):
        words = tf.random.stateless_uniform([1 << 20], seed=[7, 11], dtype=tf.int32, minval=None, maxval=None)
        self.assertEqual(words.dtype, tf.int32)
        self._check(words.numpy().view(np.uint32))

    def test_uint32_words(self):
        self._check(tf.random.stateless_uniform([1 << 20], seed=[7, 12], dtype=tf.uint32, minval=None,
                                                maxval=None).numpy())


def _reference_draw(shape, seed, table: noise.GridNoise) -> np.ndarray:
    """grid_noise redone in numpy with the plain 64-bit alias comparison (no packing, no signed offset)."""
    keys = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), 2)
    words = tf.random.stateless_uniform(shape, keys[0], dtype=tf.int32, minval=None, maxval=None).numpy()
    # grid_noise reads a signed word w as the unsigned w + 2^31 (a fixed bijection of fair bits).
    words = (words.astype(np.int64) + (1 << 31)).astype(np.uint64).ravel()
    bits = table.index_bits
    bucket = (words & np.uint64((1 << bits) - 1)).astype(np.int64)
    high = words >> np.uint64(bits)
    threshold = table.thresholds[bucket].astype(np.uint64)
    # The low 32 bits of r, from the second key at the same position, matter only where the high parts tie.
    clipped = np.minimum(threshold, np.uint64((1 << (64 - bits)) - 1))
    tie = high == clipped >> np.uint64(32)
    low = np.where(tie, tf.random.stateless_uniform(shape, keys[1], dtype=tf.uint32, minval=None,
                                                    maxval=None).numpy().ravel().astype(np.uint64), 0)
    r = (high << np.uint64(32)) | low
    keep = r < threshold
    value = np.where(keep, bucket, table.aliases[bucket]) - table.j_max
    return value.reshape(shape), int(tie.sum())


class GridNoiseTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(0.12, 0.5)
    def test_chi_squared_of_ten_million_draws(self, sigma):
        # Against mpmath's exact rounded-Gaussian probabilities (which differ from the table's by < 1e-12 in
        # total). Bins with an expected count below 5 are pooled into the two tails. Threshold: the chi-squared
        # quantile at _FALSE_FAILURE; the seed is fixed.
        table = noise.grid_noise_table(sigma)
        n = 10_000_000
        j = noise.grid_noise(tf.constant([n]), tf.constant([2026, 20], tf.int64), table).numpy()
        self.assertEqual(j.dtype, np.int32)
        self.assertBetween(int(j.min()), -table.j_max, 0)
        self.assertBetween(int(j.max()), 0, table.j_max)
        counts = np.bincount(j + table.j_max, minlength=table.num_bins)
        expected = np.array([float(p) for p in _mp_probabilities(table)]) * n
        inner = np.flatnonzero(expected >= 5)
        first, last = inner[0], inner[-1]
        observed = np.concatenate([[counts[:first].sum()], counts[first:last + 1], [counts[last + 1:].sum()]])
        wanted = np.concatenate([[expected[:first].sum()], expected[first:last + 1], [expected[last + 1:].sum()]])
        chi2 = ((observed - wanted) ** 2 / wanted).sum()
        self.assertLess(chi2, scipy_stats.chi2.isf(_FALSE_FAILURE, observed.size - 1))

    def test_matches_the_plain_64_bit_alias_method_including_ties(self):
        # sigma = 1: 2^12 buckets, so a tie of the high parts has probability ~2^-20 per value and 4 million
        # values hold a few (the seed is fixed; the test asserts that some occur).
        table = noise.grid_noise_table(1.0)
        shape, seed = [2000, 2000], [3, 14]
        got = noise.grid_noise(tf.constant(shape), tf.constant(seed, tf.int64), table).numpy()
        want, ties = _reference_draw(shape, seed, table)
        self.assertGreater(ties, 0)
        self.assertAllEqual(got, want)

    def test_stateless_in_a_graph_under_xla_and_in_a_saved_model(self):
        table = noise.grid_noise_table(0.25)
        shape, seed = tf.constant([7, 28, 28, 1]), tf.constant([5, 6], tf.int64)
        eager = noise.grid_noise(shape, seed, table).numpy()
        self.assertAllEqual(eager, noise.grid_noise(shape, seed, table).numpy())
        self.assertNotAllEqual(eager, noise.grid_noise(shape, tf.constant([5, 7], tf.int64), table).numpy())

        module = tf.Module()
        module.draw = tf.function(lambda s: noise.grid_noise(shape, s, table),
                                  input_signature=[tf.TensorSpec([2], tf.int64)])
        self.assertAllEqual(eager, module.draw(seed).numpy())
        # Static shapes throughout, so it also compiles under XLA. XLA's stateless kernels give other bits than
        # TensorFlow's for most seeds (standard_normal's too), so only determinism and the range are checked.
        compiled = tf.function(lambda s: noise.grid_noise(shape, s, table), jit_compile=True)
        under_xla = compiled(seed).numpy()
        self.assertAllEqual(under_xla, compiled(seed).numpy())
        self.assertEqual(under_xla.dtype, np.int32)
        self.assertLessEqual(np.abs(under_xla).max(), table.j_max)
        with tempfile.TemporaryDirectory() as directory:
            tf.saved_model.save(module, os.path.join(directory, "m"))
            loaded = tf.saved_model.load(os.path.join(directory, "m"))
            self.assertAllEqual(eager, loaded.draw(seed).numpy())


class GridInputsTest(tf.test.TestCase):

    def test_same_sum_same_bits_in_grid_mode_but_not_in_float_mode(self):
        table = noise.grid_noise_table(0.25)
        a = np.arange(256, dtype=np.int32)[:, None]
        j = np.arange(-table.j_max, table.j_max + 1, dtype=np.int32)[None, :]
        total = (a + j).ravel()
        grid = noise.grid_inputs(tf.constant(a), tf.constant(j)).numpy().ravel()
        # Grid mode: every (a, j) is float32(a + j) / 255, as numpy's IEEE float32 division gives it.
        want = total.astype(np.float32) / np.float32(255)
        self.assertEqual(grid.view(np.uint32).tolist(), want.view(np.uint32).tolist())
        # Float mode adds float32 pixels and float32 noise: pairs with the same a + j round differently.
        floats = (tf.cast(a, tf.float32) / 255.0 + tf.cast(j, tf.float32) / 255.0).numpy().ravel()
        order = np.argsort(total, kind="stable")
        same_sum = total[order][1:] == total[order][:-1]
        differ = floats[order][1:].view(np.uint32) != floats[order][:-1].view(np.uint32)
        self.assertGreater(int(np.sum(same_sum & differ)), 1000)
        # E.g. a = 1, j = 2 against a = 0, j = 3.
        one_two = np.float32(1) / np.float32(255) + np.float32(2) / np.float32(255)
        self.assertNotEqual(one_two, np.float32(3) / np.float32(255))
        self.assertEqual(noise.grid_inputs(tf.constant(1), tf.constant(2)).numpy(),
                         noise.grid_inputs(tf.constant(0), tf.constant(3)).numpy())

    def test_uint8_pixels(self):
        self.assertAllEqual(noise.grid_inputs(tf.constant([200], tf.uint8), tf.constant([100])).numpy(),
                            np.float32([300]) / np.float32(255))


class ToGridTest(tf.test.TestCase):

    def test_round_trips_the_pipelines_images(self):
        levels = tf.range(256, dtype=tf.int32)
        images = tf.cast(tf.cast(levels, tf.uint8), tf.float32) / 255.0  # data.py's conversion
        self.assertAllEqual(noise.to_grid(images), levels)
        self.assertAllEqual(noise.to_grid(tf.cast(images, tf.float64)), levels)
        self.assertAllEqual(noise.to_grid(tf.reshape(images, [4, 8, 8, 1])), tf.reshape(levels, [4, 8, 8, 1]))

    def test_refuses_the_first_pixel_off_the_grid(self):
        images = np.tile(np.float32(np.arange(256)) / np.float32(255), (2, 1))
        off = np.nextafter(images[1, 77], np.float32(1))
        images[1, 77] = off
        images[1, 100] = 0.5
        with self.assertRaisesRegex(ValueError, rf"^images\[1, 77\] = {float(off)!r} is not on the 8-bit grid"):
            noise.to_grid(tf.constant(images))

    def test_refuses_nan_and_values_outside_0_1(self):
        for value in (float("nan"), -1 / 255, 256 / 255, 1e30):
            with self.assertRaisesRegex(ValueError, r"^images\[0\] = .* is not on the 8-bit grid"):
                noise.to_grid(tf.constant([value, 0.0], tf.float32))

    def test_refuses_float64_between_float32_values(self):
        with self.assertRaisesRegex(ValueError, r"^images\[0\]"):
            noise.to_grid(tf.constant([0.5 + 1e-12], tf.float64))

    def test_empty_images(self):
        self.assertEqual(noise.to_grid(tf.zeros([0, 3])).shape, (0, 3))
        self.assertEqual(tf.function(noise.to_grid)(tf.zeros([0, 3])).shape, (0, 3))

    def test_refuses_integer_images(self):
        with self.assertRaisesRegex(ValueError, r"^to_grid: images must be float in \[0, 1\], got uint8"):
            noise.to_grid(tf.constant([3], tf.uint8))

    def test_assertion_in_a_graph(self):
        to_grid = tf.function(noise.to_grid)
        self.assertAllEqual(to_grid(tf.constant([0.0, 1.0])), [0, 255])
        # Every level, as numpy's correctly rounded float32 division and tf.data give them; a division in the
        # graph would be rewritten to a multiplication by 1/255 and refuse half of them.
        levels = np.arange(256)
        self.assertAllEqual(to_grid(tf.constant(levels.astype(np.float32) / np.float32(255))), levels)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "not on the 8-bit grid"):
            to_grid(tf.constant([0.0, 0.3]))
