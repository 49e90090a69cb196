"""Tests for tf_consreg.analysis: the authors' published ACRs, a hand-computed log, errors, plots."""

import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from tf_consreg import analysis
from tf_consreg.errors import ConfigError

REFERENCE_DIR = os.environ.get(
    "TF_CONSREG_REFERENCE_CERTIFY",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference-certify"))

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


def _tempdir(test):
    directory = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _write(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class ReferenceLogsTest(parameterized.TestCase):

    @parameterized.named_parameters(*[(name.replace(".", "_"), name, acr) for name, acr in _REFERENCE_ACR.items()])
    def test_reproduces_authors_acr(self, name, expected_acr):
        summary = analysis.summarize(analysis.read_certify_tsv(os.path.join(REFERENCE_DIR, name)))
        self.assertEqual(summary.n, 10000)
        self.assertEqual(round(summary.acr, 4), expected_acr)
        # Certified accuracy at radius 0 is the clean accuracy (radius >= 0 always).
        self.assertEqual(summary.certified_accuracy[0.0], summary.clean_accuracy)


class HandLogTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.path = _write(_tempdir(self), "hand.tsv", HAND_TSV)

    def test_summary(self):
        summary = analysis.summarize(analysis.read_certify_tsv(self.path), radii=(0, 0.25, 0.5, 1.0, 1.25))
        self.assertEqual(summary.n, 5)
        self.assertAlmostEqual(summary.clean_accuracy, 0.6)
        self.assertAlmostEqual(summary.acr, 0.39)
        np.testing.assert_allclose(list(summary.certified_accuracy.values()), [0.6, 0.6, 0.4, 0.2, 0.0])

    def test_default_radii_are_the_papers(self):
        summary = analysis.summarize(analysis.read_certify_tsv(self.path))
        self.assertEqual(list(summary.certified_accuracy), [0.25 * i for i in range(11)])

    def test_json_keys(self):
        summary = analysis.summarize(analysis.read_certify_tsv(self.path), radii=(0, 0.25, 1))
        self.assertEqual(summary.to_json_dict(), {
            "file": self.path, "n": 5, "clean_accuracy": 0.6, "acr": summary.acr,
            "certified_accuracy": {"0.0": 0.6, "0.25": 0.6, "1.0": 0.2}})

    def test_markdown_table(self):
        summary = analysis.summarize(analysis.read_certify_tsv(self.path), radii=(0, 0.5))
        self.assertEqual(analysis.markdown_table([summary], ["hand"]),
                         "| file | n | clean acc. | ACR | r=0 | r=0.5 |\n"
                         "|---|---:|---:|---:|---:|---:|\n"
                         "| hand | 5 | 0.600 | 0.3900 | 0.600 | 0.400 |\n")

    def test_plot_is_a_png(self):
        out = os.path.join(_tempdir(self), "curves.png")
        log = analysis.read_certify_tsv(self.path)
        analysis.plot_certified_accuracy([log, log], out, labels=["a", "b"])
        with open(out, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        from matplotlib import image  # pylint: disable=import-outside-toplevel
        self.assertEqual(image.imread(out).ndim, 3)


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
    )
    def test_names_file_and_line(self, text, message):
        path = _write(_tempdir(self), "bad.tsv", text)
        with self.assertRaisesRegex(ConfigError, "bad.tsv" + message):
            analysis.read_certify_tsv(path)

    def test_unreadable(self):
        directory = _tempdir(self)
        with self.assertRaisesRegex(ConfigError, "missing.tsv: cannot read"):
            analysis.read_certify_tsv(os.path.join(directory, "missing.tsv"))
        path = os.path.join(directory, "binary.tsv")
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00garbage")
        with self.assertRaisesRegex(ConfigError, "binary.tsv: cannot read"):
            analysis.read_certify_tsv(path)


class AnalyzeConfigTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = _tempdir(self)
        self.path = _write(self.dir, "hand.tsv", HAND_TSV)

    def test_glob_expansion_sorted(self):
        other = _write(self.dir, "another.tsv", HAND_TSV)
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

    def test_analyze_json_in_order(self):
        import json  # pylint: disable=import-outside-toplevel
        first = _write(self.dir, "z.tsv", HAND_TSV)
        report = json.loads(analysis.analyze(analysis.AnalyzeConfig(tsv=[first, self.path], format="json")))
        self.assertEqual([r["file"] for r in report], [first, self.path])


if __name__ == "__main__":
    absltest.main()
