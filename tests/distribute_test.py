"""Training under MirroredStrategy with 2 logical CPU devices (set in conftest.py).

Two traps of data-parallel smoothing training:
(a) every loss term must be scaled the same way across replicas, so 2 replicas
    make the same update as 1 device on the same data and noise;
(b) each replica must draw its own noise (a Keras SeedGenerator has the same
    state on every replica).
"""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras

from tf_consreg import distribute
from tf_consreg import training


def _mirrored():
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(cpus) >= 2, "conftest.py should have made 2 logical CPU devices"
    return tf.distribute.MirroredStrategy(cpus[:2], cross_device_ops=tf.distribute.ReductionToOneDevice())


def _train(strategy, method, weights, images, labels, epochs=2):
    with strategy.scope():
        inputs = keras.Input((6, 6, 1))
        hidden = keras.layers.Dense(8, activation="tanh")(keras.layers.Flatten()(inputs))
        base = keras.Model(inputs, keras.layers.Dense(4)(hidden))
        base.set_weights(weights)
        model = training.ConsistencyModel(base, sigma=0.5, num_noise=1 if method == "stability" else 3,
                                          method=method, lbd=10.0, eta=0.5, beta=2.0, gamma=8.0, epsilon=0.5,
                                          num_steps=2, adv_training=method == "consistency_adv",
                                          weight_decay=0.01, seed=3)
        if method == "consistency_adv":
            model.method = "consistency"
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8, drop_remainder=True)
    history = model.fit(ds, epochs=epochs, verbose=0, shuffle=False)
    return base.get_weights(), history.history


class ReplicaScalingTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("consistency", "gaussian", "stability", "smoothadv", "macer")
    def test_two_replicas_make_the_same_update_as_one_device(self, method):
        rng = np.random.default_rng(0)
        images = rng.uniform(size=(32, 6, 6, 1)).astype(np.float32)
        labels = rng.integers(0, 4, size=32)
        init = [rng.normal(size=(36, 8)).astype(np.float32) * 0.3, np.zeros(8, np.float32),
                rng.normal(size=(8, 4)).astype(np.float32) * 0.3, np.zeros(4, np.float32)]

        one, one_logs = _train(tf.distribute.get_strategy(), method, init, images, labels)
        two, two_logs = _train(_mirrored(), method, init, images, labels)

        moved = max(np.abs(a - b).max() for a, b in zip(one, init))
        self.assertGreater(moved, 1e-2)  # The comparison below is not vacuous.
        for a, b in zip(one, two):
            self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)
        for name in one_logs:
            self.assertAllClose(one_logs[name], two_logs[name], rtol=1e-4, atol=1e-5, msg=name)


class ReplicaNoiseTest(tf.test.TestCase):

    def test_replicas_draw_different_noise_for_identical_inputs(self):
        strategy = _mirrored()
        seed = distribute.step_seed(0, 1, 0)

        def draw():
            images = tf.zeros([4, 5, 5, 1])  # Identical on both replicas.
            seeds = distribute.example_seeds(seed, tf.shape(images)[0])
            return distribute.gaussian_copies(images, 2, 1.0, seeds)

        per_replica = strategy.experimental_local_results(strategy.run(tf.function(draw)))
        self.assertLen(per_replica, 2)
        first, second = (t.numpy() for t in per_replica)
        self.assertGreater(np.abs(first - second).min(), 0.0)
        self.assertLess(abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]), 0.2)

    def test_noise_of_an_example_does_not_depend_on_the_replica_count(self):
        # The basis of the update test: the global batch's noise is the same
        # whether one device or two replicas draw it.
        strategy = _mirrored()
        seed = distribute.step_seed(5, 1, 2)
        images = tf.zeros([8, 3, 3, 1])
        single = distribute.gaussian_copies(images, 2, 1.0, distribute.example_seeds(seed, 8)).numpy()

        def draw(local):
            return distribute.gaussian_copies(local, 2, 1.0, distribute.example_seeds(seed, tf.shape(local)[0]))

        ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(images).unbatch().batch(8))
        local = strategy.experimental_local_results(strategy.run(tf.function(draw), args=(next(iter(ds)),)))
        # Each replica returns its 4 examples copy-major: [copy0 x4, copy1 x4].
        halves = [t.numpy().reshape(2, 4, 3, 3, 1) for t in local]
        self.assertAllClose(single.reshape(2, 8, 3, 3, 1), np.concatenate(halves, axis=1))


class StrategyFactoryTest(tf.test.TestCase):

    def test_names(self):
        self.assertEqual(distribute.get_strategy("default").num_replicas_in_sync, 1)
        self.assertEqual(distribute.get_strategy("auto").num_replicas_in_sync, 1)  # No GPUs here.
        self.assertEqual(distribute.get_strategy("mirrored").num_replicas_in_sync, 2)  # 2 logical CPUs.
        with self.assertRaisesRegex(ValueError, "--strategy"):
            distribute.get_strategy("tpu")


if __name__ == "__main__":
    tf.test.main()
