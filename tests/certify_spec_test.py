"""Tests for tf_consreg.certify_spec: the sampling settings, stage schedules and radii (no TensorFlow)."""

import dataclasses
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import mpmath
import numpy as np
import scipy.stats

from tf_consreg import certify_spec
from tf_consreg.certify_spec import CertifySpec
from tf_consreg.errors import ConfigError


# What every job says to a sigma grid noise cannot sample: one line, naming --sigma and the way out.
_GRID_SIGMA_MESSAGE = (r"^--sigma=16.5 with --noise=grid: grid noise: sigma must be in \(0, 16\] \(its noise table "
                       r"holds no more\); give --noise=float for a larger sigma$")


class CertifySpecTest(parameterized.TestCase):

    def test_defaults(self):
        # Cohen et al.'s n0 = 100, n = 100,000, alpha = 0.001; the binaries' batch of 1000 noisy copies.
        spec = CertifySpec()
        self.assertEqual((spec.sigma, spec.n0, spec.n, spec.alpha, spec.batch_size, spec.stages, spec.compute_dtype),
                         (None, 100, 100000, 0.001, 1000, None, "float32"))
        # Grid noise: every dataset we ship is 8-bit. Float is asked for by name.
        self.assertEqual(spec.noise, "grid")
        self.assertEqual(certify_spec.DEFAULT_NOISE, "grid")
        self.assertEqual(CertifySpec(noise="float").noise, "float")
        # Live certification and the export keep float noise (certify_spec.py says why), and differ in n alone.
        self.assertEqual(certify_spec.LIVE, CertifySpec(n=1000, noise="float"))
        self.assertEqual(certify_spec.EXPORT, CertifySpec(n=10000, noise="grid"))

    def test_values_are_python_numbers(self):
        spec = CertifySpec(sigma=1, n0=np.int64(10), n=np.int32(200), alpha=np.float32(0.25), batch_size=np.int64(50),
                           stages=np.array([100, 200]))
        for value, kind in ((spec.sigma, float), (spec.n0, int), (spec.n, int), (spec.alpha, float),
                            (spec.batch_size, int)):
            self.assertIs(type(value), kind)
        self.assertEqual(spec.stages, (100, 200))
        self.assertIs(type(spec.stages[0]), int)

    def test_is_frozen(self):
        with self.assertRaises(dataclasses.FrozenInstanceError):
            CertifySpec().n = 5  # pytype: disable=not-writable

    def test_largest_counts(self):
        # int32 counts in the sampling graph: 2^31 - 1 is the largest.
        spec = CertifySpec(n0=2**31 - 1, n=2**31 - 1, batch_size=2**31 - 1)
        self.assertEqual((spec.n0, spec.n, spec.batch_size), (2**31 - 1,) * 3)

    # The strictest of the rules that ExportConfig, VersionExportConfig, CertifyConfig, TrainConfig, TuneConfig
    # and CertifyCallback held each (their cases merged here): integers that are no bools, in [1, 2^31).
    @parameterized.named_parameters(
        ("sigma_zero", dict(sigma=0.0), "^--sigma must be a finite number > 0, got 0.0$"),
        ("sigma_negative", dict(sigma=-0.5), "^--sigma must be a finite number > 0, got -0.5$"),
        ("sigma_nan", dict(sigma=float("nan")), "^--sigma must be a finite number > 0, got nan$"),
        ("sigma_inf", dict(sigma=float("inf")), "^--sigma must be a finite number > 0, got inf$"),
        ("sigma_bool", dict(sigma=True), "^--sigma must be a finite number > 0, got True$"),
        ("sigma_text", dict(sigma="0.5"), "^--sigma must be a finite number > 0, got '0.5'$"),
        ("n0_zero", dict(n0=0), r"^--n0 must be an integer in \[1, 2\^31\), got 0$"),
        ("n0_negative", dict(n0=-3), r"^--n0 must be an integer in \[1, 2\^31\), got -3$"),
        ("n0_bool", dict(n0=True), r"^--n0 must be an integer in \[1, 2\^31\), got True$"),
        ("n0_float", dict(n0=10.0), r"^--n0 must be an integer in \[1, 2\^31\), got 10.0$"),
        ("n0_huge", dict(n0=2**31), r"^--n0 must be an integer in \[1, 2\^31\), got 2147483648$"),
        ("n_zero", dict(n=0), r"^--n must be an integer in \[1, 2\^31\), got 0$"),
        ("n_huge", dict(n=2**31), r"^--n must be an integer in \[1, 2\^31\), got 2147483648$"),
        ("n_bool", dict(n=False), r"^--n must be an integer in \[1, 2\^31\), got False$"),
        ("alpha_zero", dict(alpha=0.0), r"^--alpha must be in \(0, 1\), got 0.0$"),
        ("alpha_one", dict(alpha=1.0), r"^--alpha must be in \(0, 1\), got 1.0$"),
        ("alpha_above_one", dict(alpha=1.5), r"^--alpha must be in \(0, 1\), got 1.5$"),
        ("alpha_nan", dict(alpha=float("nan")), r"^--alpha must be in \(0, 1\), got nan$"),
        ("alpha_bool", dict(alpha=True), r"^--alpha must be in \(0, 1\), got True$"),
        ("batch_size_zero", dict(batch_size=0), r"^--batch_size must be an integer in \[1, 2\^31\), got 0$"),
        ("batch_size_huge", dict(batch_size=2**31), r"^--batch_size must be an integer in \[1, 2\^31\)"),
        ("batch_size_bool", dict(batch_size=True), r"^--batch_size must be an integer in \[1, 2\^31\), got True$"),
        ("stages_not_ending_at_n", dict(n=10000, stages=(100, 1000)), "^--stages must end at n=10000"),
        ("stages_not_increasing", dict(n=10000, stages=(1000, 100, 10000)), "^--stages must strictly increase"),
        ("stages_empty", dict(stages=()), "^--stages must be a non-empty"),
        ("stage_not_integer", dict(n=10000, stages=(100.5, 10000)), "^--stages must be integers"),
        ("stage_bool", dict(n=10, stages=(True, 10)), "^--stages must be integers"),
        ("compute_dtype", dict(compute_dtype="float16"),
         "^--compute_dtype='float16' is unknown; choose one of float32, bfloat16$"),
        ("noise", dict(noise="gauss"), "^--noise must be one of float, grid, got 'gauss'$"),
        ("noise_none", dict(noise=None), "^--noise must be one of float, grid, got None$"),
        ("grid_sigma_above_16", dict(sigma=16.5), _GRID_SIGMA_MESSAGE),
        ("grid_sigma_above_16_explicit", dict(sigma=16.5, noise="grid"), _GRID_SIGMA_MESSAGE),
    )
    def test_bad_values_name_the_flag(self, values, message):
        with self.assertRaisesRegex(ConfigError, message):
            CertifySpec(**values)

    def test_grid_sigma_limit(self):
        # 16 is the grid table's own limit (noise.grid_noise_table refuses above it); float noise has none.
        self.assertEqual(certify_spec.GRID_MAX_SIGMA, 16.0)
        self.assertEqual(CertifySpec(sigma=16).sigma, 16.0)
        self.assertEqual(CertifySpec(sigma=16.5, noise="float").sigma, 16.5)
        # A sigma filled in later (a training run's) is checked then.
        with self.assertRaisesRegex(ConfigError, _GRID_SIGMA_MESSAGE):
            CertifySpec().with_sigma(16.5)

    def test_replace_checks_again(self):
        with self.assertRaisesRegex(ConfigError, "^--n0"):
            dataclasses.replace(CertifySpec(), n0=0)

    def test_resolved(self):
        # CERTIFY: the default from max(n0, 100), a given schedule at n0 or above.
        self.assertEqual(CertifySpec(n=100000, n0=200).resolved().stages, (300, 1000, 3000, 10000, 30000, 50000,
                                                                          100000))
        self.assertEqual(CertifySpec(n=1000, stages=(100, 1000)).resolved().stages, (100, 1000))
        with self.assertRaisesRegex(ConfigError, "^--stages must start at n0=100 or above"):
            CertifySpec(n=1000, stages=(50, 1000)).resolved()
        # PREDICT draws no selection samples: no lower limit.
        self.assertEqual(CertifySpec(n=1000, stages=(50, 1000)).resolved(selection=False).stages, (50, 1000))
        # 1000 x (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1) from 100 on.
        self.assertEqual(CertifySpec(n=1000).resolved(selection=False).stages, (100, 300, 500, 1000))

    def test_with_sigma(self):
        self.assertEqual(CertifySpec().with_sigma(0.25).sigma, 0.25)
        self.assertEqual(CertifySpec(sigma=0.25).with_sigma(0.25).sigma, 0.25)
        with self.assertRaisesRegex(ConfigError, "sigma=0.5 differs from the training run's --sigma=0.25"):
            CertifySpec(sigma=0.5).with_sigma(0.25)

    def test_imports_no_tensorflow(self):
        # Run configs and cli import it; a fresh interpreter, since this one may hold TensorFlow already.
        code = "import sys, tf_consreg.certify_spec; sys.exit(int('tensorflow' in sys.modules))"
        self.assertEqual(subprocess.run([sys.executable, "-c", code], check=False).returncode, 0)


