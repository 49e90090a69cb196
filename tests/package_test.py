"""Tests of the package tf_consreg itself: its lazy public API and what importing loads."""

import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

import tf_consreg

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_loaded_by(statement: str) -> set:
    """The top-level modules a fresh Python has loaded after `statement`."""
    code = f"{statement}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, check=True,
                            timeout=300)
    return set(result.stdout.split())


class PublicApiTest(parameterized.TestCase):

    @parameterized.parameters(*tf_consreg.__all__)
    def test_every_public_name_resolves(self, name):
        self.assertIsNotNone(getattr(tf_consreg, name))

    def test_unknown_name_is_an_attribute_error(self):
        with self.assertRaisesRegex(AttributeError, "no attribute 'nonexistent'"):
            getattr(tf_consreg, "nonexistent")


class ImportHygieneTest(parameterized.TestCase):
    """A laptop analyzes logs, and a client queries TF Serving, without TensorFlow."""

    @parameterized.parameters("tf_consreg", "tf_consreg.analysis", "tf_consreg.certify_log", "tf_consreg.stats",
                              "tf_consreg.files", "tf_consreg.signatures", "tf_consreg.serving_client",
                              "tf_consreg.errors")
    def test_loads_neither_tensorflow_nor_keras(self, module):
        loaded = _modules_loaded_by(f"import {module}")
        self.assertNotIn("tensorflow", loaded)
        self.assertNotIn("keras", loaded)

    def test_the_public_analysis_entry_points_load_neither(self):
        loaded = _modules_loaded_by("from tf_consreg import AnalyzeConfig, analyze, read_certify_tsv, summarize")
        self.assertNotIn("tensorflow", loaded)
        self.assertNotIn("keras", loaded)

    def test_the_check_sees_tensorflow_when_it_is_loaded(self):
        # The check above must be able to fail.
        self.assertIn("tensorflow", _modules_loaded_by("import tf_consreg.noise"))


if __name__ == "__main__":
    absltest.main()
