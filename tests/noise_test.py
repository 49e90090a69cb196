"""Tests for tf_consreg.noise: the sampler, the seeds, and noise under 2 replicas.

The multi-replica tests use the 2 logical CPU devices that conftest.py makes.
"""

from absl.testing import parameterized
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
