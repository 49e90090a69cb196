"""The README's Python example runs as written (so it cannot go stale)."""

import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    with open(os.path.join(_REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(heading + "\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    return match.group(1)


class UseItFromPythonTest(absltest.TestCase):

    @pytest.mark.slow
    def test_example_trains_certifies_and_exports(self):
        code = readme_block("## Use it from Python")
        with tempfile.TemporaryDirectory() as directory:
            env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            result = subprocess.run([sys.executable, "-c", code], cwd=directory, env=env, capture_output=True,
                                    text=True, timeout=600, check=False)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            self.assertRegex(result.stdout, r"classes \[[-\d ]+\] radii \[")
            export = os.path.join(directory, "serving", "fmnist", "1")
            self.assertTrue(os.path.isfile(os.path.join(export, "saved_model.pb")))


if __name__ == "__main__":
    absltest.main()
