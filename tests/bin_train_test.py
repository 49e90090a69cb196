"""bin/train.py end to end: what it writes, resuming, and refusing bad input."""

import contextlib
import errno
import glob
import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import binaries  # tests/binaries.py
import mounts  # tests/mounts.py
from absl.testing import flagsaver
from absl.testing import parameterized

from tf_consreg import callbacks
from tf_consreg import files
from tf_consreg import models
from tf_consreg import precision
from tf_consreg.errors import ConfigError
from tf_consreg.run_config import ObjectiveConfig, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
train_bin = None  # bin/train.py, loaded by setUpModule.

FLAGS = flags.FLAGS
TINY = dict(train_examples=256, eval_examples=128, batch_size=64, epochs=2, sigma=0.5, lbd=5.0)


def setUpModule():
    global train_bin
    train_bin = binaries.load("train")


def tearDownModule():
    binaries.unload(train_bin)


def _run_bin(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "bin", "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _digest(directory):
    files = sorted(p for p in glob.glob(os.path.join(directory, "**"), recursive=True) if os.path.isfile(p))
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in files}


def _snapshot(directory):
    """Every file and directory under `directory`: its bytes' SHA-256 (files) and modification time."""
    found = {}
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else "dir"
            found[os.path.relpath(path, directory)] = (digest, os.stat(path).st_mtime_ns)
    return found


def _error_lines(stderr):
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith(("I0000", "W0000", "E0000", "WARNING:"))]


def _event_tags(log_dir):
    tags = set()
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add((os.path.basename(os.path.dirname(path)), value.tag))
    return tags


