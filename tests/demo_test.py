"""scripts/demo.sh, the README's first command, run twice in a row.

The README says that running it again resumes or skips what is done. The
second run must exit 0 without training or certifying anything, and leave
every file's bytes as they were, and the training run's files untouched: it
once rewrote base_model.keras, whose new SHA-256 then made bin/certify.py
refuse to resume its own output. (Resuming, bin/certify.py truncates its
output to its whole lines even when none is torn, which updates the file's
modification time; its bytes stay.)

The script of the source tree runs (found through this file's real path, so
under `bazel test` too), with DEMO_DIR in a temporary directory. Its set-up
step does nothing when `.venv` is already installed, as it is for the tests.
It runs small (1 epoch on 512 images, 5 images certified with n = 1,000):
whether a second run redoes anything does not depend on the size, and .ci/run
runs the full-size demo once before the tests.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
TIMEOUT = 900  # seconds per run; the full-size demo took 449 s beside other tests (load ~12 on 2 cores)
SMALL = {"DEMO_TRAIN_FLAGS": "--epochs=1 --train_examples=512", "DEMO_MAX": "5", "DEMO_N": "1000"}


def _run_demo(demo_dir):
    env = {**os.environ, **SMALL, "DEMO_DIR": demo_dir, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "demo.sh")], env=env, capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    return result, time.monotonic() - start


def _snapshot(directory):
    """Every file under `directory`: its bytes' SHA-256 and modification time."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = (hashlib.sha256(f.read()).hexdigest(),
                                                           os.stat(path).st_mtime_ns)
    return found


class DemoTest(absltest.TestCase):

    @pytest.mark.slow
    def test_second_run_trains_and_certifies_nothing(self):
        demo_dir = tempfile.mkdtemp(prefix="demo_")
        self.addCleanup(shutil.rmtree, demo_dir, ignore_errors=True)
        first, first_seconds = _run_demo(demo_dir)
        self.assertEqual(first.returncode, 0, f"{first.stdout[-3000:]}\n{first.stderr[-3000:]}")
        self.assertIn("certified 5 examples into", first.stdout)
        before = _snapshot(demo_dir)
        self.assertIn("fmnist_consistency_sigma0.50/base_model.keras", before)

        second, second_seconds = _run_demo(demo_dir)
        output = f"{second.stdout[-3000:]}\n{second.stderr[-3000:]}"
        self.assertEqual(second.returncode, 0, output)
        self.assertIn("is already trained for 1 epochs; nothing to do", second.stdout, output)
        self.assertIn("certified 0 examples into", second.stdout, output)
        self.assertNotIn("Epoch 1/1", second.stdout, output)  # No epoch was trained.
        # The results table and the answer of the export, as the first time.
        self.assertIn("| file | n | smoothed acc. | ACR |", second.stdout, output)
        self.assertIn("idx\tlabel\tclass\tradius\tp_lower", second.stdout, output)
        after = _snapshot(demo_dir)
        # Every file keeps its bytes; the training run keeps its times too (a rewrite would show).
        self.assertEqual({path: digest for path, (digest, _) in after.items()},
                         {path: digest for path, (digest, _) in before.items()})
        run = "fmnist_consistency_sigma0.50/"
        self.assertEqual({p: v for p, v in after.items() if p.startswith(run)},
                         {p: v for p, v in before.items() if p.startswith(run)})
        print(f"demo.sh: first run {first_seconds:.0f} s, second run {second_seconds:.0f} s")


if __name__ == "__main__":
    absltest.main()
