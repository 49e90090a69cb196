"""The commands (tf_consreg/commands) started the three ways users start them.

Installed, a command is pip's console-script wrapper `tf-consreg-<name>`; in a
checkout it is the shim bin/<name>.py; either way also `python -m
tf_consreg.commands.<name>`. In each case --help must show the command's own
docstring and flags (absl describes the `__main__` module, which is the
command only under `python -m`), and an installed command names itself in
its error lines. The command used is analyze, which does not import
TensorFlow, so each process takes about a second. scripts/wheel_check.sh
runs every command from a wheel installed in a fresh venv.
"""

import ast
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

import binaries  # tests/binaries.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "analyze"
MODULE = os.path.join(REPO, "tf_consreg", "commands", f"{COMMAND}.py")
# What pip writes as the console script of `tf-consreg-analyze = tf_consreg.commands.analyze:run`
# (setup.py's entry point), but for the interpreter line.
CONSOLE_SCRIPT = """\
import re
import sys
from tf_consreg.commands.analyze import run
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(run())
"""


def _docstring() -> str:
    """The command module's docstring, read from its source (not through absl)."""
    with open(MODULE, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False)


class CommandLaunchTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        cls.console_script = os.path.join(cls.dir, f"tf-consreg-{COMMAND}")
        with open(cls.console_script, "w", encoding="utf-8") as f:
            f.write(CONSOLE_SCRIPT)
        cls.own_flags = sorted(binaries.flag_defaults(COMMAND))

    def _run(self, launcher, *args):
        argv = {"console_script": [self.console_script],
                "bin_shim": [os.path.join(REPO, "bin", f"{COMMAND}.py")],
                "python_m": ["-m", f"tf_consreg.commands.{COMMAND}"]}[launcher]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # From the temporary directory: `python -m` must not find the package through the working directory.
        return subprocess.run([sys.executable, *argv, *args], capture_output=True, text=True, env=env, cwd=self.dir,
                              timeout=120, check=False)

    @parameterized.parameters("console_script", "bin_shim", "python_m")
    def test_help_is_the_commands_docstring_and_flags(self, launcher):
        result = self._run(launcher, "--help")
        self.assertEqual(result.returncode, 1, result.stderr)  # absl's --help exits with status 1.
        # absl prints the docstring as it is, then "flags:" and the main module's key flags.
        self.assertStartsWith(result.stdout, _docstring())
        listed = result.stdout.split("\nflags:\n", 1)[1]
        for flag in self.own_flags:
            self.assertRegex(listed, rf"\n  --(\[no\])?{flag}:")  # --[no]name for a bool
        self.assertNotIn("Runs the analyze command from a checkout", result.stdout)  # the shim's own docstring

    def test_installed_command_reads_flagfiles_and_names_itself_in_errors(self):
        flagfile = os.path.join(self.dir, "bad.flags")
        with open(flagfile, "w", encoding="utf-8") as f:
            f.write("--format=yaml\n")
        result = self._run("console_script", f"--flagfile={flagfile}", "x.tsv")
        self.assertEqual(result.returncode, 2, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertLen(lines, 1, result.stderr)
        self.assertStartsWith(lines[0], f"tf-consreg-{COMMAND}: error: --format='yaml' is unknown")


if __name__ == "__main__":
    absltest.main()
