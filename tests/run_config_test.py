"""run_config.py: the objective's and the run's configs, their record as flags and JSON, and the precision.

Also that certification and export can read a run's config without loading
training: importing run_config loads no losses, attacks, callbacks,
multi-worker loop, wrapper or training.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized

from tf_consreg import cli
from tf_consreg import objectives
from tf_consreg import precision
from tf_consreg import run_config
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError

# The settings a method cannot go without (a path that is never loaded here).
_REQUIRED = {"denoise": {"classifier": "f.keras"}}


class ObjectiveConfigTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("gaussian", dict(method="gaussian"), dict(num_noise=1)),
        ("consistency", dict(method="consistency"), dict(num_noise=2, lbd=10.0, eta=0.5, consistency_loss="default")),
        ("stability", dict(method="stability"), dict(num_noise=1, lbd=2.0)),
        ("smoothadv", dict(method="smoothadv"), dict(num_noise=1, epsilon=0.25, num_steps=10, warmup=1)),
        ("macer", dict(method="macer"), dict(num_noise=16, lbd=16.0, beta=16.0, gamma=8.0, deferred_epochs=0)),
        ("adv_consistency", dict(method="consistency", adv_training=True),
         dict(num_noise=2, lbd=10.0, eta=0.5, consistency_loss="default", epsilon=2.0, num_steps=4, warmup=10)),
        ("given", dict(method="consistency", num_noise=4, lbd=3.0),
         dict(num_noise=4, lbd=3.0, eta=0.5, consistency_loss="default")),
        # The authors' argparse defaults (code/train.py of jh-jeong/smoothmix); no bounds.
        ("smoothmix", dict(method="smoothmix"),
         dict(num_noise=1, eta=1.0, num_steps=8, warmup=10, attack_step=1.0, mix_step=0)),
        ("smoothmix_given", dict(method="smoothmix", num_noise=4, mix_step=1, maxnorm=2.0, maxnorm_s=0.5),
         dict(num_noise=4, eta=1.0, num_steps=8, warmup=10, attack_step=1.0, mix_step=1, maxnorm=2.0,
              maxnorm_s=0.5)),
    )
    def test_the_methods_defaults_and_nothing_else(self, given, expected):
        objective = run_config.ObjectiveConfig(sigma=0.5, **given)
        method_fields = ("num_noise", "lbd", "eta", "consistency_loss", "beta", "gamma", "deferred_epochs", "epsilon",
                         "num_steps", "warmup", "attack_step", "mix_step", "maxnorm", "maxnorm_s")
        self.assertEqual({name: getattr(objective, name) for name in method_fields
                          if getattr(objective, name) is not None}, expected)

    @parameterized.named_parameters(
        ("unused", dict(method="gaussian", lbd=1.0), "^--lbd is used only by --method=consistency or "
                                                     "--method=stability or --method=macer or --method=denoise; "
                                                     "remove it for --method=gaussian$"),
        ("attack_field", dict(method="macer", num_steps=3), "--num_steps is used only by --method=smoothadv or "
                                                            "--method=smoothmix or --method=consistency "
                                                            "--adv_training"),
        ("adv_training", dict(method="stability", adv_training=True), "--adv_training combines SmoothAdv"),
        ("method", dict(method="mixup"), "--method='mixup' is unknown"),
        ("sigma", dict(method="gaussian", sigma=0.0), "--sigma must be > 0"),
        ("weight_decay", dict(method="gaussian", weight_decay=-1.0), "--weight_decay must be >= 0"),
        ("deferred", dict(method="macer", deferred_epochs=-1), "deferred_epochs must be >= 0"),
        ("attack_step", dict(method="smoothmix", attack_step=0.0), "^--attack_step must be > 0 "),
        ("smoothmix_steps", dict(method="smoothmix", num_steps=0), "^--num_steps must be >= 1, got 0$"),
        ("mix_step", dict(method="smoothmix", mix_step=2), "^--mix_step must be 0 .* or 1 .*, got 2$"),
        ("smoothmix_eta", dict(method="smoothmix", eta=-1.0), "^--eta must be >= 0, got -1.0$"),
        ("maxnorm", dict(method="smoothmix", maxnorm=0.0), "^--maxnorm must be > 0 "),
        ("maxnorm_s", dict(method="smoothmix", maxnorm_s=-0.5), "^--maxnorm_s must be > 0 "),
        ("smoothmix_warmup", dict(method="smoothmix", warmup=0), "^--warmup must be >= 1, got 0$"),
        ("smoothmix_lbd", dict(method="smoothmix", lbd=1.0), "^--lbd is used only by .*; remove it for "
                                                              "--method=smoothmix$"),
        ("smoothmix_epsilon", dict(method="smoothmix", epsilon=0.5), "^--epsilon is used only by "),
        ("smoothmix_beta", dict(method="smoothmix", beta=1.0), "^--beta is used only by --method=macer"),
        ("smoothmix_consistency_loss", dict(method="smoothmix", consistency_loss="kl"),
         "^--consistency_loss is used only by --method=consistency"),
        ("smoothmix_adv_training", dict(method="smoothmix", adv_training=True), "--adv_training combines SmoothAdv"),
        ("attack_step_smoothadv", dict(method="smoothadv", attack_step=1.0),
         "^--attack_step is used only by --method=smoothmix; remove it for --method=smoothadv$"),
        ("mix_step_consistency", dict(method="consistency", mix_step=0),
         "^--mix_step is used only by --method=smoothmix; remove it for --method=consistency$"),
        ("maxnorm_gaussian", dict(method="gaussian", maxnorm=1.0), "^--maxnorm is used only by --method=smoothmix"),
        ("maxnorm_s_macer", dict(method="macer", maxnorm_s=1.0), "^--maxnorm_s is used only by --method=smoothmix"),
    )
    def test_refuses(self, fields, message):
        with self.assertRaisesRegex(ConfigError, message):
            run_config.ObjectiveConfig(**{"sigma": 0.5, **fields})

    def test_adversarial_is_smoothadv_or_adv_training(self):
        adversarial = {method: run_config.ObjectiveConfig(method=method, sigma=0.5, **_REQUIRED.get(method, {}))
                       .adversarial for method in objectives.METHODS}
        self.assertEqual(adversarial, {"gaussian": False, "consistency": False, "stability": False,
                                       "smoothadv": True, "macer": False, "smoothmix": False, "standard": False,
                                       "denoise": False})
        self.assertTrue(run_config.ObjectiveConfig(method="consistency", sigma=0.5, adv_training=True).adversarial)


class TrainConfigTest(parameterized.TestCase):

    def test_records_its_objective_flat_by_flag_name(self):
        config = run_config.TrainConfig(model_dir="/m", objective=run_config.ObjectiveConfig(sigma=0.5, lbd=3.0))
        values = config.to_dict()
        self.assertEqual((values["sigma"], values["num_noise"], values["lbd"], values["eta"], values["beta"]),
                         (0.5, 2, 3.0, 0.5, None))
        self.assertNotIn("objective", values)
        self.assertNotIn("deferred_epochs", values)  # --deferred's, derived.
        self.assertEqual(run_config.TrainConfig.from_dict(values), config)
        with self.assertRaisesRegex(ConfigError, "unknown training config fields: nope"):
            run_config.TrainConfig.from_dict({**values, "nope": 1})
        self.assertEqual(config.sigma, 0.5)

    # train_config.json as runs recorded it before live certification's settings were one CertifySpec: flat, by
    # flag name, None while --certify_every is off. Such runs must still be read, certified, exported and resumed.
    _RECORDED = {"model_dir": "/m", "dataset": "fashion_mnist", "arch": "lenet", "method": "consistency",
                 "sigma": 0.5, "num_noise": 2, "lbd": 10.0, "eta": 0.5, "consistency_loss": "default", "beta": None,
                 "gamma": None, "adv_training": False, "epsilon": None, "num_steps": None, "warmup": None,
                 "attack_step": None, "mix_step": None, "maxnorm": None, "maxnorm_s": None, "weight_decay": 1e-4,
                 "deferred": None, "epochs": 90, "batch_size": 256, "batch_split": False, "lr": 0.01,
                 "lr_step_size": 30, "lr_gamma": 0.1, "momentum": 0.9, "seed": 0, "train_examples": 0,
                 "eval_examples": 10000, "certify_every": 0, "certify_examples": None, "certify_n0": None,
                 "certify_n": None, "certify_alpha": None, "certify_batch_size": None, "data_dir": None,
                 "mock_data": False, "strategy": "auto", "steps_per_execution": 1, "mixed_precision": "auto",
                 "jit_compile": False, "pretrained_model": None, "precision_policy": None}

    def test_reads_records_of_live_certification_by_flag_name(self):
        off = run_config.TrainConfig.from_dict(self._RECORDED)
        # certify_spec.LIVE at the run's sigma.
        self.assertEqual(off.certify, CertifySpec(sigma=0.5, n=1000, noise="float"))
        self.assertEqual(off.to_dict(), self._RECORDED)  # So the run resumes (_check_model_dir compares them).
        on = {**self._RECORDED, "certify_every": 2, "certify_examples": 200, "certify_n0": 64, "certify_n": 500,
              "certify_alpha": 0.01, "certify_batch_size": 250}
        config = run_config.TrainConfig.from_dict(on)
        self.assertEqual(config.certify,
                         CertifySpec(sigma=0.5, n0=64, n=500, alpha=0.01, batch_size=250, noise="float"))
        self.assertEqual(config.to_dict(), on)
        # The defaults of live certification, recorded as they resolve.
        defaults = run_config.TrainConfig(model_dir="/m", certify_every=1).to_dict()
        self.assertEqual({name: defaults[name] for name in ("certify_examples", *run_config.CERTIFY_FLAGS)},
                         {"certify_examples": 200, "certify_n0": 100, "certify_n": 1000, "certify_alpha": 0.001,
                          "certify_batch_size": 1000})
        with self.assertRaisesRegex(ConfigError, r"^--certify_n must be an integer in \[1, 2\^31\), got 0$"):
            run_config.TrainConfig.from_dict({**on, "certify_n": 0})

    @parameterized.named_parameters(
        ("n0", dict(certify=CertifySpec(n0=5, n=1000, noise="float")),
         "^--certify_n0 is used only with --certify_every"),
        ("examples", dict(certify_examples=10), "^--certify_examples is used only with --certify_every"),
        ("staged", dict(certify_every=1, certify=CertifySpec(n=1000, stages=(100, 1000), noise="float")),
         "full CERTIFY"),
        ("bfloat16", dict(certify_every=1, certify=CertifySpec(n=1000, compute_dtype="bfloat16", noise="float")),
         "float32"),
        # Every image would abstain: 0.001^(1/9) = 0.464 <= 1/2 (certify_spec_test checks the smallest n, 10).
        ("hopeless_n", dict(certify_every=1, certify=CertifySpec(n0=5, n=9, noise="float")),
         r"^--certify_n=9 and --certify_alpha=0.001 cannot certify any image: .* at this alpha is 10$"),
        ("grid", dict(certify_every=1, certify=CertifySpec(n=1000, noise="grid")), "with float noise"),
        ("other_sigma", dict(certify_every=1, certify=CertifySpec(sigma=0.5, n=1000, noise="float")),
         "the certification's sigma=0.5 differs from the training run's --sigma=0.25"),
        ("not_a_spec", dict(certify_every=1, certify=dict(n=1000)), "^certify must be a CertifySpec"),
    )
    def test_live_certification_refuses(self, fields, message):
        # The settings' own checks (n0, n, alpha, batch_size): certify_spec_test; with their flag names: cli_test.
        with self.assertRaisesRegex(ConfigError, message):
            run_config.TrainConfig(model_dir="/m", **fields)

    def test_deferred_macer_waits_for_the_first_learning_rate_drop(self):
        macer = run_config.ObjectiveConfig(method="macer")
        config = run_config.TrainConfig(model_dir="/m", objective=macer, deferred=True, lr_step_size=5)
        self.assertEqual(config.objective.deferred_epochs, 6)  # train_macer.py: while epoch <= lr_step_size
        self.assertEqual(dataclasses.replace(config, lr_step_size=9).objective.deferred_epochs, 10)
        self.assertEqual(run_config.TrainConfig(model_dir="/m", objective=macer).objective.deferred_epochs, 0)
        self.assertFalse(run_config.TrainConfig(model_dir="/m", objective=macer).deferred)
        with self.assertRaisesRegex(ConfigError, "^--deferred is used only by --method=macer; remove it for "
                                                 "--method=gaussian$"):
            run_config.TrainConfig(model_dir="/m", objective=run_config.ObjectiveConfig(method="gaussian"),
                                   deferred=False)
        with self.assertRaisesRegex(ConfigError, "^--deferred is used only by --method=macer; remove it for "
                                                 "--method=smoothmix$"):
            run_config.TrainConfig(model_dir="/m", objective=run_config.ObjectiveConfig(method="smoothmix"),
                                   deferred=True)

    def test_batch_split_needs_whole_chunks(self):
        objective = run_config.ObjectiveConfig(num_noise=4)
        self.assertEqual(run_config.TrainConfig(model_dir="/m", objective=objective, batch_size=64,
                                                batch_split=True).clean_batch_size, 16)
        with self.assertRaisesRegex(ConfigError, "^--batch_size=66 must be divisible by --num_noise=4 with "
                                                 "--batch_split$"):
            run_config.TrainConfig(model_dir="/m", objective=objective, batch_size=66, batch_split=True)


class FlagsTest(parameterized.TestCase):
    """TrainConfig.to_flags, the one way training flags are written (flags.txt, best.flags)."""

    def test_one_help_per_flag(self):
        # precision_policy is no flag: the run resolves it (PrecisionTest).
        names = {f.name for f in dataclasses.fields(run_config.TrainConfig)} - {"objective", "certify",
                                                                                "precision_policy"}
        names |= {f.name for f in dataclasses.fields(run_config.ObjectiveConfig) if f.name != "deferred_epochs"}
        names |= set(run_config.CERTIFY_FLAGS)
        self.assertEqual(set(cli.TRAIN_HELP), names)

    @parameterized.named_parameters(
        ("gaussian", dict(method="gaussian"), {}),
        ("consistency", dict(method="consistency", lbd=2.5, eta=0.1, consistency_loss="xent"), {}),
        ("stability", dict(method="stability", weight_decay=0.0), {}),
        ("smoothadv", dict(method="smoothadv", epsilon=255 / 256, num_steps=2), {}),
        ("macer", dict(method="macer", num_noise=4), {}),
        ("macer_deferred", dict(method="macer"), dict(deferred=True, lr_step_size=7)),
        ("adv_consistency", dict(method="consistency", adv_training=True, sigma=1 / 3), {}),
        ("smoothmix", dict(method="smoothmix", num_noise=4, num_steps=2, attack_step=0.5, eta=5.0), {}),
        ("smoothmix_bounded", dict(method="smoothmix", mix_step=1, maxnorm=2.0, maxnorm_s=1 / 3), {}),
        ("everything_else", {}, dict(dataset="cifar10", arch="cifar_resnet20", batch_split=True, certify_every=2,
                                     certify=CertifySpec(n=1000, alpha=1e-5, noise="float"), data_dir="/data dir/x",
                                     mock_data=True, strategy="mirrored",
                                     steps_per_execution=4, mixed_precision="mixed_bfloat16", jit_compile=True)),
    )
    def test_to_flags_parses_back_to_the_same_config(self, objective, fields):
        config = run_config.TrainConfig(model_dir="/runs/a run", objective=run_config.ObjectiveConfig(**objective),
                                        **fields)
        values = flags.FlagValues()
        holders = cli.define_flags(run_config.TrainConfig, cli.TRAIN_HELP, flag_values=values)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "flags.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config.to_flags())
        values(["train", f"--flagfile={path}"])
        self.assertEqual(cli.config_from_flags(run_config.TrainConfig, holders), config)

    def test_to_flags_lines(self):
        config = run_config.TrainConfig(model_dir="/m", objective=run_config.ObjectiveConfig(lbd=2.5, sigma=0.5),
                                        batch_size=64, train_examples=128, eval_examples=0)
        text = config.to_flags(exclude=("model_dir",))
        lines = text.splitlines()
        self.assertIn("--lbd=2.5", lines)
        self.assertIn("--noadv_training", lines)
        self.assertIn("--train_examples=128", lines)
        self.assertNotIn("--model_dir=/m", lines)
        self.assertFalse(any(line.startswith("--beta") for line in lines))  # None: not a flag of this method
        self.assertIn("--model_dir=/m", run_config.TrainConfig(model_dir="/m").to_flags().splitlines())


AMX_CPU = precision.Capability("Intel(R) Xeon(R) Platinum 8480+", ("avx512_bf16", "amx_bf16"))
AVX2_CPU = precision.Capability("AMD EPYC 7B12", ())
AMPERE = precision.Capability(None, None, (precision.Gpu("NVIDIA A100-SXM4-40GB", (8, 0)),))


class PrecisionTest(parameterized.TestCase):
    """--mixed_precision: auto by default, resolved per machine at the run's start, kept when a run resumes."""

    def test_auto_is_the_default_and_unresolved_until_the_run_starts(self):
        config = run_config.TrainConfig(model_dir="/m")
        self.assertEqual((config.mixed_precision, config.precision_policy), ("auto", None))

    @parameterized.parameters(("none", "float32"), ("float32", "float32"), ("mixed_bfloat16", "mixed_bfloat16"),
                              ("mixed_float16", "mixed_float16"))
    def test_a_named_policy_is_fixed_at_construction(self, requested, policy):
        self.assertEqual(run_config.TrainConfig(model_dir="/m", mixed_precision=requested).precision_policy, policy)

    @parameterized.named_parameters(
        ("native_cpu", AMX_CPU, "mixed_bfloat16"), ("avx2_cpu", AVX2_CPU, "float32"), ("ampere", AMPERE,
                                                                                       "mixed_bfloat16"))
    def test_auto_resolves_for_the_machine(self, capability, policy):
        config, reason = run_config.resolve_precision(run_config.TrainConfig(model_dir="/m"), capability=capability)
        self.assertEqual(config.precision_policy, policy)
        self.assertEqual(reason, precision.resolve("auto", capability).reason)
        self.assertEqual(json.loads(config.to_json())["precision_policy"], policy)  # train_config.json keeps it.

    @parameterized.named_parameters(
        ("bfloat16_run_on_an_avx2_cpu", "mixed_bfloat16", AVX2_CPU, " (here auto would choose float32: "
                                                                    "CPU AMD EPYC 7B12: no native bfloat16"),
        ("float32_run_on_an_amx_cpu", "float32", AMX_CPU, " (here auto would choose mixed_bfloat16: "),
        ("same_machine", "mixed_bfloat16", AMX_CPU, ""))
    def test_a_resumed_auto_run_keeps_its_policy(self, started_in, capability, note):
        recorded = run_config.TrainConfig(model_dir="/m", precision_policy=started_in).to_dict()
        config, reason = run_config.resolve_precision(run_config.TrainConfig(model_dir="/m"), recorded, capability)
        self.assertEqual(config.precision_policy, started_in)
        self.assertTrue(reason.startswith(f"--mixed_precision=auto: resuming in {started_in}, the policy this run "
                                          f"started with{note}"), reason)

    def test_a_record_of_another_request_does_not_decide(self):
        # _check_model_dir then refuses the directory: another run.
        recorded = run_config.TrainConfig(model_dir="/m", mixed_precision="none").to_dict()
        config, _ = run_config.resolve_precision(run_config.TrainConfig(model_dir="/m"), recorded, AMX_CPU)
        self.assertEqual(config.precision_policy, "mixed_bfloat16")

    def test_a_record_older_than_the_policy_field(self):
        recorded = run_config.TrainConfig(model_dir="/m", mixed_precision="mixed_bfloat16").to_dict()
        del recorded["precision_policy"]
        config, _ = run_config.resolve_precision(
            run_config.TrainConfig(model_dir="/m", mixed_precision="mixed_bfloat16"), recorded, AVX2_CPU)
        self.assertEqual(config.precision_policy, "mixed_bfloat16")

    def test_a_preset_policy_is_kept_or_refused(self):
        # A search resolves auto once and gives each trial the policy.
        preset = run_config.TrainConfig(model_dir="/m", precision_policy="mixed_bfloat16")
        config, reason = run_config.resolve_precision(preset, None, AVX2_CPU)
        self.assertEqual(config, preset)
        self.assertIn("mixed_bfloat16, resolved before this run", reason)
        recorded = run_config.TrainConfig(model_dir="/m", precision_policy="float32").to_dict()
        with self.assertRaisesRegex(ConfigError, "^--model_dir=/m computes in float32, recorded when the run "
                                                 "started; it cannot resume in mixed_bfloat16$"):
            run_config.resolve_precision(preset, recorded, AMX_CPU)

    @parameterized.named_parameters(
        ("unknown_request", dict(mixed_precision="bfloat16"), "^--mixed_precision='bfloat16' is unknown; choose one "
                                                              "of auto, none, float32, mixed_bfloat16, mixed_float16$"),
        ("unknown_policy", dict(precision_policy="bfloat16"), "^precision_policy='bfloat16' is unknown"),
        ("contradiction", dict(mixed_precision="none", precision_policy="mixed_bfloat16"),
         "^precision_policy=mixed_bfloat16 contradicts --mixed_precision=none, which computes in float32$"))
    def test_bad_values(self, fields, message):
        with self.assertRaisesRegex(ConfigError, message):
            run_config.TrainConfig(model_dir="/m", **fields)

    def test_flags_file_names_the_choice_and_parses_back_to_auto(self):
        config, _ = run_config.resolve_precision(run_config.TrainConfig(model_dir="/m"), capability=AMX_CPU)
        text = config.to_flags()
        self.assertEqual(text.splitlines()[0], "# --mixed_precision=auto chose mixed_bfloat16 for this run; "
                                               "--mixed_precision=mixed_bfloat16 asks for it on any machine")
        self.assertIn("--mixed_precision=auto", text.splitlines())
        self.assertNotIn("precision_policy", text.replace("# --mixed_precision", ""))
        values = flags.FlagValues()
        holders = cli.define_flags(run_config.TrainConfig, cli.TRAIN_HELP, flag_values=values)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "flags.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        values(["train", f"--flagfile={path}"])
        # The flags repeat the request; a new run resolves it on its machine.
        self.assertEqual(cli.config_from_flags(run_config.TrainConfig, holders),
                         dataclasses.replace(config, precision_policy=None))