class GridSigmaJobsTest(absltest.TestCase):
    """Every job refuses grid noise above GRID_MAX_SIGMA before any work, in the spec's one line."""

    def test_certify_smooth_and_export_refuse_it(self):
        # Imported here: the rest of this file runs without TensorFlow.
        import keras  # pylint: disable=import-outside-toplevel
        from tf_consreg import certify_run  # pylint: disable=import-outside-toplevel
        from tf_consreg import cli  # pylint: disable=import-outside-toplevel
        from tf_consreg import export  # pylint: disable=import-outside-toplevel
        from tf_consreg import smoothing  # pylint: disable=import-outside-toplevel

        root = self.enterContext(tempfile.TemporaryDirectory())
        model_file = os.path.join(root, "model.keras")
        model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
        model.save(model_file)
        output = os.path.join(root, "certify.tsv")
        export_dir = os.path.join(root, "export")
        jobs = {
            # As bin/certify.py builds its config from its flags.
            "certify": lambda: cli.config_from_values(certify_run.CertifyConfig, dict(
                output=output, dataset="fashion_mnist", model=model_file, sigma=16.5)),
            "smooth": lambda: smoothing.Smooth(model, 2, 16.5),
            # As bin/export.py builds its config from its flags.
            "export": lambda: cli.config_from_values(export.VersionExportConfig, dict(
                export_dir=export_dir, model=model_file, sigma=16.5, version=1)),
        }
        for name, job in jobs.items():
            with self.subTest(job=name):
                with self.assertRaisesRegex(ConfigError, _GRID_SIGMA_MESSAGE):
                    job()
        self.assertEqual(sorted(os.listdir(root)), ["model.keras"])  # Nothing written.
        # The same settings with float noise pass.
        self.assertEqual(smoothing.Smooth(model, 2, 16.5, noise="float").sigma, 16.5)


