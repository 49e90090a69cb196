"""Tests of the package tf_consreg itself: its lazy public API, what importing loads, its built metadata."""

import email.parser
import os
import re
import subprocess
import sys
import tempfile

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



class MetadataTest(absltest.TestCase):
    """The metadata a wheel carries, as pip builds it from setup.py."""

    def test_pypi_description_links_no_repository_path(self):
        # setuptools' PEP 517 hook, which pip calls: the METADATA body is the long_description PyPI shows, where
        # a relative link (docs/training.md) resolves under pypi.org and breaks.
        with tempfile.TemporaryDirectory() as tmp:
            code = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
            result = subprocess.run([sys.executable, "-c", code, tmp], cwd=_REPO, capture_output=True, text=True,
                                    check=True, timeout=300)
            dist_info = result.stdout.strip().splitlines()[-1]
            with open(os.path.join(tmp, dist_info, "METADATA"), encoding="utf-8") as f:
                metadata = email.parser.Parser().parse(f)
        self.assertEqual(metadata["Description-Content-Type"], "text/markdown")
        description = metadata.get_payload()
        targets = re.findall(r"\]\(([^)\s]*)\)", description)
        self.assertEqual([t for t in targets if not re.match(r"https?://|#", t)], [])
        with open(os.path.join(_REPO, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        # The README in the repository keeps its relative links, and PyPI's page still names each file.
        doc_links = set(re.findall(r"\]\((docs/[^)\s]+)\)", readme))
        self.assertNotEmpty(doc_links)
        for path in doc_links:
            self.assertIn(f"`{path}`", description)
        self.assertIn(readme.splitlines()[0], description)  # The README's own text, not something else.


if __name__ == "__main__":
    absltest.main()