class ReadTrainConfigTest(parameterized.TestCase):
    """A recorded train_config.json gets the flags' checks; a bad value names the file and the field (#22, 6)."""

    def _write(self, **changes) -> str:
        model_dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        values = {**run_config.TrainConfig(model_dir=model_dir).to_dict(), **changes}
        with open(os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(values, f)
        return model_dir

    def test_a_valid_record_reads_back(self):
        model_dir = self._write(lr=1)  # JSON's 1 where a float goes is the number 1.0.
        self.assertEqual(run_config.read_train_config(model_dir).lr, 1.0)

    @parameterized.named_parameters(
        ("string_sigma", {"sigma": "0.5"}, "field 'sigma' must be a finite number, got '0.5'"),
        ("bool_epochs", {"epochs": True}, "field 'epochs' must be an integer, got True"),
        ("list_lr", {"lr": [0.1]}, "field 'lr' must be a finite number, got [0.1]"),
        ("null_sigma", {"sigma": None}, "field 'sigma' must be given, got null"),
        ("null_epochs", {"epochs": None}, "field 'epochs' must be given, got null"),
        ("string_bool", {"mock_data": "false"}, "field 'mock_data' must be true or false, got 'false'"),
        ("int_string", {"arch": 3}, "field 'arch' must be a string, got 3"),
        ("nested_certify", {"certify_every": 1, "certify_n": "100"}, "field 'certify_n' must be an integer, got '100'"),
    )
    def test_a_value_of_the_wrong_type(self, changes, message):
        model_dir = self._write(**changes)
        path = os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE)
        with self.assertRaisesWithLiteralMatch(ConfigError, f"{path}: {message}"):
            run_config.read_train_config(model_dir)

    def test_a_value_the_flags_refuse_names_the_file(self):
        model_dir = self._write(lr=-0.1)
        path = os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE)
        with self.assertRaisesWithLiteralMatch(ConfigError, f"{path}: --lr must be > 0, got -0.1"):
            run_config.read_train_config(model_dir)

    def test_json_that_is_no_object(self):
        model_dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        path = os.path.join(model_dir, run_config.TRAIN_CONFIG_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write("[1, 2]")
        with self.assertRaisesWithLiteralMatch(ConfigError, f"{path} holds no JSON object"):
            run_config.read_train_config(model_dir)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImportTest(absltest.TestCase):
    """Certification and export read a run's config without loading training."""

    def test_reading_a_config_of_every_method_loads_no_training(self):
        # A fresh interpreter validates every method's config (as read_train_config does) and reads one back.
        code = "\n".join([
            "import os, sys, tempfile",
            "from tf_consreg import objectives, run_config",
            "for method in objectives.METHODS:",
            f"    required = {_REQUIRED!r}.get(method, {{}})",
            "    config = run_config.TrainConfig(model_dir=tempfile.mkdtemp(),",
            "                                    objective=run_config.ObjectiveConfig(method=method, **required))",
            "    with open(os.path.join(config.model_dir, run_config.TRAIN_CONFIG_FILE), 'w') as f:",
            "        f.write(config.to_json())",
            "    assert run_config.read_train_config(config.model_dir) == config, method",
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('tf_consreg'))))",
        ])
        result = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, check=True,
                                timeout=300)
        loaded = set(result.stdout.split())
        self.assertIn("tf_consreg.objectives", loaded)  # What validates the settings: loaded, so the check is real.
        self.assertEqual(loaded & {"tf_consreg.losses", "tf_consreg.attacks", "tf_consreg.callbacks",
                                   "tf_consreg.multi_worker", "tf_consreg.consistency_model", "tf_consreg.training"},
                         set())


if __name__ == "__main__":
    absltest.main()
