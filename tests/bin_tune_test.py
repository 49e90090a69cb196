"""bin/tune.py end to end: a 2-trial search, bin/train.py accepting its best.flags, resuming, bad input.

The searches run bin/tune.py in subprocesses (the kill test needs a process to kill); its flag checks run its
main in this process, with one real command line beside them. bin/tune.py and bin/train.py (which parses
best.flags here) define flags of the same names, so a test loads one of them at a time (tests/binaries.py).
"""

import csv
import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

import binaries  # tests/binaries.py
from tf_consreg.errors import ConfigError
from tf_consreg.run_config import read_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
TUNE = os.path.join(REPO, "bin", "tune.py")
# A few hundred Fashion-MNIST images, one epoch, a tiny certification.
TINY = ["--max_trials=2", "--epochs_per_trial=1", "--train_examples=256", "--batch_size=64", "--sigma=0.5",
        "--certify_examples=32", "--certify_n0=20", "--certify_n=100", "--certify_batch_size=800",
        "--lbd_range=1,20", "--eta_range=0.1,1", "--num_noise_choices=2,4"]
# Seconds a trial may take: generous, since on a loaded machine (other tests beside these) a trial takes
# several times as long as on idle cores, and a slow trial only makes the test slower.
TRIAL_TIMEOUT = 1200


def setUpModule():
    # tf.test.TestCase's temporary directories read absl's --test_tmpdir, which needs parsed flags (what loading a
    # binary did here before; the tests now load theirs one at a time).
    if not FLAGS.is_parsed():
        FLAGS(["bin_tune_test"])


