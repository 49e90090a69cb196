"""Training under MirroredStrategy with 2 logical CPU devices (set in conftest.py).

Two traps of data-parallel smoothing training:
(a) every loss term must be scaled the same way across replicas, so 2 replicas
    make the same update as 1 device on the same data and noise;
(b) each replica must draw its own noise (a Keras SeedGenerator has the same
    state on every replica).

Also the pieces of multi-worker training that distribute.py holds: TF_CONFIG
checking and the broadcast of the chief's state. The loop multi-worker
training runs instead of `fit` is tested in multi_worker_test.py.
"""

import json

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras

from tf_consreg import consistency_model
from tf_consreg import denoise
from tf_consreg import distribute
from tf_consreg import run_config
from tf_consreg.errors import ConfigError


def _mirrored():
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(cpus) >= 2, "conftest.py should have made 2 logical CPU devices"
    return tf.distribute.MirroredStrategy(cpus[:2], cross_device_ops=tf.distribute.ReductionToOneDevice())


# The settings of each method's terms.
_METHOD_FIELDS = {"consistency": dict(lbd=10.0, eta=0.5), "gaussian": {}, "stability": dict(lbd=10.0),
                  "smoothadv": dict(epsilon=0.5, num_steps=2), "macer": dict(lbd=10.0, beta=2.0, gamma=8.0),
                  # The one-step adversary as start point: both attack results and the mixing weights matter.
                  "smoothmix": dict(eta=5.0, num_steps=3, attack_step=0.5, mix_step=1, warmup=1),
                  # The denoiser of f∘D: the network above (6x6 images out) in front of a frozen linear classifier.
                  "denoise": dict(denoise_objective="consistency", lbd=2.0, classifier="composed-here.keras")}


def _train(strategy, method, weights, images, labels, epochs=2):
    with strategy.scope():
        inputs = keras.Input((6, 6, 1))
        hidden = keras.layers.Dense(8, activation="tanh")(keras.layers.Flatten()(inputs))
        base = keras.Model(inputs, keras.layers.Dense(4)(hidden))
        base.set_weights(weights)
        if method == "denoise":  # Set weights: both runs start from the same f∘D.
            rng = np.random.default_rng(5)
            image = keras.Input((6, 6, 1))
            head = keras.layers.Dense(3)
            classifier = keras.Model(image, head(keras.layers.Flatten()(image)))
            head.set_weights([rng.normal(size=(36, 3)).astype(np.float32), np.zeros(3, np.float32)])
            out = keras.layers.Dense(36)
            denoiser = keras.Model(inputs, keras.layers.Reshape((6, 6, 1))(out(base.output)))
            out.set_weights([rng.normal(size=(4, 36)).astype(np.float32) * 0.3, np.zeros(36, np.float32)])
            base = denoise.compose(denoiser, classifier, (6, 6, 1))
        objective = run_config.ObjectiveConfig(method=method, sigma=0.5, num_noise=1 if method == "stability" else 3,
                                               weight_decay=0.01, **_METHOD_FIELDS[method])
        model = consistency_model.ConsistencyModel(base, objective, seed=3)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8, drop_remainder=True)
    history = model.fit(ds, epochs=epochs, verbose=0, shuffle=False)
    return base.get_weights(), history.history


class ReplicaScalingTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("consistency", "gaussian", "stability", "smoothadv", "macer", "smoothmix", "denoise")
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


class StrategyFactoryTest(tf.test.TestCase):

    def test_names(self):
        self.assertEqual(distribute.get_strategy("default").num_replicas_in_sync, 1)
        self.assertEqual(distribute.get_strategy("auto").num_replicas_in_sync, 1)  # No GPUs here.
        self.assertEqual(distribute.get_strategy("mirrored").num_replicas_in_sync, 2)  # 2 logical CPUs.
        with self.assertRaisesRegex(ValueError, "--strategy"):
            distribute.get_strategy("tpu")

    def test_multi_worker_without_tf_config_is_refused(self):
        with self.assertRaisesRegex(ConfigError, "--strategy=multi_worker needs the TF_CONFIG environment variable"):
            distribute.cluster_task_from_env({})


