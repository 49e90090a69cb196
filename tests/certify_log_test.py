"""Tests for tf_consreg.certify_log: the log's rows and header, its settings file, and reading logs and shards.

The fixtures here (a hand-computed log and the shards of its run) are also
used by analysis_test.py.
"""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from tf_consreg import certify_log
from tf_consreg.errors import ConfigError

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"

# Five rows. Correct: rows 0, 1, 4 (radii 0.5, 1.2, 0.25); row 2 abstains;
# row 3 is wrong with radius 0.9, which must not count.
#   n = 5, clean accuracy = 3/5 = 0.6
#   ACR = (0.5 + 1.2 + 0.25) / 5 = 1.95 / 5 = 0.39
#   certified accuracy (correct and radius >= r):
#     r = 0: 3/5; r = 0.25: rows 0, 1, 4 -> 3/5 (>= keeps row 4);
#     r = 0.5: rows 0, 1 -> 2/5; r = 1: row 1 -> 1/5; r = 1.25: none -> 0.
HAND_TSV = HEADER + (
    "0\t3\t3\t0.5\t1\t0:00:01.000000\n"
    "1\t2\t2\t1.2\t1\t0:00:01.000000\n"
    "2\t1\t-1\t0.0\t0\t0:00:01.000000\n"
    "3\t0\t7\t0.9\t0\t0:00:01.000000\n"
    "4\t5\t5\t0.25\t1\t0:00:01.000000\n")

# The settings bin/certify.py writes beside a shard (certify_run.CertifyConfig.settings).
SHARD_SETTINGS = {"mode": "certify", "model": "/runs/a/base_model.keras", "model_sha256": "ab" * 32,
                  "dataset": "fashion_mnist", "split": "test", "sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001,
                  "seed": 0, "skip": 1, "batch_size": 1000, "strategy": "default", "replicas": 1,
                  "compute_dtype": "float32"}


def tempdir(test):
    directory = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def write(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def hand_rows():
    return HAND_TSV.split("\n")[1:-1]


def write_shard(directory, name, shard_index, num_shards=3, rows=None, **settings):
    """A shard of HAND_TSV's run: its rows j = shard_index, shard_index + K, ... and a settings file."""
    rows = hand_rows()[shard_index::num_shards] if rows is None else rows
    path = write(directory, name, HEADER + "".join(row + "\n" for row in rows))
    values = dict(SHARD_SETTINGS, num_shards=num_shards, shard_index=shard_index)
    values.update(settings)
    write(directory, name + certify_log.SETTINGS_SUFFIX, json.dumps(values))
    return path


class RowsTest(parameterized.TestCase):

    def test_headers_are_the_authors(self):
        self.assertEqual(certify_log.header_line("certify") + "\n", HEADER)
        self.assertEqual(certify_log.header_line("predict"), "idx\tlabel\tpredict\tcorrect\ttime")

    @parameterized.named_parameters(
        # The authors print radii with "{:.3}", 3 significant digits, and the
        # time as str(datetime.timedelta): 1.5 s is 0:00:01.500000.
        ("certified", "certify", (7, 3, 3, 0.123456, 1.5), "7\t3\t3\t0.123\t1\t0:00:01.500000\n"),
        ("abstain", "certify", (8, 3, -1, 0.0, 61.0), "8\t3\t-1\t0.0\t0\t0:01:01\n"),
        ("wrong", "certify", (9, 3, 2, 1.23456, 0.25), "9\t3\t2\t1.23\t0\t0:00:00.250000\n"),
        ("predict", "predict", (7, 3, 3, 0.0, 1.5), "7\t3\t3\t1\t0:00:01.500000\n"),
    )
    def test_format_row(self, mode, args, row):
        self.assertEqual(certify_log.format_row(mode, *args), row)

    def test_a_written_certify_row_reads_back(self):
        directory = tempdir(self)
        path = os.path.join(directory, "log.tsv")
        certify_log.write_header(path, "certify")
        with open(path, "a", encoding="utf-8") as f:
            f.write(certify_log.format_row("certify", 4, 5, 5, 0.25, 1.0))
        log = certify_log.read_certify_tsv(path)
        self.assertEqual((log.idx.tolist(), log.predict.tolist(), log.radius.tolist(), log.correct.tolist()),
                         ([4], [5], [0.25], [True]))

    def test_header_never_replaces_a_file(self):
        path = write(tempdir(self), "log.tsv", "mine\n")
        with self.assertRaises(FileExistsError):
            certify_log.write_header(path, "certify")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "mine\n")


