"""Tests for tf_consreg.analysis: the authors' published ACRs, a hand-computed log, sharded runs, plots.

The logs are written with certify_log_test.py's fixtures.
"""

import json
import os
import shutil

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from certify_log_test import (HAND_TSV, SHARD_SETTINGS, STAGED_TSV, hand_rows, tempdir, write, write_shard,
                              write_staged)
from tf_consreg import analysis
from tf_consreg import certify_log
from tf_consreg.errors import ConfigError

# The authors' published certification logs (see testdata/SOURCE.md).
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "reference_certify")

# ACRs the authors report for their published logs (SOURCE.md, paper Tables).
_REFERENCE_ACR = {
    "mnist_cohen_noise_0.25_3870.tsv": 0.9105,
    "mnist_cohen_noise_0.50_1801.tsv": 1.5569,
    "mnist_cohen_noise_1.00_2110.tsv": 1.6187,
    "mnist_consistency_lbd_10.0_noise_0.25_1.tsv": 0.9279,
    "mnist_consistency_lbd_5.0_noise_0.50_1.tsv": 1.6545,
    "mnist_consistency_lbd_5.0_noise_1.00_0.tsv": 1.7382,
    "cifar10_consistency_lbd_20.0_cifar_resnet110_noise_0.25.tsv": 0.5519,
    "cifar10_consistency_lbd_10.0_cifar_resnet110_noise_0.50.tsv": 0.7195,
    "cifar10_consistency_lbd_10.0_cifar_resnet110_noise_1.00.tsv": 0.7563,
}

# SmoothMix's published logs (testdata/SOURCE.md): ACR and certified accuracy (%) at
# r = 0, 0.25, ..., 2.5 at the precision of the SmoothMix paper's tables (ACR to 3
# decimals, accuracies to 1). These numbers were computed from the logs by an awk
# one-liner independent of tf_consreg (mean of radius * correct; fraction with
# correct = 1 and radius >= r, the authors' analyze.py definitions), because the
# paper's Tables 1 (MNIST) and 2 (CIFAR-10) could not be read from this machine;
# SOURCE.md says what was cross-checked against published numbers.
_SMOOTHMIX_TABLE = {
    "mnist_smoothmix_smix_1.0_3_m0_eta_1.0_num_4_noise_0.25_0.tsv":
        (0.931, (99.5, 98.9, 98.2, 96.4, 0, 0, 0, 0, 0, 0, 0)),
    "mnist_smoothmix_smix_1.0_8_m1_eta_5.0_num_4_noise_1.00_0.tsv":
        (1.823, (93.3, 90.9, 87.5, 83.0, 77.5, 70.6, 62.7, 53.4, 44.9, 37.1, 29.3)),
    "cifar10_smoothmix_cifar_resnet110_noise_0.25.tsv":
        (0.553, (77.1, 67.9, 57.9, 46.7, 0, 0, 0, 0, 0, 0, 0)),
    "cifar10_smoothmix_adv_cifar_resnet110_noise_0.50.tsv":
        (0.736, (63.5, 57.2, 50.5, 43.4, 36.7, 30.6, 24.7, 19.1, 0, 0, 0)),
}


class ReferenceLogsTest(parameterized.TestCase):

    @parameterized.named_parameters(*[(name.replace(".", "_"), name, acr) for name, acr in _REFERENCE_ACR.items()])
    def test_reproduces_authors_acr(self, name, expected_acr):
        summary = analysis.summarize(certify_log.read_certify_tsv(os.path.join(REFERENCE_DIR, name)))
        self.assertEqual(summary.n, 10000)
        self.assertEqual(round(summary.acr, 4), expected_acr)
        # Certified accuracy at radius 0 is the clean accuracy (radius >= 0 always).
        self.assertEqual(summary.certified_accuracy[0.0], summary.clean_accuracy)


