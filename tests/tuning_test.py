"""tuning: settings checks, search space, tables, HParams summary, resumable directory, a Hyperband search."""

import csv
import dataclasses
import glob
import io
import json
import os
import shutil
import tempfile

import keras_tuner as kt
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import parameterized
from tensorboard.plugins.hparams import plugin_data_pb2

from tf_consreg import cli
from tf_consreg import precision
from tf_consreg import run_config
from tf_consreg import tuning
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.run_config import ObjectiveConfig, TrainConfig, read_train_config
from tf_consreg.errors import ConfigError

TINY_TRAIN = dict(batch_size=64, train_examples=128, eval_examples=0)
TINY_SEARCH = dict(certify_examples=16, certify_n0=20, certify_n=50, certify_batch_size=500)


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _train(model_dir="x", sigma=0.5, fields=None, **objective):
    """A tiny training config: `objective` for its ObjectiveConfig, `fields` for its other fields."""
    return TrainConfig(model_dir=model_dir, objective=ObjectiveConfig(sigma=sigma, **objective),
                       **{**TINY_TRAIN, **(fields or {})})


def _config(tuning_dir="/tmp/unused_tf_consreg_search", train=None, **kwargs):
    """The search of `kwargs` by flag name (--certify_n0 and the like among them), as bin/tune.py builds it."""
    train = train or _train(tuning_dir or "unused")
    return cli.config_from_values(tuning.TuneConfig, {"tuning_dir": tuning_dir, "train": train, **kwargs})


def _trial(trial_id, status="COMPLETED", lbd=1.0, eta=0.5, num_noise=2, **metrics):
    hp = kt.HyperParameters()
    hp.values = {"lbd": lbd, "eta": eta, "num_noise": num_noise}
    trial = kt.engine.trial.Trial(hp, trial_id=trial_id, status=status)
    for name, value in metrics.items():
        trial.metrics.register(name, direction="max")
        trial.metrics.update(name, value)
    return trial


def _hparams_sessions(directory):
    """trial id -> (hparam values, {metric tag: value}) of the HParams runs under `directory`."""
    sessions = {}
    for path in glob.glob(os.path.join(directory, "trial_*", "events.out.tfevents.*")):
        values, metrics = {}, {}
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    values = {k: v.number_value for k, v in data.session_start_info.hparams.items()}
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    metrics[value.tag] = float(tf.make_ndarray(value.tensor))
        sessions[os.path.basename(os.path.dirname(path))] = (values, metrics)
    return sessions


class TuneConfigTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("inverted", dict(lbd_range=(20.0, 1.0)), "--lbd_range=20,1 is inverted; give lo,hi with lo < hi"),
        ("zero_width", dict(eta_range=(0.5, 0.5)), "--eta_range=0.5,0.5 is an empty range; .*--eta_range=0.5"),
        ("empty", dict(lbd_range=()), "--lbd_range is empty"),
        ("three", dict(lbd_range=(1.0, 2.0, 3.0)), "--lbd_range=1,2,3: give lo,hi or one value"),
        ("log_zero", dict(lbd_range=(0.0, 10.0)), "--lbd_range=0,10: values must be finite and > 0 .*log scale"),
        ("eta_negative", dict(eta_range=(-0.1, 1.0)), "--eta_range=-0.1,1: values must be finite and >= 0"),
        ("max_trials", dict(max_trials=0), "--max_trials must be >= 1, got 0"),
        ("epochs", dict(epochs_per_trial=0), "--epochs_per_trial must be >= 1, got 0"),
        ("tuner", dict(tuner="grid"), "--tuner='grid' is unknown"),
        ("no_choices", dict(num_noise_choices=()), "--num_noise_choices is empty"),
        ("m_zero", dict(num_noise_choices=(0, 2)), "--num_noise_choices: values must be integers >= 1"),
        ("m_repeated", dict(num_noise_choices=(2, 2)), "repeats a value"),
        ("objective", dict(objective="loss"), "--objective='loss' is unknown"),
        ("no_radius", dict(objective="certified_accuracy"), "needs --objective_radius"),
        ("radius_unused", dict(objective_radius=0.5), "--objective_radius is used only with"),
        ("radius_negative", dict(objective="certified_accuracy", objective_radius=-1.0), "--objective_radius must"),
        ("certify_examples", dict(certify_examples=0), "--certify_examples must be >= 1"),
        # The sampling settings' own checks: certify_spec_test; here their flag names.
        ("certify_n", dict(certify_n=0), r"^--certify_n must be an integer in \[1, 2\^31\), got 0$"),
        ("certify_alpha", dict(certify_alpha=1.0), r"^--certify_alpha must be in \(0, 1\), got 1.0$"),
        ("certify_staged", dict(certify=CertifySpec(n=1000, stages=(100, 1000), noise="float")), "full CERTIFY"),
        ("certify_every", dict(certify_every=-1), "--certify_every must be >= 0"),
        ("tuning_dir", dict(tuning_dir=""), "--tuning_dir is required"),
    )
    def test_refuses(self, overrides, message):
        with self.assertRaisesRegex(ConfigError, message):
            _config(**overrides)

    def test_every_corner_of_the_space_must_train(self):
        train = _train(consistency_loss="mse")
        with self.assertRaisesRegex(ConfigError, "--num_noise_choices=4: --consistency_loss=mse needs --num_noise=2"):
            _config(train=train, num_noise_choices=(2, 4))
        with self.assertRaisesRegex(ConfigError, "tunes --method=consistency"):
            _config(train=TrainConfig(model_dir="x", objective=ObjectiveConfig(method="gaussian")))

    def test_objective_and_trial_config(self):
        config = _config(objective="certified_accuracy", objective_radius=0.75, epochs_per_trial=4)
        self.assertEqual(config.objective_metric, "val_certified_accuracy_r0.75")
        self.assertIn(0.75, config.radii)
        self.assertEqual(_config().objective_metric, "val_acr")
        run = tuning.trial_config(config, {"lbd": 3.0, "eta": 0.25, "num_noise": 4}, "7", train_examples=100)
        objective = run.objective
        self.assertEqual((objective.lbd, objective.eta, objective.num_noise, run.epochs, run.train_examples),
                         (3.0, 0.25, 4, 4, 100))
        self.assertEqual(run.model_dir, os.path.join(config.tuning_dir, "trials", "trial_7"))
        # Hyperband says how many epochs a trial trains.
        run = tuning.trial_config(config, {"lbd": 3.0, "eta": 0.25, "num_noise": 4, "tuner/epochs": 2}, "8", 100)
        self.assertEqual(run.epochs, 2)

    def test_to_flags_parses_back_with_bin_tune_flags(self):
        config = _config(lbd_range=(0.5, 30.0), eta_range=(0.25,), num_noise_choices=(2, 8), tuner="hyperband",
                         objective="certified_accuracy", objective_radius=0.75,
                         train=_train(consistency_loss="xent", fields={"data_dir": "/data"}))
        values = flags.FlagValues()
        # bin/tune.py's flags: TuneConfig's fields, and the training flags a search shares.
        own = [f.name for f in dataclasses.fields(tuning.TuneConfig) if f.name not in ("train", "certify")]
        tune_holders = cli.define_flags(tuning.TuneConfig, {name: "" for name in own + list(run_config.CERTIFY_FLAGS)},
                                        flag_values=values)
        train_holders = cli.define_flags(TrainConfig, {name: "" for name in tuning.TRAIN_FLAGS},
                                         defaults={"eval_examples": 0}, flag_values=values)
        path = os.path.join(_tempdir(self), "flags.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config.to_flags())
        values(["tune", f"--flagfile={path}"])
        train = cli.config_from_flags(TrainConfig, train_holders, model_dir=tuning.TRIALS_DIR)
        self.assertEqual(cli.config_from_flags(tuning.TuneConfig, tune_holders, train=train), config)

    def test_records_live_certification_by_flag_name(self):
        # tune_config.json as searches recorded it before CertifySpec: a resumed search compares these keys.
        values = _config(certify_every=2, **TINY_SEARCH).to_dict()
        self.assertEqual({name: values[name] for name in ("certify_examples", "certify_n0", "certify_n",
                                                          "certify_alpha", "certify_batch_size", "certify_every")},
                         {"certify_examples": 16, "certify_n0": 20, "certify_n": 50, "certify_alpha": 0.001,
                          "certify_batch_size": 500, "certify_every": 2})
        self.assertNotIn("certify", values)
        self.assertEqual(_config(**TINY_SEARCH).certify,
                         CertifySpec(sigma=0.5, n0=20, n=50, batch_size=500, noise="float"))

    def test_search_space(self):
        space = {hp.name: hp for hp in tuning._make_oracle(_config(lbd_range=(1.0, 50.0), eta_range=(0.5,),
                                                                   num_noise_choices=(2, 4, 8))).hyperparameters.space}
        self.assertEqual(space["lbd"].get_config()["sampling"], "log")
        self.assertEqual((space["lbd"].min_value, space["lbd"].max_value), (1.0, 50.0))
        self.assertIsInstance(space["eta"], kt.engine.hyperparameters.Fixed)
        self.assertEqual(list(space["num_noise"].values), [2, 4, 8])
        oracle = tuning._make_oracle(_config(tuner="hyperband", max_trials=5, epochs_per_trial=9))
        self.assertIsInstance(oracle, kt.oracles.HyperbandOracle)
        self.assertEqual((oracle.max_trials, oracle.max_epochs), (5, 9))
        if _has_sklearn():
            self.assertIsInstance(tuning._make_oracle(_config(tuner="bayesian")), kt.oracles.BayesianOptimizationOracle)


def _has_sklearn():
    import importlib.util  # pylint: disable=import-outside-toplevel
    return importlib.util.find_spec("sklearn") is not None


class ReportsTest(tf.test.TestCase):

    def test_ranked_tables(self):
        config = _config(objective="certified_accuracy", objective_radius=0.5)
        trials = [
            _trial("0", val_acr=0.40, val_smoothed_accuracy=0.9, val_abstain_rate=0.1,
                   **{"val_certified_accuracy_r0.5": 0.30}),
            _trial("1", lbd=8.0, val_acr=0.30, val_smoothed_accuracy=0.8, val_abstain_rate=0.2,
                   **{"val_certified_accuracy_r0.5": 0.50}),
            _trial("2", status="RUNNING"),
            _trial("3", lbd=2.0, val_acr=0.1, val_smoothed_accuracy=0.7, val_abstain_rate=0.3,
                   **{"val_certified_accuracy_r0.5": 0.50}),
        ]
        rows = tuning.ranked_trials(config, trials)
        # Best certified accuracy at 0.5 first; ties by trial id; unfinished trials last, unranked.
        self.assertEqual([(r.rank, r.trial_id) for r in rows], [(1, "1"), (2, "3"), (3, "0"), (None, "2")])
        table = list(csv.DictReader(io.StringIO(tuning.tsv_table(config, rows)), delimiter="\t"))
        self.assertEqual(list(table[0]), ["rank", "trial", "lbd", "eta", "num_noise", "epochs", "val_acr",
                                          "val_smoothed_accuracy", "val_certified_accuracy_r0.5",
                                          "val_abstain_rate", "status"])
        self.assertEqual(table[0]["lbd"], "8.0")
        self.assertEqual(table[0]["val_certified_accuracy_r0.5"], "0.5")
        self.assertEqual((table[3]["rank"], table[3]["val_acr"], table[3]["status"]), ("", "", "RUNNING"))
        markdown = tuning.markdown_table(config, rows).splitlines()
        self.assertEqual(markdown[0], "| rank | trial | λ | η | m | epochs | val ACR | smoothed acc. | "
                                      "cert. acc. r=0.5 | abstained | status |")
        self.assertEqual(markdown[2], "| 1 | 1 | 8 | 0.500 | 2 | 10 | 0.3000 | 0.800 | 0.500 | 0.200 | COMPLETED |")
        self.assertEqual(markdown[5], "| - | 2 | 1 | 0.500 | 2 | 10 | - | - | - | - | RUNNING |")

    def test_hparams_summary(self):
        config = _config(tuning_dir=_tempdir(self), lbd_range=(1.0, 20.0), num_noise_choices=(2, 4))
        tuning.write_hparams_config(config)
        row = tuning.TrialRow(rank=1, trial_id="3", lbd=4.5, eta=0.25, num_noise=4, epochs=10, status="COMPLETED",
                              metrics={"val_acr": 0.61, "val_smoothed_accuracy": 0.8})
        tuning.write_hparams_session(config, row)
        tuning.write_hparams_session(config, dataclasses.replace(row, metrics={"val_acr": 0.0}))  # written once
        hparams_dir = os.path.join(config.tuning_dir, "hparams")
        sessions = _hparams_sessions(hparams_dir)
        self.assertEqual(list(sessions), ["trial_3"])
        values, metrics = sessions["trial_3"]
        self.assertEqual(values, {"lbd": 4.5, "eta": 0.25, "num_noise": 4.0, "epochs": 10.0})
        self.assertAllClose(metrics, {"val/acr": 0.61, "val/smoothed_accuracy": 0.8})
        # The experiment: the space and the metrics, once.
        experiments = []
        for path in glob.glob(os.path.join(hparams_dir, "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "hparams":
                        experiments.append(plugin_data_pb2.HParamsPluginData.FromString(
                            value.metadata.plugin_data.content).experiment)
        self.assertLen(experiments, 1)
        lbd = [h for h in experiments[0].hparam_infos if h.name == "lbd"][0]
        self.assertEqual((lbd.domain_interval.min_value, lbd.domain_interval.max_value), (1.0, 20.0))
        self.assertIn("val/acr", [m.name.tag for m in experiments[0].metric_infos])
        tuning.write_hparams_config(config)
        self.assertLen(glob.glob(os.path.join(hparams_dir, "events.out.tfevents.*")), 1)


class TuningDirTest(tf.test.TestCase):

    def test_other_search_refused_same_search_resumes(self):
        tuning_dir = _tempdir(self)
        tuning._prepare_tuning_dir(_config(tuning_dir, lbd_range=(1.0, 20.0)))
        tuning._prepare_tuning_dir(_config(tuning_dir, lbd_range=(1.0, 20.0), max_trials=30))  # more trials: fine
        with self.assertRaisesRegex(ConfigError, r"holds a different search \(--lbd_range: \[1.0, 50.0\] here, "
                                                 r"\[1.0, 20.0\] there; --sigma: 0.25 here, 0.5 there\)"):
            tuning._prepare_tuning_dir(_config(tuning_dir, lbd_range=(1.0, 50.0),
                                               train=_train(sigma=0.25)))
        self.assertEqual(json.loads(open(os.path.join(tuning_dir, "tune_config.json")).read())["max_trials"], 30)

    def test_trials_compute_in_the_policy_the_search_started_with(self):
        tuning_dir = _tempdir(self)
        amx = precision.Capability("Intel(R) Xeon(R) Platinum 8480+", ("avx512_bf16", "amx_bf16"))
        config = tuning._prepare_tuning_dir(_config(tuning_dir), amx)
        self.assertEqual((config.train.mixed_precision, config.train.precision_policy), ("auto", "mixed_bfloat16"))
        self.assertEqual(tuning.trial_config(config, {"lbd": 2.0, "eta": 0.5, "num_noise": 2}, "0", 128)
                         .precision_policy, "mixed_bfloat16")
        recorded = json.loads(open(os.path.join(tuning_dir, "tune_config.json")).read())
        self.assertEqual(recorded["train"]["precision_policy"], "mixed_bfloat16")
        # Resumed on a machine where auto would choose float32: the trials go on in bfloat16.
        resumed = tuning._prepare_tuning_dir(_config(tuning_dir), precision.Capability("AMD EPYC 7B12", ()))
        self.assertEqual(resumed.train.precision_policy, "mixed_bfloat16")

    def test_directory_of_something_else_refused(self):
        tuning_dir = _tempdir(self)
        open(os.path.join(tuning_dir, "notes.txt"), "w").close()
        with self.assertRaisesRegex(ConfigError, "is not empty and holds no tune_config.json"):
            tuning._prepare_tuning_dir(_config(tuning_dir))

    def test_holdout_larger_than_the_split_fails_before_writing(self):
        tuning_dir = os.path.join(_tempdir(self), "search")
        with self.assertRaisesRegex(ConfigError, "--certify_examples=60001 is larger than the training split "
                                                 r"\(60000 images\)"):
            tuning.search(_config(tuning_dir, certify_examples=60001))
        with self.assertRaisesRegex(ConfigError, "--train_examples=59990 with --certify_examples=16"):
            tuning.search(_config(tuning_dir, train=_train(fields={"train_examples": 59990}), **TINY_SEARCH))
        self.assertFalse(os.path.exists(tuning_dir))


class HyperbandSearchTest(tf.test.TestCase):

    @pytest.mark.slow
    def test_hyperband_continues_the_best_trial(self):
        # max_epochs = 3, factor 3: three 1-epoch trials, then the best one trained on to 3 epochs.
        config = _config(os.path.join(_tempdir(self), "search"), tuner="hyperband", max_trials=4,
                         epochs_per_trial=3, **TINY_SEARCH)
        rows = tuning.search(config)
        self.assertLen(rows, 4)
        self.assertTrue(all(r.status == "COMPLETED" for r in rows))
        by_id = {r.trial_id: r for r in rows}
        self.assertEqual([by_id[i].epochs for i in "0123"], [1, 1, 1, 3])
        parent = max("012", key=lambda i: (by_id[i].metrics["val_acr"], -int(i)))
        self.assertEqual((by_id["3"].lbd, by_id["3"].eta, by_id["3"].num_noise),
                         (by_id[parent].lbd, by_id[parent].eta, by_id[parent].num_noise))
        # The continued trial resumed from its parent's epoch-1 checkpoint (same weights) and trained 2 more epochs.
        child_dir = config.trial_dir("3")
        parent_reader = tf.train.load_checkpoint(os.path.join(config.trial_dir(parent), "checkpoints", "ckpt-1"))
        child_reader = tf.train.load_checkpoint(os.path.join(child_dir, "checkpoints", "ckpt-1"))
        for name in parent_reader.get_variable_to_shape_map():
            self.assertAllEqual(parent_reader.get_tensor(name), child_reader.get_tensor(name))
        self.assertTrue(os.path.exists(os.path.join(child_dir, "checkpoints", "ckpt-3.index")))
        self.assertEqual(read_train_config(child_dir).epochs, 3)
        # Its certification ran after epoch 3 only.
        steps = sorted(e.step for p in glob.glob(os.path.join(child_dir, "logs", "validation", "events*"))
                       for e in tf.compat.v1.train.summary_iterator(p) for v in e.summary.value if v.tag == "val/acr")
        self.assertEqual(steps, [1, 3])  # epoch 1 from the copied parent logs, epoch 3 its own
        self.assertLen(_hparams_sessions(os.path.join(config.tuning_dir, "hparams")), 4)
        self.assertTrue(os.path.isfile(os.path.join(config.tuning_dir, "best.flags")))


if __name__ == "__main__":
    tf.test.main()
