"""Multi-worker training: fit_distributed in one process, and bin/train.py --strategy=multi_worker.

`fit_distributed`, the loop that replaces `fit` under
MultiWorkerMirroredStrategy, is checked in this process against `fit` on
2 logical CPU devices (set in conftest.py). The rest runs bin/train.py
--strategy=multi_worker as worker processes on 127.0.0.1, each with its own
TF_CONFIG.

Every cluster here is started from the example of docs/cluster.md, "Training on several machines"
(TF_CONFIG and the command, with only hosts, ports, task index, interpreter
and --model_dir replaced), and each worker gets its own --model_dir, as on
separate machines without a shared file system: only the chief may write
there, and the others must get the chief's state over the network.

Processes run in their own process groups; every wait has a timeout and
every group is killed at the end, whatever happened.
"""

import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized

import binaries  # tests/binaries.py
import keras

from tf_consreg import consistency_model
from tf_consreg import models
from tf_consreg import multi_worker
from tf_consreg import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
EXAMPLE_HOSTS = ("host0:12345", "host1:12345")
EXAMPLE_MODEL_DIR = "--model_dir=runs/cluster_demo"
EXAMPLE_PYTHON = ".venv/bin/python"
TIMEOUT = 150  # seconds for a cluster run; each takes 20-40 s on 2 idle cores
train_bin = None  # bin/train.py, loaded by setUpModule.


def setUpModule():
    global train_bin
    train_bin = binaries.load("train")


def tearDownModule():
    binaries.unload(train_bin)


def cluster_guide_example():
    """(TF_CONFIG as a dict, the command as argv) from docs/cluster.md's first example, as printed there."""
    # Under `bazel test` docs/cluster.md is in the runfiles (//:docs); else beside tests/.
    candidates = [os.path.join(d, "docs", "cluster.md")
                  for d in (REPO, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))]
    with open(next((p for p in candidates if os.path.isfile(p)), candidates[0]), encoding="utf-8") as f:
        guide = f.read()
    section = guide.split("\n## Training on several machines\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    tf_config = re.search(r"^export TF_CONFIG='(.*)'$", block, re.MULTILINE).group(1)
    command = re.search(r"^(\.venv/bin/python bin/train\.py .*?)\n(?!    )", block, re.MULTILINE | re.DOTALL).group(1)
    return json.loads(tf_config), shlex.split(command.replace("\\\n", " "))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _fingerprint(model):
    # The same definition as multi_worker.weights_fingerprint, written out again here.
    digest = hashlib.sha256()
    for value in model.get_weights():
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _printed_fingerprint(stdout):
    found = re.findall(r"^Worker (\d+) of 2: final weights sha256 ([0-9a-f]{64})$", stdout, re.MULTILINE)
    assert len(found) == 1, stdout[-3000:]
    return found[0]


class Cluster:
    """Two workers started from docs/cluster.md's example, one directory per simulated host."""

    def __init__(self, root, extra_flags=()):
        self.root = root
        tf_config, argv = cluster_guide_example()
        assert tf_config["cluster"]["worker"] == list(EXAMPLE_HOSTS), tf_config
        assert argv[0] == EXAMPLE_PYTHON and EXAMPLE_MODEL_DIR in argv, argv
        self.flags = [a for a in argv[2:] if a != EXAMPLE_MODEL_DIR]
        ports = _free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        self.commands, self.envs, self.model_dirs = [], [], []
        for index in range(2):
            host = os.path.join(root, f"host{index}")
            os.makedirs(os.path.join(host, "tmp"), exist_ok=True)
            model_dir = os.path.join(host, "runs", "cluster_demo")
            self.model_dirs.append(model_dir)
            self.commands.append([sys.executable, argv[1], *self.flags, f"--model_dir={model_dir}", *extra_flags])
            self.envs.append({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": os.path.join(host, "tmp"),
                              "TF_CONFIG": json.dumps({**tf_config, "cluster": cluster,
                                                       "task": {**tf_config["task"], "index": index}})})
        self.procs = []
        self.logs = []

    def start(self, tag):
        self.logs = [os.path.join(self.root, f"worker{i}.{tag}") for i in range(2)]
        for command, env, log in zip(self.commands, self.envs, self.logs):
            with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
                self.procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=err,
                                                   start_new_session=True))
        return self.procs[-2:]

    def wait(self, timeout=TIMEOUT):
        """Waits for the last two workers; returns [(returncode, stdout, stderr)]."""
        deadline = time.time() + timeout
        for proc in self.procs[-2:]:
            try:
                proc.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the cluster did not finish within {timeout} s:\n{self.output(1)[-3000:]}")
        return [(p.returncode, self.output(0, i), self.output(1, i)) for i, p in enumerate(self.procs[-2:])]

    def output(self, stream, index=0):
        with open(self.logs[index] + (".out", ".err")[stream]) as f:
            return f.read()

    def kill(self, proc=None):
        for p in [proc] if proc else self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)


