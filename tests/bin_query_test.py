"""bin/query.py: one request to an export, through TensorFlow's SavedModel loader or a loopback server."""

import contextlib
import io
import tempfile
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf
from absl import flags

import binaries  # tests/binaries.py
from serving_client_test import GOOD, MALFORMED, canned_rest_server  # tests/ is on sys.path under pytest
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


    @parameterized.named_parameters(
        ("overflows", 1e40, r"^--radius=1e\+40 is inf in float32, the dtype the model takes; give a radius between "),
        ("underflows", 1e-50, r"^--radius=1e-50 is 0.0 in float32"),
    )
    def test_radius_must_stay_finite_and_positive_in_float32(self, radius, message):
        # Both pass the float64 check (finite, > 0) and would reach the model as inf or 0.
        with flagsaver.flagsaver(export_dir=self.base_path, signature="certify_radius", radius=radius):
            with self.assertRaisesRegex(ConfigError, message):
                query_bin.main(["query"])

    def test_a_request_the_export_refuses_is_one_line(self):
        # Images of another shape (another dataset's): the export's own check, as one line.
        with self.assertRaisesRegex(ConfigError, r"^\S+/7: the serving_default signature refused the request: "
                                    r"assertion failed: \[images must be float32 \[batch, 28, 28, 1\] .* got shape\] "
                                    r"\[1 5 5 1\]$"):
            query_bin._query_local(  # pylint: disable=protected-access
                os.path.join(self.base_path, "7"), "serving_default", np.zeros((1, 5, 5, 1), np.float32), None)

    def test_a_garbage_saved_model_pb_is_named(self):
        directory = self.create_tempdir().full_path
        with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
            f.write(b"\x00not a protocol buffer\xff" * 4)
        with flagsaver.flagsaver(export_dir=directory):
            with self.assertRaisesRegex(ConfigError, f"^{re.escape(os.path.join(directory, 'saved_model.pb'))} "
                                        "is not a readable SavedModel: "):
                query_bin.main(["query"])

    def test_a_saved_model_not_made_by_export_says_what_it_lacks(self):
        module = tf.Module()
        module.double = tf.function(lambda x: {"y": 2.0 * x}, input_signature=[tf.TensorSpec([None], tf.float32)])
        only_default = self.create_tempdir().full_path
        tf.saved_model.save(module, only_default, signatures={"serving_default": module.double})
        with flagsaver.flagsaver(export_dir=only_default, signature="certify_radius", radius=0.5):
            # (The pattern goes on past "bin/export.py": build_files_test reads a string ending in .py as a
            # script the test runs.)
            with self.assertRaisesRegex(ConfigError, f"^--export_dir: the SavedModel in {only_default} lacks the "
                                        "signature\\(s\\) certify_radius, predict, metadata of bin/export.py; "
                                        "export the model with"):
                query_bin.main(["query"])
        # The names of bin/export.py's signatures, but other inputs.
        same_names = self.create_tempdir().full_path
        tf.saved_model.save(module, same_names, signatures={
            "serving_default": module.double, "certify_radius": module.double, "predict": module.double,
            "metadata": tf.function(lambda: {"sigma": tf.constant(0.25)}).get_concrete_function()})
        with flagsaver.flagsaver(export_dir=same_names):
            with self.assertRaisesRegex(ConfigError, f"^--export_dir: the SavedModel in {same_names} is not an "
                                        "export of bin/export.py: its serving_default signature takes x, not images"):
                query_bin.main(["query"])


# The issue's answers (class, radius, p_lower out of range; not JSON; a key missing; a list; too few rows) and
# the rest of the malformed answers that need no metadata (the REST client knows the dataset's 10 classes only).
_NEEDS_METADATA = ("radius_above_p_lower", "samples_not_a_stage", "abstained_before_last_stage")
_FLAGS_OF = {"serving_default": {"signature": "certify"},
             "certify_radius": {"signature": "certify_radius", "radius": 0.2},  # serving_client_test's ASKED
             "predict": {"signature": "predict"}}


class QueryRestContractTest(parameterized.TestCase):
    """bin/query.py --rest against a loopback server answering malformed bodies: one line, no rows."""

    def _query(self, server, signature):
        out = io.StringIO()
        with flagsaver.flagsaver(rest=f"127.0.0.1:{server.port}", indices=["0", "1", "2"],
                                 **_FLAGS_OF[signature]), contextlib.redirect_stdout(out):
            try:
                query_bin.main(["query"])
            finally:
                self.assertEqual(out.getvalue(), "")  # nothing printed as a certificate, not even the header

    @parameterized.named_parameters(*[case for case in MALFORMED if case[0] not in _NEEDS_METADATA])
    def test_a_malformed_answer_is_one_line_naming_the_field(self, signature, outputs, message):
        with canned_rest_server(outputs) as server:
            with self.assertRaisesRegex(ConfigError, f"^http://127.0.0.1:{server.port}/v1/models/smoothed:predict: "
                                        f"the {signature} answer breaks its contract: {re.escape(message)}$"):
                self._query(server, signature)

    @parameterized.named_parameters(
        ("not_json", b"<html>502 Bad Gateway</html>", "is not JSON"),
        ("a_list", b"[1, 2, 3]", "has no 'outputs'"),
    )
    def test_a_body_without_outputs_is_one_line(self, body, message):
        with canned_rest_server(body=body) as server:
            with self.assertRaisesRegex(ConfigError, f"the serving_default answer {message}"):
                self._query(server, "serving_default")

    def test_a_well_formed_answer_is_printed(self):
        with canned_rest_server(GOOD["serving_default"]) as server:
            out = io.StringIO()
            with flagsaver.flagsaver(rest=f"127.0.0.1:{server.port}", indices=["0", "1", "2"]), \
                    contextlib.redirect_stdout(out):
                query_bin.main(["query"])
        rows = [line.split("\t") for line in out.getvalue().strip().splitlines()[2:]]
        self.assertEqual([row[2:] for row in rows], [["3", "0.300", "0.9000"], ["-1", "0.000", "0.4000"],
                                                     ["9", "0.100", "0.7000"]])

    def test_the_issues_answer_is_one_error_naming_the_first_bad_field(self):
        # The answer of issue 22: every field out of range; the first checked, class, is named. In process:
        # test_closed_port_is_one_line runs cli.run's path (one line, exit status 2) in a real process.
        outputs = {"class": [99, -7, 1], "radius": [float("nan"), -1.0, 1e300], "p_lower": [2.0, 0.5, 0.5]}
        out = io.StringIO()
        with canned_rest_server(outputs) as server, contextlib.redirect_stdout(out):
            with flagsaver.flagsaver(rest=f"127.0.0.1:{server.port}", indices=["0", "1", "2"]):
                with self.assertRaises(ConfigError) as raised:
                    query_bin.main(["query"])
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(str(raised.exception),
                         f"http://127.0.0.1:{server.port}/v1/models/smoothed:predict: the serving_default answer "
                         "breaks its contract: class[0] = 99 is not a class of 10 (0 to 9) nor -1 (abstain)")

if __name__ == "__main__":
    tf.test.main()
