"""bin/query.py: one request to an export through TensorFlow's SavedModel loader."""

import contextlib
import io
import tempfile
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf
from absl import flags

import binaries  # tests/binaries.py
from export_test import export_flat  # tests/ is on sys.path under pytest
from absl.testing import flagsaver
from absl.testing import parameterized

from tf_consreg import models
from tf_consreg.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
query_bin = None  # bin/query.py, loaded by setUpModule.


def setUpModule():
    global query_bin
    query_bin = binaries.load("query")


def tearDownModule():
    binaries.unload(query_bin)


class QueryBinaryTest(tf.test.TestCase, parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="query_test_")
        cls.base_path = os.path.join(cls.tmp, "served")
        base = models.get_architecture("lenet", "fashion_mnist")
        # A TF Serving layout with two versions: the newest must answer.
        export_flat(base, os.path.join(cls.base_path, "1"), sigma=0.25, num_classes=10, n0=10, n=50,
                    alpha=0.01, batch_size=100)
        export_flat(base, os.path.join(cls.base_path, "7"), sigma=0.25, num_classes=10, n0=10, n=60,
                    alpha=0.01, batch_size=100)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_prints_class_and_radius_per_image(self):
        out = io.StringIO()
        with flagsaver.flagsaver(export_dir=self.base_path, indices=["0", "5"]), contextlib.redirect_stdout(out):
            query_bin.main(["query"])
        lines = out.getvalue().strip().splitlines()
        self.assertIn(os.path.join(self.base_path, "7"), lines[0])
        self.assertEqual(lines[1], "idx\tlabel\tclass\tradius\tp_lower")
        rows = [line.split("\t") for line in lines[2:]]
        self.assertEqual([r[0] for r in rows], ["0", "5"])
        self.assertEqual([r[1] for r in rows], ["9", "1"])  # Fashion-MNIST test labels 0 and 5.
        for _, _, cls, radius, p_lower in rows:
            self.assertIn(int(cls), range(-1, 10))
            self.assertGreaterEqual(float(radius), 0.0)
            self.assertTrue(0.0 <= float(p_lower) <= 1.0)
            if int(cls) == -1:
                self.assertEqual(float(radius), 0.0)

    def test_predict_signature(self):
        out = io.StringIO()
        with flagsaver.flagsaver(export_dir=self.base_path, signature="predict"), contextlib.redirect_stdout(out):
            query_bin.main(["query"])
        self.assertEqual(out.getvalue().strip().splitlines()[1], "idx\tlabel\tclass\tsamples")

    def test_certify_radius_signature(self):
        out = io.StringIO()
        with flagsaver.flagsaver(export_dir=self.base_path, signature="certify_radius", radius=0.05,
                                 indices=["0", "5"]), contextlib.redirect_stdout(out):
            query_bin.main(["query"])
        lines = out.getvalue().strip().splitlines()
        self.assertRegex(lines[1], r"^certified at radius 0.05: [0-2] of 2$")
        self.assertEqual(lines[2], "idx\tlabel\tclass\tcertified\tradius\tsamples")
        for row in lines[3:]:
            _, _, cls, certified, radius, samples = row.split("\t")
            self.assertEqual(certified, str(float(radius) >= 0.05 and int(cls) >= 0))
            self.assertEqual(samples, "60")  # n = 60 < 100: the one stage n.

    @parameterized.named_parameters(
        ("two_targets", dict(rest="localhost:8501"), "exactly one of"),
        ("radius_without_signature", dict(radius=0.5), "give --radius with --signature=certify_radius"),
        ("signature_without_radius", dict(signature="certify_radius"), "give --radius with"),
        ("radius_zero", dict(signature="certify_radius", radius=0.0), "--radius must be finite and > 0"),
        ("no_target", dict(export_dir=None), "exactly one of"),
        ("bad_index", dict(indices=["10000"]), "--indices"),
        ("bad_signature", dict(signature="classify"), "--signature"),
        ("bad_rest", dict(export_dir=None, rest="localhost"), "--rest"),
    )
    def test_bad_flags(self, overrides, message):
        with flagsaver.flagsaver(**{"export_dir": self.base_path, **overrides}):
            with self.assertRaisesRegex(ConfigError, message):
                query_bin.main(["query"])

    def test_closed_port_is_one_line(self):
        # A port nobody listens on: bound, then closed again.
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            port = sock.getsockname()[1]
        with flagsaver.flagsaver(export_dir=None, rest=f"localhost:{port}"):
            with self.assertRaisesRegex(ConfigError, f"^cannot reach http://localhost:{port}/v1/models/smoothed:"
                                        "predict: .*refused"):
                query_bin.main(["query"])
        result = subprocess.run([sys.executable, os.path.join(REPO, "bin", "query.py"), f"--rest=localhost:{port}"],
                                capture_output=True, text=True, timeout=300, check=False)
        self.assertEqual(result.returncode, 2, result.stderr[-2000:])
        self.assertNotIn("Traceback", result.stderr)
        self.assertRegex(result.stderr.rstrip().splitlines()[-1],
                         f"^query.py: error: cannot reach http://localhost:{port}/v1/models/smoothed:predict: ")
        self.assertLen([line for line in result.stderr.splitlines() if line.startswith("query.py: error:")], 1)

    def test_missing_export(self):
        with flagsaver.flagsaver(export_dir=self.get_temp_dir() + "/nothing"):
            with self.assertRaisesRegex(ConfigError, "--export_dir=.* holds no SavedModel"):
                query_bin.main(["query"])


if __name__ == "__main__":
    tf.test.main()