def _checkpoint_values(model_dir):
    """Reads every tensor of the latest checkpoint (fails on a corrupt one); returns epoch and step."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
    names = reader.get_variable_to_shape_map()
    for name in names:
        reader.get_tensor(name)
    epoch = [int(reader.get_tensor(n)) for n in names if n.startswith("epoch/")]
    steps = [int(reader.get_tensor(n)) for n in names if n.startswith("optimizer/_iterations/")]
    return epoch, steps


@pytest.mark.slow
class ReadmeClusterTest(tf.test.TestCase):
    """docs/cluster.md's two-worker example, run once; each test checks one property of it."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp(prefix="readme_cluster_")
        # float32: the tolerance below is derived for float32 sums (auto would pick bfloat16 on CPUs with it).
        cls.cluster = Cluster(cls.root, extra_flags=["--mixed_precision=none"])
        try:
            cls.cluster.start("run")
            cls.results = cls.cluster.wait()
        finally:
            cls.cluster.kill()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_both_workers_exit_0_with_identical_weights(self):
        for returncode, _, stderr in self.results:
            self.assertEqual(returncode, 0, stderr[-3000:])
        printed = [_printed_fingerprint(out) for _, out, _ in self.results]
        self.assertEqual([index for index, _ in printed], ["0", "1"])
        self.assertEqual(printed[0][1], printed[1][1])  # Synchronous training: bit-identical weights.
        base = models.load_base_model(os.path.join(self.cluster.model_dirs[0], "base_model.keras"))
        self.assertEqual(_fingerprint(base), printed[1][1])  # The non-chief ends with the saved model's weights.

    def test_only_the_chief_writes_the_run(self):
        chief, other = self.cluster.model_dirs
        self.assertCountEqual(os.listdir(chief),
                              ["base_model.keras", "checkpoints", "flags.txt", "logs", "train_config.json"])
        self.assertTrue(os.path.isfile(os.path.join(chief, "checkpoints", "ckpt-2.index")))
        self.assertFalse(os.path.exists(other))  # Never created: it got the chief's state by broadcast.
        for host in ("host0", "host1"):  # The non-chief removed its temporary directory.
            # Only the workers' own directories count: under `bazel test` Python
            # also leaves a __pycache__ in TMPDIR.
            left = [name for name in os.listdir(os.path.join(self.root, host, "tmp"))
                    if name.startswith("tf_consreg_worker")]
            self.assertEqual(left, [])
        config = json.load(open(os.path.join(chief, "train_config.json")))
        self.assertEqual((config["strategy"], config["epochs"], config["method"]), ("multi_worker", 2, "consistency"))

    def test_tensorboard_and_checkpoint_as_under_fit(self):
        chief = self.cluster.model_dirs[0]
        tags, epoch_steps = set(), []
        for path in glob.glob(os.path.join(chief, "logs", "*", "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    tags.add((os.path.basename(os.path.dirname(path)), value.tag))
                    if value.tag == "epoch/loss" and "train" in path:
                        epoch_steps.append(event.step)
        for term in ("loss", "cross_entropy", "consistency", "kl", "entropy", "accuracy", "learning_rate"):
            self.assertIn(("train", f"epoch/{term}"), tags)
            self.assertIn(("train", f"step/{term}"), tags)
        self.assertIn(("validation", "epoch/accuracy"), tags)
        self.assertIn(("validation", "epoch/clean_accuracy"), tags)
        self.assertEqual(sorted(epoch_steps), [1, 2])
        # 512 images at a global batch of 64: 8 steps an epoch.
        self.assertEqual(_checkpoint_values(chief), ([2], [16]))

    def test_equals_one_device_resumed_after_every_epoch(self):
        # The cluster draws epoch e from (seed, e) alone, as a single run
        # resumed at epoch e does; with the same noise per example and the
        # same loss scaling, 2 workers x 1 replica must then make the updates
        # of 1 device, up to float32 rounding.
        #
        # The tolerance. The runs differ only in the order of float32 sums:
        # the cluster all-reduces two half-batch gradients, and oneDNN splits
        # its reductions by thread count, which differs with the machine's
        # load (1-4e-6 seen under load, 1.5e-8 on a quiet machine). Two orders
        # of an n-term float32 sum differ by at most 2 (n - 1) u sum|x_i|
        # (Higham, Accuracy and Stability, 4.2), u = 2**-24. The longest sum
        # is conv1's kernel gradient: 64 clean images x m = 2 copies x 24 x 24
        # output positions, n = 73,728, so 2 n u = 8.8e-3 of the gradient.
        # A weight ends off by that fraction of its path, sum_t lr |v_t| over
        # the 16 steps (lr 0.01, momentum 0.9 in v): measured on this config,
        # at most 0.0194 (dense 500 -> 10 kernel; 0.0124 for conv1). The
        # updates' own rounding, 16 steps x u x |w| <= 0.21, adds 2e-7. So
        # 8.8e-3 x 0.02 + 2e-7 = 1.8e-4. The worst-case n u exceeds the
        # typical sqrt(n) u by sqrt(n) = 270: headroom for cancellation in
        # the sums and for early differences growing through later steps.
        # Epoch 2 alone moves a weight by 0.013, 70 x this: a wrong batch,
        # noise or loss scale on a worker shows.
        steps, path, n, u = 16, 0.02, 64 * 2 * 24 * 24, 2.0 ** -24
        atol = 2 * n * u * path + steps * u * 0.21
        model_dir = os.path.join(self.root, "one_device")
        flag_values = [f for f in self.cluster.flags if not f.startswith(("--strategy=", "--epochs="))]
        self.assertIn("--strategy=multi_worker", self.cluster.flags)
        after = {}
        for epochs in (1, 2):
            with flagsaver.flagsaver():
                FLAGS(["train", *flag_values, "--strategy=default", f"--epochs={epochs}", f"--model_dir={model_dir}",
                       "--mixed_precision=none"])
                train_bin.main(["train"])
            after[epochs] = models.load_base_model(os.path.join(model_dir, "base_model.keras")).get_weights()
        cluster = models.load_base_model(os.path.join(self.cluster.model_dirs[0], "base_model.keras")).get_weights()
        moved = max(np.abs(a - b).max() for a, b in zip(after[2], after[1]))
        self.assertGreater(moved, 20 * atol)  # Epoch 2 changed the weights far more than the tolerance.
        for a, b in zip(cluster, after[2]):
            self.assertAllClose(a, b, atol=atol, rtol=0)


class FaultTest(tf.test.TestCase):

    @pytest.mark.slow
    def test_cluster_restarted_after_losing_a_worker_resumes_from_the_last_epoch(self):
        root = self.create_tempdir().full_path
        # 2,048 images at 64 per step: an epoch lasts a few seconds, long enough to kill a worker inside epoch 2.
        cluster = Cluster(root, extra_flags=["--train_examples=2048", "--eval_examples=0", "--epochs=3"])
        chief_dir = cluster.model_dirs[0]
        first_checkpoint = os.path.join(chief_dir, "checkpoints", "ckpt-1.index")
        try:
            chief, other = cluster.start("killed")
            deadline = time.time() + TIMEOUT
            while not os.path.exists(first_checkpoint):
                self.assertIsNone(chief.poll(), cluster.output(1)[-3000:])
                self.assertLess(time.time(), deadline, "no checkpoint of epoch 1 in time")
                time.sleep(0.05)
            cluster.kill(other)  # SIGKILL during epoch 2.
            # The chief now blocks in the next all-reduce (or fails once the
            # health check notices): give it a few seconds, then kill it too.
            try:
                chief.wait(timeout=5)
            except subprocess.TimeoutExpired:
                cluster.kill(chief)
            self.assertFalse(os.path.exists(os.path.join(chief_dir, "checkpoints", "ckpt-2.index")),
                             "epoch 2 finished before the kill; the test needs a longer epoch")
            self.assertFalse(os.path.exists(os.path.join(chief_dir, "base_model.keras")))

            cluster.start("restarted")  # The same commands and TF_CONFIG.
            results = cluster.wait()
        finally:
            cluster.kill()
        for returncode, _, stderr in results:
            self.assertEqual(returncode, 0, stderr[-3000:])
        self.assertRegex(results[0][1], r"Resuming from .*ckpt-1 \(epoch 1 of 3\)")
        self.assertIn("Resuming from the chief's checkpoint (epoch 1 of 3)", results[1][1])
        self.assertEqual(_printed_fingerprint(results[0][1])[1], _printed_fingerprint(results[1][1])[1])
        # Nothing in the run is corrupt: the base model loads (with the
        # weights the workers ended with) and every checkpoint reads fully.
        base = models.load_base_model(os.path.join(chief_dir, "base_model.keras"))
        self.assertEqual(_fingerprint(base), _printed_fingerprint(results[0][1])[1])
        self.assertEqual(_checkpoint_values(chief_dir), ([3], [96]))  # 3 epochs x 32 steps, none lost or doubled.
        for number in (1, 2, 3):
            reader = tf.train.load_checkpoint(os.path.join(chief_dir, "checkpoints", f"ckpt-{number}"))
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
        self.assertFalse(os.path.exists(cluster.model_dirs[1]))


    @pytest.mark.slow
    def test_diverging_cluster_stops_on_every_worker_and_saves_nothing(self):
        root = self.create_tempdir().full_path
        cluster = Cluster(root, extra_flags=["--lr=1e30"])
        try:
            cluster.start("diverged")
            results = cluster.wait()
        finally:
            cluster.kill()
        for returncode, _, stderr in results:
            self.assertEqual(returncode, 2, stderr[-3000:])
            errors = [line for line in stderr.splitlines() if line.startswith("train.py: error: ")]
            self.assertLen(errors, 1, stderr[-3000:])
            # Every worker sees the same all-reduced loss: all stop at the same step.
            self.assertRegex(errors[0], r"^train.py: error: training diverged: the loss is (nan|inf) at step \d/8 of "
                                        r"epoch 1 \(optimizer step \d\); nothing of this epoch was saved; try a "
                                        r"smaller --lr than 1e\+30")
        self.assertEqual(re.search(r"step \d/8", results[0][2]).group(), re.search(r"step \d/8", results[1][2]).group())
        self.assertEqual(os.listdir(cluster.model_dirs[0]), [])  # A fresh run that diverged leaves nothing.
        self.assertFalse(os.path.exists(cluster.model_dirs[1]))


class BadClusterInputTest(tf.test.TestCase, parameterized.TestCase):
    """One line, exit status 2, before any work (a worker would otherwise wait for the cluster forever)."""

    def _run(self, tf_config, *extra):
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        _, argv = cluster_guide_example()
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        if tf_config is not None:
            env["TF_CONFIG"] = tf_config
        command = [sys.executable, argv[1], *[a for a in argv[2:] if a != EXAMPLE_MODEL_DIR],
                   f"--model_dir={model_dir}", *extra]
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and not line.startswith(("I0000", "W0000", "E0000", "WARNING:"))]
        self.assertFalse(os.path.exists(model_dir))
        return result.returncode, lines

    @parameterized.named_parameters(
        ("malformed", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": ', "TF_CONFIG is not valid JSON"),
        ("index_outside", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                      "task": {"type": "worker", "index": 2}}),
         "TF_CONFIG: task index 2 is outside the cluster: job 'worker' has 2 task(s), indices 0 to 1"),
        ("no_task", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}), 'TF_CONFIG has no "task" object'),
        ("unset", None, "--strategy=multi_worker needs the TF_CONFIG environment variable"),
    )
    def test_one_line_naming_tf_config(self, tf_config, message):
        returncode, lines = self._run(tf_config)
        self.assertEqual(returncode, 2)
        self.assertLen(lines, 1, lines)
        self.assertTrue(lines[0].startswith("train.py: error: "), lines[0])
        self.assertIn(message, lines[0])

    def test_batch_not_divisible_by_the_cluster_replicas(self):
        tf_config = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]},
                                "task": {"type": "worker", "index": 0}})
        returncode, lines = self._run(tf_config, "--batch_size=64")
        self.assertEqual(returncode, 2)
        self.assertEqual(lines, ["train.py: error: --batch_size: 64 clean images per step do not split evenly over 3 "
                                 "replicas (3 workers in TF_CONFIG x 1 device(s) each)"])