class SmoothMixLogsTest(parameterized.TestCase):
    """The authors' SmoothMix logs read as they are and give the table's numbers."""

    @parameterized.named_parameters(
        *[(name.replace(".", "_"), name, acr, accuracies) for name, (acr, accuracies) in _SMOOTHMIX_TABLE.items()])
    def test_gives_the_tables_numbers(self, name, acr, accuracies):
        summary = analysis.summarize(certify_log.read_certify_tsv(os.path.join(REFERENCE_DIR, name)))
        self.assertEqual(summary.n, 10000)
        # A table entry is its value rounded to the printed digit, so it is off by at
        # most half a unit of that digit: 0.0005 for the ACR, 0.05 points for the
        # accuracies (99.45 may print as 99.4 or 99.5); 1e-9 absorbs float rounding.
        self.assertLessEqual(abs(summary.acr - acr), 0.0005 + 1e-9)
        self.assertEqual(tuple(summary.certified_accuracy), analysis.DEFAULT_RADII)
        for radius, expected in zip(analysis.DEFAULT_RADII, accuracies):
            got = 100 * summary.certified_accuracy[radius]
            self.assertLessEqual(abs(got - expected), 0.05 + 1e-9, f"r={radius}: {got} vs {expected}")
        self.assertEqual(summary.certified_accuracy[0.0], summary.clean_accuracy)


class HandLogTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.path = write(tempdir(self), "hand.tsv", HAND_TSV)

    def test_summary(self):
        summary = analysis.summarize(certify_log.read_certify_tsv(self.path), radii=(0, 0.25, 0.5, 1.0, 1.25))
        self.assertEqual(summary.n, 5)
        self.assertAlmostEqual(summary.clean_accuracy, 0.6)
        self.assertAlmostEqual(summary.acr, 0.39)
        np.testing.assert_allclose(list(summary.certified_accuracy.values()), [0.6, 0.6, 0.4, 0.2, 0.0])

    def test_default_radii_are_the_papers(self):
        summary = analysis.summarize(certify_log.read_certify_tsv(self.path))
        self.assertEqual(list(summary.certified_accuracy), [0.25 * i for i in range(11)])

    def test_json_keys(self):
        summary = analysis.summarize(certify_log.read_certify_tsv(self.path), radii=(0, 0.25, 1))
        self.assertEqual(summary.to_json_dict(), {
            "file": self.path, "n": 5, "clean_accuracy": 0.6, "acr": summary.acr,
            "certified_accuracy": {"0.0": 0.6, "0.25": 0.6, "1.0": 0.2}})

    def test_markdown_table(self):
        summary = analysis.summarize(certify_log.read_certify_tsv(self.path), radii=(0, 0.5))
        self.assertEqual(analysis.markdown_table([summary], ["hand"]),
                         "| file | n | smoothed acc. | ACR | r=0 | r=0.5 |\n"
                         "|---|---:|---:|---:|---:|---:|\n"
                         "| hand | 5 | 0.600 | 0.3900 | 0.600 | 0.400 |\n")

    def test_plot_is_a_png(self):
        out = os.path.join(tempdir(self), "curves.png")
        log = certify_log.read_certify_tsv(self.path)
        analysis.plot_certified_accuracy([log, log], out, labels=["a", "b"])
        with open(out, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        from matplotlib import image  # pylint: disable=import-outside-toplevel
        self.assertEqual(image.imread(out).ndim, 3)


class AnalyzeConfigTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempdir(self)
        self.path = write(self.dir, "hand.tsv", HAND_TSV)

    def test_glob_expansion_sorted(self):
        other = write(self.dir, "another.tsv", HAND_TSV)
        config = analysis.AnalyzeConfig(tsv=[os.path.join(self.dir, "*.tsv")])
        self.assertEqual(config.tsv, (other, self.path))

    @parameterized.named_parameters(
        ("format", dict(format="csv"), "--format"),
        ("radii_negative", dict(radii=[-1.0]), "--radii"),
        ("radii_empty", dict(radii=[]), "--radii"),
        ("plot_not_png", dict(plot="out.pdf"), "--plot"),
        ("labels_count", dict(labels=["a", "b"]), "--labels"),
        ("no_files", dict(tsv=[]), "--tsv"),
        ("missing_file", dict(tsv=["/nonexistent/x.tsv"]), "--tsv"),
        ("no_match", dict(tsv=["/nonexistent/*.tsv"]), "--tsv"),
    )
    def test_bad_config(self, override, flag):
        args = dict(tsv=[self.path])
        args.update(override)
        with self.assertRaisesRegex(ConfigError, flag):
            analysis.AnalyzeConfig(**args)

    def test_plot_never_replaces_a_file_unless_overwrite(self):
        plot = write(self.dir, "curves.png", "mine")
        with self.assertRaisesRegex(ConfigError, f"^--plot={plot} exists; pass --overwrite to replace it"):
            analysis.AnalyzeConfig(tsv=[self.path], plot=plot)
        with open(plot, encoding="utf-8") as f:
            self.assertEqual(f.read(), "mine")
        analysis.analyze(analysis.AnalyzeConfig(tsv=[self.path], plot=plot, overwrite=True))
        with open(plot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_plot_made_after_the_check_is_not_replaced(self):
        plot = os.path.join(self.dir, "late.png")
        config = analysis.AnalyzeConfig(tsv=[self.path], plot=plot)
        write(self.dir, "late.png", "another process's")
        with self.assertRaisesRegex(ConfigError, f"^--plot={plot} exists; pass --overwrite"):
            analysis.analyze(config)
        with open(plot, encoding="utf-8") as f:
            self.assertEqual(f.read(), "another process's")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(["late.png", os.path.basename(self.path)]))

    def test_plot_paths_that_cannot_be_written(self):
        dangling = os.path.join(self.dir, "dangling.png")
        os.symlink(os.path.join(self.dir, "missing", "target.png"), dangling)
        with self.assertRaisesRegex(ConfigError, f"^--plot={dangling} is a symbolic link to .*, which does not exist"):
            analysis.AnalyzeConfig(tsv=[self.path], plot=dangling)
        under_file = os.path.join(self.path, "curves.png")
        with self.assertRaisesRegex(ConfigError, f"^--plot={under_file}: {self.path} is a file, not a directory"):
            analysis.AnalyzeConfig(tsv=[self.path], plot=under_file)

    def test_a_directory_is_named_as_one(self):
        with self.assertRaisesRegex(ConfigError, f"^--tsv: {self.dir} is a directory; give the TSV files in it, e.g. "
                                    f"'{self.dir}/\\*.tsv'$"):
            analysis.AnalyzeConfig(tsv=[self.dir])
        os.mkdir(os.path.join(self.dir, "sub.tsv"))
        with self.assertRaisesRegex(ConfigError, "sub.tsv is a directory"):
            analysis.AnalyzeConfig(tsv=[os.path.join(self.dir, "*.tsv")])

    def test_analyze_json_in_order(self):
        first = write(self.dir, "z.tsv", HAND_TSV)
        report = json.loads(analysis.analyze(analysis.AnalyzeConfig(tsv=[first, self.path], format="json")))
        self.assertEqual([r["file"] for r in report], [first, self.path])


class StagedRunTest(parameterized.TestCase):
    """certify_log_test.STAGED_TSV: a fixed-radius run at radii 0.5 and 1 (numbers there)."""

    def setUp(self):
        super().setUp()
        self.dir = tempdir(self)
        self.staged = write_staged(self.dir)
        self.full = write(self.dir, "full.tsv", HAND_TSV)

    def _report(self, files, **kwargs):
        return json.loads(analysis.analyze(analysis.AnalyzeConfig(tsv=files, format="json", **kwargs)))

    def test_summary_at_its_radii_without_acr(self):
        report, = self._report([self.staged])
        self.assertEqual(report["n"], 4)
        self.assertIsNone(report["acr"])
        self.assertEqual(report["settled_radii"], [0.5, 1.0])
        self.assertEqual(report["samples_per_image"], 2800)
        self.assertEqual(report["clean_accuracy"], 0.5)
        self.assertEqual(report["certified_accuracy"], {"0.5": 0.25, "1.0": 0.25})
        # Radius 0 is settled too (a class or abstain), and equals the clean accuracy.
        self.assertEqual(self._report([self.staged], radii=(0, 1))[0]["certified_accuracy"], {"0.0": 0.5, "1.0": 0.25})

    @parameterized.parameters(0.75, 0.25, 2.5)
    def test_refuses_a_radius_the_run_did_not_settle(self, radius):
        with self.assertRaisesRegex(ConfigError, f"^--radii: .*staged.tsv is a fixed-radius run that decided only at "
                                    f"r = 0.5, 1 \\(and 0\\); its certified accuracy at r = {radius:g} would be biased "
                                    "low"):
            self._report([self.staged], radii=(0.5, radius))
        log = certify_log.read_certify_tsv(self.staged)
        with self.assertRaisesRegex(ConfigError, f"r = {radius:g} would be biased low"):
            analysis.certified_accuracy(log, [radius])

    def test_default_table_with_full_and_staged_runs(self):
        # The columns are the staged run's radii; ACR n/a for it; samples
        # per image n/a for the authors' log (no settings file).
        table = analysis.analyze(analysis.AnalyzeConfig(tsv=[self.full, self.staged], labels=["full", "staged"]))
        self.assertEqual(table, "| file | n | smoothed acc. | ACR | samples/image | r=0.5 | r=1 |\n"
                                "|---|---:|---:|---:|---:|---:|---:|\n"
                                "| full | 5 | 0.600 | 0.3900 | n/a | 0.400 | 0.200 |\n"
                                "| staged | 4 | 0.500 | n/a | 2,800 | 0.250 | 0.250 |\n"
                                "\n" + analysis.STAGED_NOTE + "\n")
        self.assertStartsWith(analysis.STAGED_NOTE, "No ACR for a fixed-radius run")
        # Only fixed-radius runs: no ACR column at all.
        table = analysis.analyze(analysis.AnalyzeConfig(tsv=[self.staged], labels=["staged"]))
        self.assertEqual(table.split("\n")[0], "| file | n | smoothed acc. | samples/image | r=0.5 | r=1 |")

    def test_staged_runs_share_their_common_radii(self):
        other = write_staged(self.dir, "other.tsv", radii=[1.0, 1.5])
        report = self._report([self.staged, other])
        self.assertEqual([list(r["certified_accuracy"]) for r in report], [["1.0"], ["1.0"]])
        apart = write_staged(self.dir, "apart.tsv", radii=[1.5])
        with self.assertRaisesRegex(ConfigError, "^the fixed-radius runs .*staged.tsv \\(r = 0.5, 1\\), .*apart.tsv "
                                    "\\(r = 1.5\\) decided at no radius in common"):
            self._report([self.staged, apart])

    def test_plot_draws_staged_runs_as_points(self):
        out = os.path.join(self.dir, "curves.png")
        analysis.analyze(analysis.AnalyzeConfig(tsv=[self.full, self.staged], plot=out))
        with open(out, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_the_log_reports_the_runs_decisions(self):
        # The rounding pitfall: radii printed to 3 digits. A staged log rounds
        # down, so analysis counts an image certified at r exactly when its
        # radius (the run's decision) is >= r, here for radii just around r.
        radii = (0.25, 0.5, 1.75)
        rng = np.random.default_rng(1)
        values = np.concatenate([[r + d for r in radii for d in (-1e-4, -4e-4, -1e-12, 0.0, 1e-12, 4e-4)],
                                 rng.uniform(0, 2.5, 200)])
        rows = "".join(certify_log.format_row("certify_staged", i, 1, 1, v, 1.0, 100) for i, v in enumerate(values))
        path = write_staged(self.dir, "pitfall.tsv", text=STAGED_TSV.split("\n")[0] + "\n" + rows,
                            radii=list(radii))
        log = certify_log.read_certify_tsv(path)
        np.testing.assert_array_equal(analysis.certified_accuracy(log, radii),
                                      (values[None, :] >= np.array(radii)[:, None]).mean(axis=1))


class ShardedRunTest(parameterized.TestCase):
    """HAND_TSV's five rows dealt round-robin to 3 shards: {0, 3}, {1, 4}, {2}."""

    def setUp(self):
        super().setUp()
        self.dir = tempdir(self)
        self.shards = [write_shard(self.dir, f"certify.shard{i}.tsv", i) for i in range(3)]
        self.whole = write(self.dir, "whole.tsv", HAND_TSV)  # No settings file: as the authors' logs.

    def _report(self, files, **kwargs):
        warnings = []
        text = analysis.analyze(analysis.AnalyzeConfig(tsv=files, format="json", **kwargs), warn=warnings.append)
        return json.loads(text), warnings

    def test_shards_are_one_run_with_the_hand_computed_numbers(self):
        # Given in any order, and next to a file of no run of ours.
        report, warnings = self._report([self.shards[2], self.whole, self.shards[0], self.shards[1]],
                                        radii=(0, 0.25, 1))
        self.assertEqual(warnings, [])
        self.assertLen(report, 2)
        merged, whole = report
        self.assertEqual(merged["file"], os.path.join(self.dir, "certify.shard{0,1,2}.tsv"))
        self.assertEqual(merged["files"], self.shards)
        self.assertTrue(merged["complete"])
        self.assertEqual(merged["n"], 5)
        self.assertAlmostEqual(merged["clean_accuracy"], 0.6)
        self.assertAlmostEqual(merged["acr"], 0.39)
        self.assertEqual(merged["certified_accuracy"], {"0.0": 0.6, "0.25": 0.6, "1.0": 0.2})
        # The settings file gives the samples per image: n of the run.
        self.assertEqual(merged["samples_per_image"], 1000)
        # The file without a settings file is reported as before: same keys, own row.
        self.assertEqual(set(whole), {"file", "n", "clean_accuracy", "acr", "certified_accuracy"})
        self.assertEqual({k: v for k, v in merged.items() if k not in ("file", "files", "complete",
                                                                       "samples_per_image")},
                         {k: v for k, v in whole.items() if k != "file"})

    def test_markdown_and_labels_count_runs(self):
        table = analysis.analyze(analysis.AnalyzeConfig(tsv=self.shards + [self.whole], labels=["sharded", "whole"],
                                                        radii=(0, 0.5)))
        self.assertIn("| sharded | 5 | 0.600 | 0.3900 | 0.600 | 0.400 |", table)
        self.assertIn("| whole | 5 | 0.600 | 0.3900 | 0.600 | 0.400 |", table)
        with self.assertRaisesRegex(ConfigError, "--labels: got 4 labels for 2 runs"):
            analysis.AnalyzeConfig(tsv=self.shards + [self.whole], labels=["a", "b", "c", "d"])

    def test_two_sharded_runs_of_other_settings_are_two_rows(self):
        other = [write_shard(self.dir, f"sigma050.shard{i}.tsv", i, sigma=0.5) for i in range(3)]
        report, _ = self._report(self.shards + other)
        self.assertEqual([r["files"] for r in report], [self.shards, other])

    def test_unsharded_runs_are_single_runs(self):
        single = write_shard(self.dir, "single.tsv", 0, num_shards=1, rows=hand_rows())
        report, _ = self._report([single, self.whole, single])
        self.assertEqual([r["file"] for r in report], [single, self.whole, single])
        self.assertTrue(all("files" not in r for r in report))

    def test_overlapping_shards_are_refused(self):
        copy = os.path.join(self.dir, "copy_of_shard1.tsv")
        shutil.copy(self.shards[1], copy)
        shutil.copy(self.shards[1] + certify_log.SETTINGS_SUFFIX, copy + certify_log.SETTINGS_SUFFIX)
        with self.assertRaisesRegex(ConfigError, f"^{self.shards[1]} and {copy} are both shard 1 of 3 of one run: "
                                    "they overlap, the same examples twice; give each shard once$"):
            analysis.AnalyzeConfig(tsv=self.shards + [copy])
        with self.assertRaisesRegex(ConfigError, f"^{self.shards[0]} is given twice \\(shard 0 of 3\\)"):
            analysis.AnalyzeConfig(tsv=self.shards + [self.shards[0]])

    @parameterized.named_parameters(
        ("sigma", dict(sigma=0.5), "sigma: 0.25 vs 0.5"),
        ("n", dict(n=100), "n: 1000 vs 100"),
        ("n0", dict(n0=10), "n0: 100 vs 10"),
        ("alpha", dict(alpha=0.01), "alpha"),
        ("seed", dict(seed=1), "seed"),
        ("batch_size", dict(batch_size=500), "batch_size"),
        ("strategy", dict(strategy="mirrored", replicas=2), "replicas: 1 vs 2, strategy: 'default' vs 'mirrored'"),
    )
    def test_shards_of_other_settings_are_refused(self, settings, difference):
        odd = write_shard(self.dir, "odd.shard2.tsv", 2, **settings)
        with self.assertRaisesRegex(ConfigError, f"^{self.shards[0]} \\(shard 0 of 3\\) and {odd} \\(shard 2 of 3\\) "
                                    f"come from runs with different settings \\({difference}"):
            analysis.AnalyzeConfig(tsv=self.shards[:2] + [odd])

    def test_shards_with_one_model_digest_at_other_paths_are_one_run(self):
        digest = "ab" * 32
        shards = [write_shard(self.dir, f"moved.shard{i}.tsv", i, model=f"/host{i}/base_model.keras",
                              model_sha256=digest) for i in range(3)]
        report, _ = self._report(shards)
        self.assertLen(report, 1)
        self.assertEqual(report[0]["n"], 5)

    def test_shards_of_other_model_digests_at_one_path_are_refused(self):
        shards = [write_shard(self.dir, f"retrained.shard{i}.tsv", i, model_sha256=("ab" if i else "cd") * 32)
                  for i in range(3)]
        with self.assertRaisesRegex(ConfigError, "different settings \\(model_sha256: 'cdcd"):
            analysis.AnalyzeConfig(tsv=shards)

    def test_missing_shard_is_refused_unless_allowed(self):
        with self.assertRaisesRegex(ConfigError, r"certify.shard\{0,1\}.tsv: incomplete sharded run: shard 2 of 3 "
                                    r"is missing; .* --allow_incomplete to report the 4 examples there are$"):
            self._report(self.shards[:2])
        report, warnings = self._report(self.shards[:2], allow_incomplete=True)
        self.assertEqual((report[0]["n"], report[0]["complete"]), (4, False))
        # Rows 0, 1, 3, 4: correct with radii 0.5, 1.2, 0.25 -> ACR 1.95 / 4.
        self.assertAlmostEqual(report[0]["acr"], 1.95 / 4)
        self.assertLen(warnings, 1)
        self.assertIn("shard 2 of 3 is missing); reporting its 4 examples", warnings[0])
        table = analysis.analyze(analysis.AnalyzeConfig(tsv=self.shards[:2], allow_incomplete=True),
                                 warn=lambda _: None)
        self.assertIn("certify.shard{0,1}.tsv (incomplete) | 4 |", table)

    def test_unfinished_shard_is_refused_unless_allowed(self):
        # Shard 0 was cut after its first row (example 0) while shard 1 reached example 4.
        write_shard(self.dir, "certify.shard0.tsv", 0, rows=hand_rows()[:1])
        with self.assertRaisesRegex(ConfigError, f"incomplete sharded run: {self.shards[0]} is unfinished \\(1 of its "
                                    "2 rows up to example 4, where other shards are\\);"):
            self._report(self.shards)
        report, warnings = self._report(self.shards, allow_incomplete=True)
        self.assertEqual(report[0]["n"], 4)
        self.assertLen(warnings, 1)

    def test_all_shards_stopped_together_is_complete(self):
        # Examples 0-3 only (as with --max=4): shard 0 {0, 3}, shard 1 {1}, shard 2 {2}.
        write_shard(self.dir, "certify.shard1.tsv", 1, rows=hand_rows()[1:2])
        report, warnings = self._report(self.shards)
        self.assertEqual((report[0]["n"], report[0]["complete"], warnings), (4, True, []))

    def test_row_of_another_shard_is_refused(self):
        rows = hand_rows()
        path = write_shard(self.dir, "certify.shard1.tsv", 1, rows=[rows[1], rows[2]])
        with self.assertRaisesRegex(ConfigError, f"{path}:3: example 2 where shard 1 of 3 \\(skip 1\\) has example 4"):
            self._report(self.shards)

    def test_skip(self):
        rows = [row.split("\t", 1)[1] for row in hand_rows()]
        shards = [write_shard(self.dir, f"skip.shard{i}.tsv", i, num_shards=2, skip=10,
                              rows=[f"{10 * j}\t{rows[j]}" for j in range(i, 5, 2)]) for i in range(2)]
        report, _ = self._report(shards)
        self.assertEqual(report[0]["n"], 5)
        self.assertAlmostEqual(report[0]["acr"], 0.39)



class BaseAccuracyTest(absltest.TestCase):
    """--model: the base model's clean accuracy beside the smoothed classifier's, labelled apart (issue 24)."""

    IDX = (0, 2, 5, 9)

    def setUp(self):
        # Imported here: the rest of this file needs no TensorFlow.
        import keras  # pylint: disable=import-outside-toplevel
        from tf_consreg import data  # pylint: disable=import-outside-toplevel
        self.dir = tempdir(self)
        _, labels = data.load_arrays("fashion_mnist", "test", limit=10)
        self.labels = labels[list(self.IDX)]
        # A base model that says class labels[0] for every image: its clean accuracy is the share of that label.
        self.constant_class = int(self.labels[0])
        inputs = keras.Input((28, 28, 1))
        dense = keras.layers.Dense(10, kernel_initializer="zeros",
                                   bias_initializer=keras.initializers.Constant(np.eye(10)[self.constant_class]))
        self.model = os.path.join(self.dir, "constant.keras")
        keras.Model(inputs, dense(keras.layers.Flatten()(inputs))).save(self.model)
        # The smoothed classifier: right on the first two, abstains on the third, wrong on the last.
        rows = [(i, int(y), p, r) for (i, y), p, r in zip(zip(self.IDX, self.labels),
                                                         (int(self.labels[0]), int(self.labels[1]), -1,
                                                          (int(self.labels[3]) + 1) % 10), (0.5, 0.25, 0.0, 0.75))]
        text = certify_log.header_line("certify") + "\n" + "".join(
            certify_log.format_row("certify", i, y, p, r, 1.0) for i, y, p, r in rows)
        self.tsv = write(self.dir, "run.tsv", text)
        write(self.dir, "run.tsv" + certify_log.SETTINGS_SUFFIX,
              json.dumps(dict(SHARD_SETTINGS, num_shards=1, shard_index=0)))
        self.expected = float(np.mean(self.labels == self.constant_class))

    def test_table_labels_both_accuracies(self):
        authors = write(self.dir, "authors.tsv", HAND_TSV)  # No settings: no dataset to read, "n/a".
        table = analysis.analyze(analysis.AnalyzeConfig(tsv=[self.tsv, authors], radii=[0], model=self.model))
        lines = table.split("\n")
        self.assertEqual(lines[0], "| file | n | smoothed acc. | base acc. (clean) | ACR | r=0 |")
        self.assertEqual(lines[2].split(" | ")[1:4], ["4", "0.500", f"{self.expected:.3f}"])
        self.assertEqual(lines[3].split(" | ")[3], "n/a")
        self.assertIn(analysis.ACCURACY_NOTE, table)
        self.assertNotIn("base acc.", analysis.analyze(analysis.AnalyzeConfig(tsv=[self.tsv], radii=[0])))

    def test_json(self):
        report = json.loads(analysis.analyze(analysis.AnalyzeConfig(tsv=[self.tsv], format="json",
                                                                    model=self.model)))
        self.assertEqual(report[0]["clean_accuracy"], 0.5)
        self.assertEqual(report[0]["base_clean_accuracy"], self.expected)

    def test_refuses_a_log_of_other_labels(self):
        text = certify_log.header_line("certify") + "\n" + certify_log.format_row(
            "certify", 0, (int(self.labels[0]) + 1) % 10, -1, 0.0, 1.0)
        other = write(self.dir, "other.tsv", text)
        write(self.dir, "other.tsv" + certify_log.SETTINGS_SUFFIX,
              json.dumps(dict(SHARD_SETTINGS, num_shards=1, shard_index=0)))
        with self.assertRaisesRegex(ConfigError, "other.tsv: example 0 of fashion_mnist \\(test\\) is not labelled"):
            analysis.analyze(analysis.AnalyzeConfig(tsv=[other], model=self.model))

    def test_bad_flags(self):
        with self.assertRaisesRegex(ConfigError, "--model"):
            analysis.AnalyzeConfig(tsv=[self.tsv], model=os.path.join(self.dir, "missing.keras"))
        with self.assertRaisesRegex(ConfigError, "^--data_dir is used only with --model"):
            analysis.AnalyzeConfig(tsv=[self.tsv], data_dir=self.dir)


if __name__ == "__main__":
    absltest.main()