# A staged (fixed-radius) run's log and settings: radii 0.5 and 1, stages
# 100, 1000, 10000. Rows: correct, certified at both radii, stopped at 100;
# correct, radius 0.499 (not certified at 0.5), 1000 samples; abstained after
# 10000; wrong with radius 1.2 (counts nowhere), 100 samples.
#   certified accuracy: r = 0.5: 1/4; r = 1: 1/4; clean accuracy 2/4;
#   samples per image (100 + 1000 + 10000 + 100) / 4 = 2800.
STAGED_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\n"
STAGED_TSV = STAGED_HEADER + (
    "0\t3\t3\t1.71\t1\t0:00:01\t100\n"
    "1\t2\t2\t0.499\t1\t0:00:01\t1000\n"
    "2\t1\t-1\t0.0\t0\t0:00:01\t10000\n"
    "3\t0\t7\t1.2\t0\t0:00:01\t100\n")
STAGED_SETTINGS = dict(SHARD_SETTINGS, mode="certify_staged", n=10000, radii=[0.5, 1.0], stages=[100, 1000, 10000],
                       num_shards=1, shard_index=0)


def write_staged(directory, name="staged.tsv", text=STAGED_TSV, **settings):
    path = write(directory, name, text)
    write(directory, name + certify_log.SETTINGS_SUFFIX, json.dumps(dict(STAGED_SETTINGS, **settings)))
    return path


class StagedRowsTest(parameterized.TestCase):

    def test_headers_add_samples_last(self):
        self.assertEqual(certify_log.header_line("certify_staged") + "\n", STAGED_HEADER)
        self.assertEqual(certify_log.header_line("predict_staged"), "idx\tlabel\tpredict\tcorrect\ttime\tsamples")
        self.assertEqual(certify_log.staged_mode("certify"), "certify_staged")

    @parameterized.named_parameters(
        # A full CERTIFY log rounds to nearest, as the authors; a staged one
        # rounds down: 0.4996 is not certified at 0.5, and must not print 0.5.
        ("full_rounds_to_nearest", "certify", (7, 3, 3, 0.4996, 1.5), "7\t3\t3\t0.5\t1\t0:00:01.500000\n"),
        ("staged_rounds_down", "certify_staged", (7, 3, 3, 0.4996, 1.5, 300),
         "7\t3\t3\t0.499\t1\t0:00:01.500000\t300\n"),
        ("staged_exact", "certify_staged", (7, 3, 3, 0.5, 1.5, 100), "7\t3\t3\t0.5\t1\t0:00:01.500000\t100\n"),
        ("staged_large", "certify_staged", (7, 3, 3, 12.3456, 1.5, 100), "7\t3\t3\t12.3\t1\t0:00:01.500000\t100\n"),
        ("staged_abstain", "certify_staged", (8, 3, -1, 0.0, 1.0, 100000), "8\t3\t-1\t0.0\t0\t0:00:01\t100000\n"),
        ("predict_staged", "predict_staged", (7, 3, 3, 0.0, 1.5, 300), "7\t3\t3\t1\t0:00:01.500000\t300\n"),
    )
    def test_format_row(self, mode, args, row):
        self.assertEqual(certify_log.format_row(mode, *args), row)

    def test_samples_belong_to_staged_rows_only(self):
        with self.assertRaisesRegex(ValueError, "needs samples"):
            certify_log.format_row("certify_staged", 1, 1, 1, 0.5, 1.0)
        with self.assertRaisesRegex(ValueError, "has no samples"):
            certify_log.format_row("certify", 1, 1, 1, 0.5, 1.0, 100)

    def test_printed_radius_decides_as_the_run_did(self):
        # For every radius r of at most 3 significant digits, "printed >= r"
        # is "radius >= r": the run's decision. Radii at, just below and just
        # above such values (where rounding to nearest goes wrong), and random ones.
        rng = np.random.default_rng(0)
        grid = [float(f"{v:.3}") for v in np.concatenate([rng.uniform(0.001, 4.0, 300), [0.5, 0.25, 1.75, 0.1]])]
        radii = grid + [np.nextafter(r, 0.0) for r in grid] + [np.nextafter(r, 9.0) for r in grid]
        radii += list(rng.uniform(0.0, 4.0, 3000)) + [r - 4e-4 for r in grid] + [0.0]
        for radius in radii:
            printed = float(certify_log.format_radius(radius, round_down=True))
            self.assertLessEqual(printed, radius)
            self.assertEqual(printed, float(f"{printed:.3}"))  # 3 significant digits
            for r in (0.5, 0.25, 1.75, 0.1, float(f"{radius:.3}")):
                if r > 0:
                    self.assertEqual(printed >= r, radius >= r, (radius, r, printed))