def _tune(*args, timeout=600):
    return subprocess.run([sys.executable, TUNE, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _table(tuning_dir):
    with open(os.path.join(tuning_dir, "trials.tsv"), encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _error_lines(stderr):
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("I0000", "W0000", "E0000", "WARNING:"))]


class TuneBinaryTest(tf.test.TestCase):

    def _load(self, name):
        """bin/<name>.py loaded in this process until the test ends (train and tune share flag names)."""
        module = binaries.load(name)
        self.addCleanup(binaries.unload, module)
        return module

    @pytest.mark.slow
    def test_search_writes_results_and_train_accepts_best_flags(self):
        tuning_dir = os.path.join(self.create_tempdir().full_path, "search")
        result = _tune(f"--tuning_dir={tuning_dir}", *TINY)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])

        rows = _table(tuning_dir)
        self.assertEqual([r["rank"] for r in rows], ["1", "2"])
        self.assertEqual([r["status"] for r in rows], ["COMPLETED"] * 2)
        self.assertGreaterEqual(float(rows[0]["val_acr"]), float(rows[1]["val_acr"]))
        for row in rows:
            self.assertTrue(1 <= float(row["lbd"]) <= 20 and 0.1 <= float(row["eta"]) <= 1, row)
            self.assertIn(row["num_noise"], ("2", "4"))
            self.assertTrue(0 <= float(row["val_smoothed_accuracy"]) <= 1)
        markdown = open(os.path.join(tuning_dir, "trials.md"), encoding="utf-8").read()
        self.assertIn("| rank | trial | λ | η | m | epochs | val ACR | smoothed acc. |", markdown)
        self.assertIn(markdown, result.stdout)
        for path in ("search/oracle.json", "search/trial_0/trial.json", "search/trial_1/trial.json",
                     "trials/trial_0/base_model.keras", "trials/trial_1/checkpoints/checkpoint", "tune_config.json",
                     "flags.txt"):
            self.assertTrue(os.path.isfile(os.path.join(tuning_dir, path)), path)
        self.assertLen(glob.glob(os.path.join(tuning_dir, "hparams", "trial_*", "events.out.tfevents.*")), 2)
        self.assertTrue(glob.glob(os.path.join(tuning_dir, "hparams", "events.out.tfevents.*")))
        tags = {v.tag for p in glob.glob(os.path.join(tuning_dir, "trials", "trial_0", "logs", "validation", "ev*"))
                for e in tf.compat.v1.train.summary_iterator(p) for v in e.summary.value}
        self.assertContainsSubset({"val/acr", "val/abstain_rate", "val/certified_accuracy_r0.5",
                                   "val/certified_accuracy_curve"}, tags)
        # The trials never trained on the held-out images: the first 256 of 59968.
        self.assertEqual(read_train_config(os.path.join(tuning_dir, "trials", "trial_0")).train_examples, 256)

        # bin/train.py takes best.flags as it is: the best trial's config, to a new model_dir.
        best = os.path.join(tuning_dir, "best.flags")
        model_dir = os.path.join(self.create_tempdir().full_path, "best_run")
        train_bin = self._load("train")
        with flagsaver.flagsaver():
            FLAGS(["train", f"--flagfile={best}", f"--model_dir={model_dir}"])
            config = train_bin.make_config()
        best_trial = read_train_config(os.path.join(tuning_dir, "trials", f"trial_{rows[0]['trial']}"))
        # The flags repeat --mixed_precision=auto; the new run resolves it on its machine.
        self.assertEqual(dataclasses.replace(config, model_dir=best_trial.model_dir,
                                             precision_policy=best_trial.precision_policy), best_trial)
        self.assertIsNone(config.precision_policy)
        self.assertEqual((config.objective.lbd, config.objective.eta, config.objective.num_noise),
                         (float(rows[0]["lbd"]), float(rows[0]["eta"]), int(rows[0]["num_noise"])))
        self.assertEqual(config.model_dir, model_dir)

    @pytest.mark.slow
    def test_killed_search_resumes_with_the_second_trial(self):
        tuning_dir = os.path.join(self.create_tempdir().full_path, "search")
        args = [f"--tuning_dir={tuning_dir}", *TINY]
        table = os.path.join(tuning_dir, "trials.tsv")
        # The killed search's output, for the failure messages.
        log = os.path.join(self.create_tempdir().full_path, "killed_search")
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
            proc = subprocess.Popen([sys.executable, TUNE, *args], stdout=out, stderr=err)

        def killed_output():
            with open(log + ".out") as out, open(log + ".err") as err:
                return f"stdout:\n{out.read()[-3000:]}\nstderr:\n{err.read()[-5000:]}"

        try:
            deadline = time.time() + TRIAL_TIMEOUT
            # The table is rewritten after each trial ends, once keras-tuner has saved its state.
            while not os.path.exists(table):
                self.assertIsNone(proc.poll(), f"the search ended before its first trial did\n{killed_output()}")
                self.assertLess(time.time(), deadline, f"no trial ended within {TRIAL_TIMEOUT} s\n{killed_output()}")
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        # Killed once the first trial ended; a test process starved of CPU
        # may see the table late, after the second trial ended too.
        completed = sorted(r["trial"] for r in _table(tuning_dir))
        self.assertIn(completed, (["0"], ["0", "1"]), killed_output())
        self.assertEqual([r["status"] for r in _table(tuning_dir)], ["COMPLETED"] * len(completed), killed_output())
        models_done = {t: os.path.join(tuning_dir, "trials", f"trial_{t}", "base_model.keras") for t in completed}
        mtimes = {t: os.stat(path).st_mtime_ns for t, path in models_done.items()}

        # The saved flags repeat the command: it reloads the search and trains only what was not done.
        result = _tune(f"--flagfile={os.path.join(tuning_dir, 'flags.txt')}", timeout=2 * TRIAL_TIMEOUT)
        resumed_output = f"{killed_output()}\nresumed stdout:\n{result.stdout[-3000:]}\nresumed stderr:\n" \
                         f"{result.stderr[-5000:]}"
        self.assertEqual(result.returncode, 0, resumed_output)
        self.assertIn("Reloading Tuner", result.stdout, resumed_output)
        trained = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("trial_")]
        self.assertEqual(trained, [f"trial_{t}" for t in ("0", "1") if t not in completed], resumed_output)
        self.assertEqual({t: os.stat(path).st_mtime_ns for t, path in models_done.items()}, mtimes)
        self.assertEqual(sorted(r["trial"] for r in _table(tuning_dir)), ["0", "1"])
        self.assertEqual([r["status"] for r in _table(tuning_dir)], ["COMPLETED"] * 2, resumed_output)

    @pytest.mark.slow
    def test_diverging_trials_fail_and_the_search_goes_on(self):
        # Every trial's loss turns NaN at this learning rate: each fails alone, and the search ends with no best.
        tuning_dir = os.path.join(self.create_tempdir().full_path, "search")
        result = _tune(f"--tuning_dir={tuning_dir}", *TINY, "--lr=1e30", timeout=2 * TRIAL_TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stderr[-5000:])
        failed = [line for line in result.stdout.splitlines() if line.startswith("Trial ") and " failed: " in line]
        self.assertLen(failed, 2, result.stdout[-3000:])
        for trial, line in enumerate(failed):
            self.assertRegex(line, rf"^Trial {trial} failed: training diverged: .*try a smaller --lr than 1e\+30")
        self.assertEqual([(r["trial"], r["status"]) for r in _table(tuning_dir)], [("0", "FAILED"), ("1", "FAILED")])
        self.assertFalse(os.path.exists(os.path.join(tuning_dir, "best.flags")))
        for trial in ("0", "1"):  # A diverged run saves nothing.
            self.assertEqual(os.listdir(os.path.join(tuning_dir, "trials", f"trial_{trial}")), [])

    @pytest.mark.slow
    def test_bad_input_is_one_line_before_any_work(self):
        tuning_dir = os.path.join(self.create_tempdir().full_path, "search")
        cases = {
            "--lbd_range=20,1": "--lbd_range=20,1 is inverted; give lo,hi with lo < hi (--lbd_range=1,20)",
            "--eta_range=": "--eta_range is empty; give lo,hi (e.g. --eta_range=0.1,1) or one value to fix eta",
            "--max_trials=0": "--max_trials must be >= 1, got 0",
            "--certify_examples=60001": "--certify_examples=60001 is larger than the training split (60000 images); "
                                        "hold out fewer",
            "--sigma_range=0.25,0.5": "--sigma_range: sigma is fixed per search, since certified radii at different "
                                      "sigma are not comparable; run one search per --sigma",
        }
        # The real command line for one case, in a process of its own while this one runs every case through the
        # loaded binary's main.
        cli = subprocess.Popen([sys.executable, TUNE, f"--tuning_dir={tuning_dir}", *TINY, "--lbd_range=20,1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            tune_bin = self._load("tune")
            messages = {}
            for case in cases:
                with flagsaver.flagsaver():
                    FLAGS(["tune", f"--tuning_dir={tuning_dir}", *TINY, case])
                    with self.assertRaises(ConfigError) as raised:
                        tune_bin.main(["tune"])
                messages[case] = str(raised.exception)
            self.assertEqual(messages, cases)
        finally:
            _, cli_stderr = cli.communicate(timeout=300)
        self.assertEqual(cli.returncode, 2, cli_stderr[-2000:])
        self.assertEqual(_error_lines(cli_stderr), ["tune.py: error: " + cases["--lbd_range=20,1"]])
        self.assertFalse(os.path.exists(tuning_dir))


if __name__ == "__main__":
    tf.test.main()