class TrainBinaryTest(tf.test.TestCase, parameterized.TestCase):

    @pytest.mark.slow
    def test_writes_run_and_resumes(self):
        model_dir = self.create_tempdir().full_path
        with flagsaver.flagsaver(model_dir=model_dir, **TINY):
            train_bin.main(["train"])
        for name in ("train_config.json", "flags.txt", "base_model.keras", "checkpoints/checkpoint"):
            self.assertTrue(os.path.isfile(os.path.join(model_dir, name)), name)

        model = models.load_base_model(os.path.join(model_dir, "base_model.keras"))
        self.assertEqual(model.output_shape, (None, 10))
        # --mixed_precision=auto by default: this machine's choice, recorded and computed in.
        policy = precision.resolve("auto").policy
        with open(os.path.join(model_dir, "train_config.json"), encoding="utf-8") as f:
            record = json.load(f)
        self.assertEqual((record["mixed_precision"], record["precision_policy"]), ("auto", policy))
        computes_in = {"float32": "float32", "mixed_bfloat16": "bfloat16"}[policy]
        self.assertEqual(models.model_compute_dtype(model), computes_in)

        tags = _event_tags(os.path.join(model_dir, "logs"))
        for term in ("loss", "cross_entropy", "consistency", "kl", "entropy", "accuracy", "learning_rate"):
            self.assertIn(("train", f"epoch/{term}"), tags)
            self.assertIn(("train", f"step/{term}"), tags)
        self.assertIn(("validation", "epoch/accuracy"), tags)

        # The saved flags reproduce the run: parsing them gives the same config.
        with flagsaver.flagsaver():
            FLAGS(["train", f"--flagfile={os.path.join(model_dir, 'flags.txt')}"])
            self.assertEqual(train_bin.make_config().to_dict()["lbd"], 5.0)
            self.assertEqual(train_bin.make_config().model_dir, model_dir)

        # More epochs with the same flags: continues from epoch 2, not from 0.
        with flagsaver.flagsaver(model_dir=model_dir, **{**TINY, "epochs": 3}):
            train_bin.main(["train"])
        checkpoints = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
        self.assertTrue(checkpoints.model_checkpoint_path.endswith("ckpt-3"))
        epoch_steps = sorted(e.step for p in glob.glob(os.path.join(model_dir, "logs", "train", "events*"))
                             for e in tf.compat.v1.train.summary_iterator(p)
                             for v in e.summary.value if v.tag == "epoch/loss")
        self.assertEqual(epoch_steps, [1, 2, 3])

    @pytest.mark.slow
    def test_cifar10_config_runs_offline_on_mock_data(self):
        model_dir = self.create_tempdir().full_path
        config = os.path.join(REPO, "configs", "cifar10_consistency_sigma0.25.flags")
        # The config's ResNet-110 takes minutes on 2 cores; ResNet-20 exercises the same path.
        with flagsaver.flagsaver():
            FLAGS(["train", f"--flagfile={config}", f"--model_dir={model_dir}", "--arch=cifar_resnet20",
                   "--train_examples=128", "--eval_examples=64", "--epochs=1", "--batch_size=32", "--mock_data"])
            train_bin.main(["train"])
        model = models.load_base_model(os.path.join(model_dir, "base_model.keras"))
        self.assertEqual(model.input_shape, (None, 32, 32, 3))

    @pytest.mark.slow
    def test_mirrored_strategy_and_live_certification(self):
        model_dir = self.create_tempdir().full_path
        with flagsaver.flagsaver(model_dir=model_dir, strategy="mirrored", certify_every=1, certify_examples=16,
                                 certify_n=20, certify_n0=5, certify_batch_size=200,
                                 **{**TINY, "train_examples": 128, "batch_size": 32}):
            train_bin.main(["train"])
        tags = _event_tags(os.path.join(model_dir, "logs"))
        self.assertIn(("validation", "val/acr"), tags)
        self.assertIn(("validation", "epoch/accuracy"), tags)
        self.assertNotIn(("validation", "epoch/acr"), tags)  # Each number is written once.
        config = json.load(open(os.path.join(model_dir, "train_config.json")))
        self.assertEqual(config["certify_examples"], 16)
        # 128 training images at 32 per step on 2 replicas: 4 steps an epoch, 2 epochs.
        reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
        iterations = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                      if k.startswith("optimizer/_iterations/")]
        self.assertEqual(iterations, [8])

    @pytest.mark.slow
    def test_killed_run_resumes_from_last_checkpoint(self):
        model_dir = self.create_tempdir().full_path
        args = [f"--model_dir={model_dir}", "--train_examples=2048", "--eval_examples=0", "--batch_size=32",
                "--epochs=3", "--sigma=0.5"]
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "bin", "train.py"), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 900  # An epoch takes seconds on idle cores, minutes beside other tests.
            # The manager's state file names ckpt-1 once ckpt-1 is whole (ckpt-1.index comes before it).
            while tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")) is None:
                self.assertIsNone(proc.poll(), "training ended before its first checkpoint")
                self.assertLess(time.time(), deadline, "no checkpoint within 900 s")
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        self.assertFalse(os.path.exists(os.path.join(model_dir, "base_model.keras")))

        result = _run_bin(*args)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertRegex(result.stdout, r"Resuming from .*ckpt-[12] \(epoch [12] of 3\)")
        self.assertTrue(os.path.isfile(os.path.join(model_dir, "base_model.keras")))

        # Killed and resumed, it ends where the run that was never stopped ends, bit for bit.
        uninterrupted = self.create_tempdir().full_path
        result = _run_bin(*args, f"--model_dir={uninterrupted}")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        # A new run prints the precision it chose (--mixed_precision=auto) and why.
        self.assertIn(precision.resolve("auto").reason + "\n", result.stdout)
        for a, b in zip(models.load_base_model(model_dir).get_weights(),
                        models.load_base_model(uninterrupted).get_weights()):
            self.assertAllEqual(a, b)

    @pytest.mark.slow
    def test_run_resumed_at_an_epoch_boundary_equals_the_uninterrupted_run(self):
        # Each epoch's batches depend only on (seed, epoch), not on where the process started.
        resumed, uninterrupted = self.create_tempdir().full_path, self.create_tempdir().full_path
        for model_dir, epochs in ((resumed, 1), (resumed, 2), (uninterrupted, 2)):
            with flagsaver.flagsaver(model_dir=model_dir, **{**TINY, "epochs": epochs}):
                train_bin.main(["train"])
        weights = [models.load_base_model(d).get_weights() for d in (resumed, uninterrupted)]
        self.assertGreater(max(np.abs(a).max() for a in weights[0]), 0)
        for a, b in zip(*weights):
            self.assertAllEqual(a, b)

    @pytest.mark.slow
    def test_a_finished_run_is_left_untouched(self):
        model_dir = self.create_tempdir().full_path
        with flagsaver.flagsaver(model_dir=model_dir, **TINY):
            train_bin.main(["train"])
        before = _snapshot(model_dir)
        self.assertIn("base_model.keras", before)
        # Again: certification runs and shards keyed by base_model.keras's SHA-256 stay valid.
        with flagsaver.flagsaver(model_dir=model_dir, **TINY), contextlib.redirect_stdout(io.StringIO()) as out:
            train_bin.main(["train"])
        self.assertIn("is already trained for 2 epochs; nothing to do", out.getvalue())
        self.assertEqual(_snapshot(model_dir), before)
        # Fewer epochs than the run holds: refused, and the record keeps saying 2.
        with flagsaver.flagsaver(model_dir=model_dir, **{**TINY, "epochs": 1}):
            with self.assertRaisesRegex(ConfigError, r"^--epochs=1: --model_dir=.* already holds 2 epochs of this "
                                                     r"run; resume it with --epochs=2 or more, or use a new "
                                                     r"--model_dir$"):
                train_bin.main(["train"])
        self.assertEqual(_snapshot(model_dir), before)

    @pytest.mark.slow
    def test_diverging_run_fails_in_one_line_and_saves_nothing(self):
        # The command (--lr=1e30 --epochs=1 --train_examples=512, the rest at their defaults): two steps,
        # the second update makes the weights infinite. Run in process: cli.run prints any ConfigError as one line
        # with exit status 2 (test_error_is_one_line_naming_the_flag runs that path in a real process).
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        with flagsaver.flagsaver(lr=1e30, epochs=1, train_examples=512, model_dir=model_dir):
            with self.assertRaises(callbacks.TrainingDivergedError) as raised:
                train_bin.main(["train"])
        # Which is caught first depends on the precision (--mixed_precision=auto picks bfloat16 on CPUs that
        # have it, where the loss is already NaN at step 2): the loss at a step, or the weights after the epoch.
        self.assertRegex(str(raised.exception),
                         r"^training diverged: (the weights are not finite after epoch 1 "
                         r"\(optimizer step 2\)|the loss is (nan|inf) at step 2/2 of epoch 1 \(optimizer "
                         r"step 2\)); nothing of this epoch was saved; try a smaller --lr than 1e\+30; "
                         + re.escape(f"--model_dir={model_dir} was left empty for the corrected command") + "$")
        self.assertNotIn("\n", str(raised.exception))
        self.assertEqual(os.listdir(model_dir), [])
        # More steps: the loss itself turns non-finite, and the step is named.
        with flagsaver.flagsaver(model_dir=model_dir, **{**TINY, "lr": 1e30, "train_examples": 2048}):
            with self.assertRaisesRegex(callbacks.TrainingDivergedError,
                                        r"^training diverged: the loss is (nan|inf) at step \d+/32 of epoch 1 "
                                        r"\(optimizer step \d+\); nothing of this epoch was saved; try a smaller "
                                        r"--lr than 1e\+30"):
                train_bin.main(["train"])
        self.assertEqual(os.listdir(model_dir), [])

    @parameterized.named_parameters(
        ("dataset", dict(dataset="svhn"), "--dataset"),
        ("arch", dict(arch="vgg"), "--arch"),
        ("method", dict(method="macer_typo"), "--method"),
        ("sigma", dict(sigma=0.0), "--sigma"),
        ("num_noise", dict(num_noise=0), "--num_noise"),
        ("mse_m", dict(num_noise=3, consistency_loss="mse"), "--consistency_loss=mse needs --num_noise=2"),
        ("lbd", dict(lbd=-1.0), "--lbd"),
        ("eta", dict(eta=-0.5), "--eta"),
        ("epochs", dict(epochs=0), "--epochs"),
        ("batch", dict(batch_size=0), "--batch_size"),
        ("gaussian_lbd", dict(method="gaussian", lbd=3.0), "--lbd is used only by --method=consistency"),
        ("split", dict(batch_size=65, batch_split=True), "divisible by --num_noise"),
        ("model_dir", dict(model_dir=""), "--model_dir"),
        ("beta_gaussian", dict(method="gaussian", lbd=None, beta=2.0), "--beta is used only by --method=macer"),
        ("eps_no_adv", dict(epsilon=0.5), "--epsilon is used only by --method=smoothadv or --method=consistency "
                                           "--adv_training"),
        ("adv_macer", dict(method="macer", lbd=None, adv_training=True), "--adv_training combines SmoothAdv"),
        ("eps_negative", dict(method="smoothadv", lbd=None, epsilon=-0.1), "--epsilon must be >= 0"),
        ("steps", dict(method="smoothadv", lbd=None, num_steps=0), "--num_steps must be >= 1"),
        ("warmup", dict(method="smoothadv", lbd=None, warmup=0), "--warmup must be >= 1"),
        ("macer_k", dict(method="macer", num_noise=0), "--num_noise must be >= 1"),
        ("macer_beta", dict(method="macer", beta=0.0), "--beta must be > 0"),
        ("macer_gamma", dict(method="macer", gamma=-1.0), "--gamma must be >= 0"),
        ("stability_m", dict(method="stability", num_noise=2), "--num_noise must be 1"),
        ("arch_dataset", dict(arch="cifar_resnet20"), "--arch=cifar_resnet20 does not fit --dataset=fashion_mnist"),
        ("certify_off", dict(certify_n=100), "--certify_n is used only with --certify_every"),
        ("certify_too_many", dict(certify_every=1, certify_examples=70000), "--certify_examples"),
        ("data_dir", dict(data_dir="/nonexistent/dir"), "--data_dir"),
        ("smoothmix_step", dict(method="smoothmix", lbd=None, attack_step=0.0), "--attack_step must be > 0"),
        ("smoothmix_steps", dict(method="smoothmix", lbd=None, num_steps=0), "--num_steps must be >= 1"),
        ("smoothmix_mix_step", dict(method="smoothmix", lbd=None, mix_step=2), "--mix_step must be 0"),
        ("smoothmix_eta", dict(method="smoothmix", lbd=None, eta=-1.0), "--eta must be >= 0"),
        ("smoothmix_maxnorm", dict(method="smoothmix", lbd=None, maxnorm=-1.0), "--maxnorm must be > 0"),
        ("smoothmix_maxnorm_s", dict(method="smoothmix", lbd=None, maxnorm_s=0.0), "--maxnorm_s must be > 0"),
        ("smoothmix_lbd", dict(method="smoothmix"), "--lbd is used only by"),
        ("smoothmix_deferred", dict(method="smoothmix", lbd=None, deferred=True), "--deferred is used only by"),
        ("attack_step_other", dict(attack_step=1.0), "--attack_step is used only by --method=smoothmix"),
        ("mixed_precision", dict(mixed_precision="bfloat16"), "--mixed_precision='bfloat16' is unknown"),
        ("pretrained_garbage", dict(pretrained_model=os.path.abspath(__file__)),
         "--pretrained_model: .*bin_train_test.py: not a loadable Keras model"),
        ("steps_per_execution", dict(steps_per_execution=3), "--steps_per_execution=3 must divide the 4 steps"),
    )
    def test_bad_flags_fail_before_any_work(self, overrides, message):
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        with flagsaver.flagsaver(**{"model_dir": model_dir, **TINY, **overrides}):
            with self.assertRaisesRegex(ConfigError, message):
                train_bin.main(["train"])
        self.assertFalse(os.path.exists(model_dir))

    @parameterized.parameters("mount", "mock")
    def test_a_read_only_model_dir_is_refused_before_any_work(self, how):
        # #22 item 2: a real read-only tmpfs where mounting is allowed (root), else its EROFS by mock.
        with mounts.tmpfs("ro") if how == "mount" else contextlib.nullcontext(self.create_tempdir().full_path) \
                as read_only:
            if read_only is None:
                self.skipTest("mounting a tmpfs needs root here; the mock case covers the code")
            erofs = (contextlib.nullcontext() if how == "mount" else mock.patch.object(
                files.tempfile, "mkstemp", side_effect=OSError(errno.EROFS, os.strerror(errno.EROFS))))
            model_dir = os.path.join(read_only, "run")
            with erofs, flagsaver.flagsaver(model_dir=model_dir, **TINY), \
                    mock.patch.object(models, "get_architecture") as build:
                with self.assertRaisesWithLiteralMatch(
                        ConfigError, f"--model_dir={model_dir}: cannot write in {read_only} (Read-only file system)"):
                    train_bin.main(["train"])
                build.assert_not_called()
            self.assertEqual(os.listdir(read_only), [])

    @pytest.mark.slow
    def test_a_full_disk_at_a_checkpoint_is_one_error_and_the_same_command_resumes(self):
        # #22 item 2, by mock: the error TensorFlow raises on ENOSPC, from epoch 2's save (callbacks_test meets the
        # real one on a tmpfs).
        model_dir = self.create_tempdir().full_path
        real_save = tf.train.CheckpointManager.save

        def save(manager, checkpoint_number=None, **kwargs):
            if checkpoint_number == 2:
                raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
            return real_save(manager, checkpoint_number=checkpoint_number, **kwargs)

        with flagsaver.flagsaver(model_dir=model_dir, **TINY):
            with mock.patch.object(tf.train.CheckpointManager, "save", autospec=True, side_effect=save):
                with self.assertRaises(OSError) as raised:
                    train_bin.main(["train"])
            checkpoints = os.path.join(model_dir, "checkpoints")
            self.assertEqual((raised.exception.filename, raised.exception.strerror),
                             (os.path.join(checkpoints, "ckpt-2"), "No space left on device"))
            self.assertEqual(tf.train.latest_checkpoint(checkpoints), os.path.join(checkpoints, "ckpt-1"))
            self.assertFalse(os.path.exists(os.path.join(model_dir, "base_model.keras")))
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                train_bin.main(["train"])  # Space freed: the same command.
        self.assertIn(f"Resuming from {os.path.join(checkpoints, 'ckpt-1')} (epoch 1 of 2)", out.getvalue())
        self.assertEqual(tf.train.latest_checkpoint(checkpoints), os.path.join(checkpoints, "ckpt-2"))
        self.assertTrue(os.path.isfile(os.path.join(model_dir, "base_model.keras")))

    def test_missing_and_truncated_data_files(self):
        data_dir = self.create_tempdir().full_path
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        src = "/usr/share/datasets/fashion-mnist"
        for name in os.listdir(src):
            os.symlink(os.path.join(src, name), os.path.join(data_dir, name))
        os.remove(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"))
        with flagsaver.flagsaver(model_dir=model_dir, data_dir=data_dir, **TINY):
            with self.assertRaisesRegex(ConfigError, "t10k-labels-idx1-ubyte.*not found.*dataset-fashion-mnist"):
                train_bin.main(["train"])
        os.remove(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))
        with open(os.path.join(src, "train-images-idx3-ubyte.gz"), "rb") as f:
            raw = gzip.decompress(f.read())
        with open(os.path.join(data_dir, "train-images-idx3-ubyte"), "wb") as f:
            f.write(raw[:len(raw) // 2])
        with flagsaver.flagsaver(model_dir=model_dir, data_dir=data_dir, **TINY):
            with self.assertRaisesRegex(ConfigError, "train-images-idx3-ubyte: .*truncated"):
                train_bin.main(["train"])
        self.assertFalse(os.path.exists(model_dir))

    def test_model_dir_of_another_run_is_refused_and_untouched(self):
        model_dir = self.create_tempdir().full_path
        with open(os.path.join(model_dir, "train_config.json"), "w") as f:
            f.write(TrainConfig(model_dir=model_dir, arch="lenet", dataset="mnist",
                                objective=ObjectiveConfig(sigma=0.25)).to_json())
        with open(os.path.join(model_dir, "base_model.keras"), "w") as f:
            f.write("previous result")
        before = _digest(model_dir)
        with flagsaver.flagsaver(model_dir=model_dir, dataset="fashion_mnist", **TINY):
            with self.assertRaisesRegex(ConfigError, "holds a different run.*--dataset"):
                train_bin.main(["train"])
        self.assertEqual(_digest(model_dir), before)

    @parameterized.named_parameters(
        ("macer_default_lbd", dict(method="macer"), True),
        ("macer_lbd_8", dict(method="macer", lbd=8.0), True),
        ("macer_lbd_6", dict(method="macer", lbd=6.0), False),
        ("macer_deferred", dict(method="macer", deferred=True), False),
        ("consistency_lbd_10", dict(method="consistency", lbd=10.0), False),
    )
    def test_macer_without_deferral_is_warned_in_one_line(self, overrides, warned):
        # An empty --data_dir stops the run after the warning, before any work.
        data_dir = self.create_tempdir().full_path
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        flag_values = {**TINY, "lbd": None, "model_dir": model_dir, "data_dir": data_dir, **overrides}
        with flagsaver.flagsaver(**flag_values), contextlib.redirect_stderr(io.StringIO()) as err:
            with self.assertRaisesRegex(ConfigError, "not found"):
                train_bin.main(["train"])
        expected = []
        if warned:
            lbd = overrides.get("lbd", 16.0)
            expected = [f"train.py: warning: --method=macer with --lbd={lbd:g} (>= 8) and no --deferred tends to "
                        "collapse to one class within a few epochs when trained from scratch (the authors' code "
                        "does too); the authors train MNIST MACER with --deferred"]
        self.assertEqual([l for l in err.getvalue().splitlines() if l.startswith("train.py: ")], expected)
        self.assertFalse(os.path.exists(model_dir))

    def test_error_is_one_line_naming_the_flag(self):
        result = _run_bin("--model_dir=/tmp/unused_tf_consreg_run", "--sigma=-1")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(_error_lines(result.stderr), ["train.py: error: --sigma must be > 0, got -1.0"])
        self.assertFalse(os.path.exists("/tmp/unused_tf_consreg_run"))


if __name__ == "__main__":
    tf.test.main()