# Moved from stats_test (the schedule's rules moved here from stats).
class ScheduleTest(parameterized.TestCase):

    def test_check_stages_accepts_increasing_counts(self):
        self.assertEqual(certify_spec.check_stages([100, 1000, 10000], 10000), (100, 1000, 10000))
        self.assertEqual(certify_spec.check_stages(np.array([5, 7]), None), (5, 7))
        self.assertEqual(certify_spec.check_stages((1,), 1), (1,))
        self.assertIsInstance(certify_spec.check_stages(np.array([5, 7]))[0], int)

    @parameterized.named_parameters(
        ("empty", [], None, "non-empty"),
        ("not_a_sequence", 100, None, "sequence"),
        ("string", "100", None, "sequence"),
        ("zero", [0, 10], None, ">= 1"),
        ("negative", [-5, 10], None, ">= 1"),
        ("float", [10.0, 100], None, "integers"),
        ("bool", [True, 10], None, "integers"),
        ("numpy_bool", [np.bool_(True), 10], None, "integers"),
        ("equal", [10, 10, 100], None, "strictly increase"),
        ("decreasing", [100, 10], None, "strictly increase"),
        ("wrong_end", [10, 100], 1000, "end at n=1000"),
    )
    def test_check_stages_rejects(self, stages, n, word):
        with self.assertRaisesRegex(ConfigError, f"^stages must.*{word}"):
            certify_spec.check_stages(stages, n)

    def test_default_stages(self):
        self.assertEqual(certify_spec.default_stages(100000), (100, 300, 1000, 3000, 10000, 30000, 50000, 100000))
        self.assertEqual(certify_spec.default_stages(10000), (100, 300, 1000, 3000, 5000, 10000))
        self.assertEqual(certify_spec.default_stages(100000, smallest=1000),
                         (1000, 3000, 10000, 30000, 50000, 100000))
        self.assertEqual(certify_spec.default_stages(50), (50,))
        self.assertEqual(certify_spec.default_stages(100), (100,))
        for n in (1, 99, 101, 777, 12345, 10**6, 2**31 - 1):
            stages = certify_spec.default_stages(n)
            self.assertEqual(certify_spec.check_stages(stages, n), stages)
            self.assertGreaterEqual(stages[0], min(n, 100))

    @parameterized.parameters((0, 100), (10.0, 100), (100, 0), (True, 100))
    def test_default_stages_rejects(self, n, smallest):
        with self.assertRaises(ConfigError):
            certify_spec.default_stages(n, smallest)

    def test_resolve_stages(self):
        # The default starts at max(n0, 100); a given schedule is checked.
        self.assertEqual(certify_spec.resolve_stages(None, 100000), certify_spec.default_stages(100000))
        self.assertEqual(certify_spec.resolve_stages(None, 100000, n0=200),
                         (300, 1000, 3000, 10000, 30000, 50000, 100000))
        self.assertEqual(certify_spec.resolve_stages([100, 1000], 1000, n0=100), (100, 1000))
        # One stage is fixed-n CERTIFY: below n0 is fine.
        self.assertEqual(certify_spec.resolve_stages([50], 50, n0=100), (50,))
        # PREDICT has no selection samples: no lower limit but the checks.
        self.assertEqual(certify_spec.resolve_stages([10, 1000], 1000), (10, 1000))
        for stages, n0, message in (([50, 1000], 100, "^stages must start at n0=100 or above"),
                                    ([100, 500], 100, "^stages must end at n=1000"),
                                    ([500, 200, 1000], None, "^stages must strictly increase")):
            with self.assertRaisesRegex(ValueError, message):
                certify_spec.resolve_stages(stages, 1000, n0)