class StagedLogTest(absltest.TestCase):

    def test_read(self):
        log = certify_log.read_certify_tsv(write_staged(tempdir(self)))
        self.assertTrue(log.staged)
        self.assertEqual(log.radii, (0.5, 1.0))
        np.testing.assert_array_equal(log.samples, [100, 1000, 10000, 100])
        np.testing.assert_array_equal(log.radius, [1.71, 0.499, 0.0, 1.2])

    def test_full_log_takes_n_from_its_settings(self):
        directory = tempdir(self)
        log = certify_log.read_certify_tsv(write(directory, "authors.tsv", HAND_TSV))
        self.assertFalse(log.staged)
        self.assertIsNone(log.samples)
        ours = write_shard(directory, "ours.tsv", 0, num_shards=1, rows=hand_rows())
        np.testing.assert_array_equal(certify_log.read_certify_tsv(ours).samples, [1000] * 5)

    def test_refused_without_or_against_its_settings(self):
        directory = tempdir(self)
        alone = write(directory, "alone.tsv", STAGED_TSV)
        with self.assertRaisesRegex(ConfigError, "alone.tsv is a fixed-radius run's log .* without its settings file"):
            certify_log.read_certify_tsv(alone)
        other = write_staged(directory, "other.tsv", mode="certify")
        with self.assertRaisesRegex(ConfigError, "other.tsv:1: the columns are a certify_staged log's, but .* says "
                                    "mode 'certify'"):
            certify_log.read_certify_tsv(other)
        full = write_shard(directory, "full.tsv", 0, num_shards=1, rows=hand_rows(), mode="certify_staged")
        with self.assertRaisesRegex(ConfigError, "full.tsv:1: the columns are a certify log's"):
            certify_log.read_certify_tsv(full)
        for radii in (None, [], ["a"], [0.0], 0.5):
            path = write_staged(directory, "radii.tsv", radii=radii)
            with self.assertRaisesRegex(ConfigError, "radii.tsv.json: a fixed-radius run's settings without a valid "
                                        "list of radii"):
                certify_log.read_certify_tsv(path)

    def test_bad_samples(self):
        directory = tempdir(self)
        for samples, message in (("0", ":2: samples must be >= 1"), ("x", ":2: malformed row")):
            path = write_staged(directory, text=STAGED_HEADER + f"0\t3\t3\t1.71\t1\t0:00:01\t{samples}\n")
            with self.assertRaisesRegex(ConfigError, "staged.tsv" + message):
                certify_log.read_certify_tsv(path)
        path = write_staged(directory, text=STAGED_HEADER + "0\t3\t3\t1.71\t1\t0:00:01\n")
        with self.assertRaisesRegex(ConfigError, "staged.tsv:2: expected 7 tab-separated fields, got 6"):
            certify_log.read_certify_tsv(path)