def _mirrored():
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(cpus) >= 2, "conftest.py should have made 2 logical CPU devices"
    return tf.distribute.MirroredStrategy(cpus[:2], cross_device_ops=tf.distribute.ReductionToOneDevice())


class _Recorder(keras.callbacks.Callback):
    """Records the callback hooks a training loop calls, in order."""

    def __init__(self):
        super().__init__()
        self.events = []

    def _record(self, name, index, logs):
        self.events.append((name, index, tuple(sorted(logs or {}))))

    def on_train_begin(self, logs=None):
        self._record("train_begin", None, logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._record("epoch_begin", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._record("train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._record("train_batch_end", batch, logs)

    def on_test_begin(self, logs=None):
        self._record("test_begin", None, logs)

    def on_test_batch_end(self, batch, logs=None):
        self._record("test_batch_end", batch, logs)

    def on_test_end(self, logs=None):
        self._record("test_end", None, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._record("epoch_end", epoch, logs)

    def on_train_end(self, logs=None):
        self._record("train_end", None, logs)


class FitDistributedTest(tf.test.TestCase):
    """The loop multi-worker training runs instead of fit, checked against fit on one device."""

    def _model(self, strategy, init):
        with strategy.scope():
            inputs = keras.Input((6, 6, 1))
            base = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
            base.set_weights(init)
            objective = run_config.ObjectiveConfig(method="consistency", sigma=0.5, num_noise=2, lbd=10.0, eta=0.5,
                                                   weight_decay=0.01)
            model = consistency_model.ConsistencyModel(base, objective, seed=3)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def test_same_weights_logs_and_callback_sequence_as_fit(self):
        rng = np.random.default_rng(1)
        images = rng.uniform(size=(32, 6, 6, 1)).astype(np.float32)
        labels = rng.integers(0, 4, size=32)
        test_images = rng.uniform(size=(16, 6, 6, 1)).astype(np.float32)
        test_labels = rng.integers(0, 4, size=16)
        init = [rng.normal(size=(36, 4)).astype(np.float32) * 0.3, np.zeros(4, np.float32)]

        def batches(x, y):
            return tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)

        one = self._model(tf.distribute.get_strategy(), init)
        one_recorder = _Recorder()
        one_history = one.fit(batches(images, labels), epochs=3, initial_epoch=1,
                              validation_data=batches(test_images, test_labels), callbacks=[one_recorder],
                              shuffle=False, verbose=0)

        strategy = _mirrored()
        two = self._model(strategy, init)
        two_recorder = _Recorder()
        two_history = multi_worker.fit_distributed(
            two, strategy, lambda epoch: strategy.experimental_distribute_dataset(batches(images, labels)),
            epochs=3, initial_epoch=1, steps_per_epoch=4,
            validation_data=strategy.experimental_distribute_dataset(batches(test_images, test_labels)),
            validation_steps=2, callbacks=[two_recorder], verbose=0)

        self.assertGreater(np.abs(one.base_model.get_weights()[0] - init[0]).max(), 1e-2)  # Not vacuous.
        for a, b in zip(one.base_model.get_weights(), two.base_model.get_weights()):
            self.assertAllClose(a, b, atol=2e-6, rtol=1e-5)
        self.assertEqual(one_recorder.events, two_recorder.events)
        self.assertEqual(sorted(one_history.history), sorted(two_history.history))
        for name, values in one_history.history.items():
            self.assertAllClose(values, two_history.history[name], rtol=1e-4, atol=1e-5, msg=name)
        self.assertIn("val_clean_accuracy", two_history.history)
        self.assertEqual(int(two.optimizer.iterations.numpy()), 8)


if __name__ == "__main__":
    tf.test.main()