class SmallestNTest(parameterized.TestCase):
    """Whether n and alpha can answer at all, against independent references (scipy, mpmath)."""

    @parameterized.parameters(1e-3, 1e-2, 0.05, 0.5, 0.25, 2.0**-10, 1e-5, 1e-12, 0.3)
    def test_certify_against_scipy_and_mpmath(self, alpha):
        # The exact bound with all n samples correct is the alpha quantile of Beta(n, 1), alpha^(1/n):
        # scipy's beta.ppf and mpmath's root at 60 digits say where it first exceeds 1/2.
        n = certify_spec.smallest_n(lambda n: certify_spec.certify_can_certify(n, alpha))
        mpmath.mp.dps = 60
        self.assertGreater(mpmath.root(mpmath.mpf(alpha), n), mpmath.mpf(1) / 2)
        self.assertLessEqual(mpmath.root(mpmath.mpf(alpha), n - 1), mpmath.mpf(1) / 2)
        # scipy's Clopper-Pearson bound agrees to float accuracy (1e-12 relative is far above its rounding and far
        # below the distance of these alphas' bounds from 1/2, which the mpmath lines above fix).
        self.assertGreater(scipy.stats.beta.ppf(alpha, n, 1) * (1 + 1e-12), 0.5)
        if n > 1:
            self.assertLessEqual(scipy.stats.beta.ppf(alpha, n - 1, 1) * (1 - 1e-12), 0.5)

    def test_known_values(self):
        # locuslab/smoothing#8: alpha = 0.001 needs n >= 10 (0.001^(1/10) = 0.5012, 0.001^(1/9) = 0.464); Cohen
        # et al.'s alpha = 0.001 with n = 100,000 can. alpha = 2^-10 at n = 10 gives exactly 1/2: radius 0, refused.
        self.assertEqual(certify_spec.smallest_n(lambda n: certify_spec.certify_can_certify(n, 0.001)), 10)
        self.assertTrue(certify_spec.certify_can_certify(100000, 0.001))
        self.assertFalse(certify_spec.certify_can_certify(10, 2.0**-10))
        self.assertTrue(certify_spec.certify_can_certify(11, 2.0**-10))

    def test_certify_slack(self):
        # With slack s the bound is alpha^(1/n) - s: at alpha = 0.001, n = 10 the bound is 0.50119 (mpmath), so a
        # slack of 0.001 leaves 0.50019 > 1/2 and a slack of 0.002 leaves 0.49919 < 1/2.
        mpmath.mp.dps = 30
        exact = mpmath.root(mpmath.mpf(0.001), 10)
        self.assertTrue(mpmath.almosteq(exact, mpmath.mpf("0.501187233627272"), 1e-14))
        self.assertTrue(certify_spec.certify_can_certify(10, 0.001, 0.001))
        self.assertFalse(certify_spec.certify_can_certify(10, 0.001, 0.002))
        self.assertEqual(certify_spec.smallest_n(lambda n: certify_spec.certify_can_certify(n, 0.001, 0.002)), 11)
        self.assertFalse(certify_spec.certify_can_certify(10**6, 0.5, 0.5))  # 1/2 + s >= 1: nothing certifies.

    @parameterized.parameters(1e-3, 1e-2, 0.05, 0.5, 0.25, 2.0**-10, 1e-12)
    def test_predict_against_scipy(self, alpha):
        # All n samples in one class: scipy's two-sided binomial test of (n, 0) must reach p <= alpha at the
        # smallest n, and not before (where the exact p-value 2^(1-n) equals alpha, the engine's p-value, never
        # below the exact one, abstains: so equality counts as abstaining).
        n = certify_spec.smallest_n(lambda n: certify_spec.predict_can_decide(n, alpha))
        self.assertLess(scipy.stats.binomtest(n, n, 0.5).pvalue, alpha)
        self.assertGreaterEqual(scipy.stats.binomtest(n - 1, n - 1, 0.5).pvalue, alpha)

    def test_smallest_n_gives_up(self):
        self.assertIsNone(certify_spec.smallest_n(lambda n: False, limit=10))