class SettingsTest(absltest.TestCase):

    def test_written_settings_read_back_and_are_never_replaced(self):
        path = os.path.join(tempdir(self), "log.tsv")
        self.assertIsNone(certify_log.read_settings(path))
        certify_log.write_settings(path, SHARD_SETTINGS)
        self.assertEqual(certify_log.settings_path(path), path + ".json")
        self.assertEqual(certify_log.read_settings(path), SHARD_SETTINGS)
        with self.assertRaises(FileExistsError):
            certify_log.write_settings(path, dict(SHARD_SETTINGS, n=1))
        self.assertEqual(certify_log.read_settings(path), SHARD_SETTINGS)

    def test_unreadable_settings(self):
        directory = tempdir(self)
        path = write(directory, "a.tsv", HAND_TSV)
        write(directory, "a.tsv.json", "{")
        with self.assertRaisesRegex(ConfigError, r"^.*a.tsv.json is unreadable: .*\(the settings file of .*a.tsv\)$"):
            certify_log.read_settings(path)
        write(directory, "a.tsv.json", "[1]")
        with self.assertRaisesRegex(ConfigError, r"a.tsv.json holds no JSON object \(the settings file of .*a.tsv\)$"):
            certify_log.read_settings(path)

    def test_the_model_is_compared_by_digest_not_path(self):
        here = dict(SHARD_SETTINGS, model="/host0/base_model.keras")
        there = dict(SHARD_SETTINGS, model="/host1/base_model.keras")
        self.assertEqual(certify_log.comparable_settings(here), certify_log.comparable_settings(there))
        self.assertEqual(certify_log.settings_differences(here, there), "")
        retrained = dict(here, model_sha256="cd" * 32)
        self.assertEqual(certify_log.settings_differences(here, retrained),
                         f"model_sha256: {'ab' * 32!r} vs {'cd' * 32!r}")

    def test_differences_message(self):
        a, b = dict(SHARD_SETTINGS), dict(SHARD_SETTINGS, sigma=0.5, n=10)
        del b["seed"]
        self.assertEqual(certify_log.settings_differences(a, b), "n: 1000 vs 10, seed: 0 vs None, sigma: 0.25 vs 0.5")
        self.assertEqual(certify_log.settings_differences(a, b, labels=("there", "now")),
                         "n: 1000 there, 10 now; seed: 0 there, None now; sigma: 0.25 there, 0.5 now")


class BadLogTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("empty", "", ":1: empty"),
        ("other_header", "a\tb\n1\t2\n", ":1: header"),
        ("predict_log", "idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n", ":1: .*predict.py"),
        ("no_rows", HEADER, ": no rows"),
        ("few_fields", HEADER + "0\t1\t1\t0.5\t1\t0:00:01\n1\t1\t1\n", ":3: expected 6"),
        ("torn_last_line", HEADER + "0\t1\t1\t0.5\t1\t0:00:01\n1\t1\t1\t0.", ":3: expected 6"),
        ("not_a_number", HEADER + "0\t1\t1\tabc\t1\t0:00:01\n", ":2: malformed"),
        ("negative_radius", HEADER + "0\t1\t1\t-0.5\t1\t0:00:01\n", ":2: radius"),
        ("nan_radius", HEADER + "0\t1\t1\tnan\t1\t0:00:01\n", ":2: radius"),
        ("inconsistent", HEADER + "0\t1\t2\t0.5\t1\t0:00:01\n", ":2: correct=1 contradicts"),
        # Impossible logs (issue 16, item 7).
        ("abstention_with_radius", HEADER + "0\t1\t1\t0.5\t1\t0:00:01\n1\t1\t-1\t0.25\t0\t0:00:01\n",
         ":3: an abstention \\(predict = -1\\) with radius 0.25"),
        ("duplicated_idx", HEADER + "4\t1\t1\t0.5\t1\t0:00:01\n5\t1\t1\t0.5\t1\t0:00:01\n"
         "4\t1\t1\t0.5\t1\t0:00:01\n", ":4: example 4 again \\(first at .*bad.tsv:2\\)"),
    )
    def test_names_file_and_line(self, text, message):
        path = write(tempdir(self), "bad.tsv", text)
        with self.assertRaisesRegex(ConfigError, "bad.tsv" + message):
            certify_log.read_certify_tsv(path)

    def test_unreadable(self):
        directory = tempdir(self)
        with self.assertRaisesRegex(ConfigError, "missing.tsv: cannot read"):
            certify_log.read_certify_tsv(os.path.join(directory, "missing.tsv"))
        path = os.path.join(directory, "binary.tsv")
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00garbage")
        with self.assertRaisesRegex(ConfigError, "binary.tsv: cannot read"):
            certify_log.read_certify_tsv(path)