def _tf_config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


class ClusterTaskTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("worker0", {"worker": ["a:1", "b:2"]}, "worker", 0, (2, 0, True)),
        ("worker1", {"worker": ["a:1", "b:2"]}, "worker", 1, (2, 1, False)),
        ("one_worker", {"worker": ["a:1"]}, "worker", 0, (1, 0, True)),
        # With a chief job the chief is worker 0 and the workers follow, as
        # MultiWorkerMirroredStrategy numbers its input pipelines.
        ("chief", {"chief": ["c:1"], "worker": ["a:1", "b:2"]}, "chief", 0, (3, 0, True)),
        ("after_chief", {"chief": ["c:1"], "worker": ["a:1", "b:2"]}, "worker", 1, (3, 2, False)),
    )
    def test_locates_the_task(self, cluster, task_type, index, expected):
        task = distribute.cluster_task(_tf_config(cluster, task_type, index))
        self.assertEqual((task.num_workers, task.worker_index, task.is_chief), expected)
        self.assertEqual((task.task_type, task.task_index), (task_type, index))

    @parameterized.named_parameters(
        ("unset", None, "needs the TF_CONFIG environment variable"),
        ("empty", "  ", "needs the TF_CONFIG environment variable"),
        ("not_json", "{cluster: [}", "TF_CONFIG is not valid JSON"),
        ("not_object", "[1, 2]", "must be a JSON object"),
        ("no_cluster", json.dumps({"task": {"type": "worker", "index": 0}}), 'has no "cluster"'),
        ("no_task", json.dumps({"cluster": {"worker": ["a:1"]}}), 'has no "task"'),
        ("index_out", _tf_config({"worker": ["a:1", "b:2"]}, index=2), "task index 2 is outside the cluster"),
        ("index_negative", _tf_config({"worker": ["a:1", "b:2"]}, index=-1), "task index -1 is outside"),
        ("index_not_int", _tf_config({"worker": ["a:1", "b:2"]}, index="1"), "task index '1' is outside"),
        ("type", _tf_config({"worker": ["a:1"]}, task_type="evaluator"), "task type 'evaluator' is not a job"),
        ("ps", _tf_config({"worker": ["a:1"], "ps": ["p:1"]}), "job\\(s\\) ps .* are not used"),
        ("address", _tf_config({"worker": ["a:1", "hostonly"]}), 'must be a list of "host:port" strings'),
        ("addresses_not_list", _tf_config({"worker": "a:1"}), 'must be a list of "host:port" strings'),
        ("duplicate", _tf_config({"worker": ["a:1", "a:1"]}), "a:1 listed twice"),
        ("two_chiefs", _tf_config({"chief": ["c:1", "d:1"], "worker": ["a:1"]}), "cluster.chief has 2 tasks"),
    )
    def test_bad_tf_config_names_the_problem(self, value, message):
        with self.assertRaisesRegex(ConfigError, message):
            distribute.cluster_task(value)


class BroadcastTest(tf.test.TestCase):

    def test_every_replica_gets_replica_zeros_values(self):
        strategy = _mirrored()
        with strategy.scope():
            weights = tf.Variable([[1.5, -2.0], [0.25, 3.0]])
            counter = tf.Variable(7, dtype=tf.int64)
        # Make replica 1's copies differ, as a worker that restored nothing would.
        strategy.experimental_local_results(weights)[1].assign(tf.zeros([2, 2]))
        strategy.experimental_local_results(counter)[1].assign(0)
        distribute.broadcast_from_first_replica(strategy, [weights, counter])
        for copy in strategy.experimental_local_results(weights):
            self.assertAllEqual(copy, [[1.5, -2.0], [0.25, 3.0]])
        for copy in strategy.experimental_local_results(counter):
            self.assertEqual(int(copy), 7)


if __name__ == "__main__":
    tf.test.main()