class CheckRadiiTest(parameterized.TestCase):
    """The one rule for radii: stats (staged certification), analysis (tables) and the fixed-radius log use it."""

    def test_order_kept(self):
        # Moved from stats_test and certify_log_test (the log's caller sorts).
        self.assertEqual(certify_spec.check_radii([0.5, 0.25]), (0.5, 0.25))
        self.assertEqual(certify_spec.check_radii([1.0, 0.25, 0.5], digits=3), (1.0, 0.25, 0.5))
        self.assertEqual(certify_spec.check_radii(np.array([1, 2])), (1.0, 2.0))
        self.assertIs(type(certify_spec.check_radii((1,))[0]), float)

    def test_zero_for_tables(self):
        # Moved from analysis: certified accuracy at radius 0 is the smoothed classifier's accuracy.
        self.assertEqual(certify_spec.check_radii([0, 0.5], allow_zero=True), (0.0, 0.5))
        with self.assertRaisesRegex(ConfigError, "^--radii must be finite and >= 0, got -1.0$"):
            certify_spec.check_radii([-1.0], allow_zero=True, name="--radii")

    # From stats_test (library: "radii must"), certify_log_test (log: "--radii") and analysis_test.
    @parameterized.named_parameters(
        ("empty", [], {}, "radii must hold at least one radius"),
        ("zero", [0.0], {}, "radii must be finite and > 0, got 0.0"),
        ("negative", [0.5, -0.25], {}, "radii must be finite and > 0, got -0.25"),
        ("inf", [float("inf")], {}, "radii must be finite and > 0, got inf"),
        ("nan", [float("nan")], {}, "radii must be finite and > 0, got nan"),
        ("matrix", [[0.5]], {}, r"radii must be numbers, got \[0.5\]"),
        ("scalar", 0.5, {}, "radii must be a list of numbers, got 0.5"),
        ("string", "0.5", {}, "radii must be a list of numbers, got '0.5'"),
        ("text", ["a"], {}, "radii must be numbers, got 'a'"),
        ("bool", [True], {}, "radii must be numbers, got True"),
        ("twice", [0.5, 0.5], {}, "radii lists 0.5 twice"),
        ("digits", [0.3333], dict(digits=3), "radii: 0.3333 has more than 3 significant digits"),
        ("negative_with_zero_allowed", [-0.5], dict(allow_zero=True), "radii must be finite and >= 0, got -0.5"),
        ("empty_with_zero_allowed", [], dict(allow_zero=True), "radii must hold at least one radius"),
    )
    def test_rejects(self, radii, options, message):
        with self.assertRaisesRegex(ConfigError, f"^{message}"):
            certify_spec.check_radii(radii, **options)
        with self.assertRaisesRegex(ConfigError, f"^--{message}"):
            certify_spec.check_radii(radii, name="--radii", **options)

    def test_three_digits_are_accepted(self):
        self.assertEqual(certify_spec.check_radii([0.125, 1.75, 0.333], digits=3), (0.125, 1.75, 0.333))


if __name__ == "__main__":
    absltest.main()