class ShardsTest(parameterized.TestCase):
    """HAND_TSV's five rows dealt round-robin to 3 shards: {0, 3}, {1, 4}, {2}."""

    def setUp(self):
        super().setUp()
        self.dir = tempdir(self)
        self.shards = [write_shard(self.dir, f"certify.shard{i}.tsv", i) for i in range(3)]

    def test_merged_log_in_index_order(self):
        run, = certify_log.group_runs(self.shards)
        log, complete = certify_log.read_run(run)
        self.assertTrue(complete)
        np.testing.assert_array_equal(log.idx, [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(log.predict, [3, 2, -1, 7, 5])

    def test_unsharded_runs_and_logs_without_settings_are_single_runs(self):
        single = write_shard(self.dir, "single.tsv", 0, num_shards=1, rows=hand_rows())
        authors = write(self.dir, "authors.tsv", HAND_TSV)
        self.assertEqual(certify_log.group_runs([single, authors, single]),
                         [certify_log.Run(files=(single,)), certify_log.Run(files=(authors,)),
                          certify_log.Run(files=(single,))])

    @parameterized.named_parameters(
        ("not_json", "{", " is unreadable: "),
        ("not_an_object", "[1]", " holds no JSON object "),
        ("index_out_of_range", '{"num_shards": 3, "shard_index": 3}', "are not a shard of a run"),
        ("no_num_shards", '{"mode": "certify", "n": 1000}', "num_shards=None, .* are not a shard of a run"),
    )
    def test_bad_settings_file(self, text, message):
        write(self.dir, "certify.shard0.tsv" + certify_log.SETTINGS_SUFFIX, text)
        with self.assertRaisesRegex(ConfigError, "certify.shard0.tsv.json.*" + message + ".*; fix or remove it$"):
            certify_log.group_runs(self.shards)

    def test_an_example_in_two_shards_is_refused(self):
        # Shard 1 of 3 holds examples 1, 4; a copy of example 0 (shard 0's) there is refused by its line.
        rows = hand_rows()
        path = write_shard(self.dir, "certify.shard1.tsv", 1, rows=[rows[1], rows[0]])
        run, = certify_log.group_runs(self.shards)
        with self.assertRaisesRegex(ConfigError, f"^{path}:3: example 0 where shard 1 of 3"):
            certify_log.read_run(run)

    def test_staged_and_full_shards_are_not_one_run(self):
        rows = STAGED_TSV.split("\n")[1:-1]
        staged = write(self.dir, "certify.shard1.tsv", STAGED_HEADER + rows[1] + "\n")
        write(self.dir, "certify.shard1.tsv" + certify_log.SETTINGS_SUFFIX,
              json.dumps(dict(STAGED_SETTINGS, n=1000, num_shards=3, shard_index=1)))
        with self.assertRaisesRegex(ConfigError, "come from runs with different settings \\(mode: 'certify' vs "
                                    "'certify_staged', radii: None vs \\[0.5, 1.0\\]"):
            certify_log.group_runs(self.shards)

    def test_grid_and_float_shards_are_not_one_run(self):
        # A float run records no noise (its logs from before the grid sampler stay comparable): it reads as "float".
        write_shard(self.dir, "certify.shard1.tsv", 1, noise="grid")
        with self.assertRaisesRegex(ConfigError, "come from runs with different settings \\(noise: 'float' vs "
                                    "'grid'\\)"):
            certify_log.group_runs(self.shards)

    def test_a_missing_noise_is_float(self):
        grid, float_ = dict(SHARD_SETTINGS, noise="grid"), dict(SHARD_SETTINGS, noise="float")
        self.assertEqual(certify_log.settings_differences(SHARD_SETTINGS, float_), "")
        self.assertEqual(certify_log.settings_differences(SHARD_SETTINGS, grid, labels=("there", "now")),
                         "noise: 'float' there, 'grid' now")

    @parameterized.parameters(
        (["a/c.shard0.tsv", "a/c.shard1.tsv"], "a/c.shard{0,1}.tsv"),
        (["s1.tsv", "s10.tsv", "s11.tsv"], "s{1,10,11}.tsv"),
        (["x/a.tsv", "y/a.tsv"], "{x,y}/a.tsv"),
    )
    def test_run_name(self, files, name):
        self.assertEqual(certify_log.Run(files=tuple(files), num_shards=len(files),
                                         shard_indices=tuple(range(len(files)))).name, name)


if __name__ == "__main__":
    absltest.main()
