"""Every flagfile in configs/ parses with bin/train.py's flags into a valid config."""

import glob
import os
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bin"))
import train as train_bin  # noqa: E402  pylint: disable=wrong-import-position

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.flags")))


class ConfigsTest(parameterized.TestCase):

    def test_there_are_configs(self):
        self.assertGreaterEqual(len(CONFIGS), 19)

    @parameterized.named_parameters((os.path.basename(p)[:-6], p) for p in CONFIGS)
    def test_flagfile_gives_valid_config(self, path):
        with flagsaver.flagsaver():
            flags.FLAGS(["train", f"--flagfile={path}", "--model_dir=/tmp/unused"])
            config = train_bin.make_config()
        name = os.path.basename(path)
        if "_sigma" in name:  # <dataset>_<method>_sigma<s>.flags says what it holds.
            self.assertIn(config.method, name.replace("smoothadv_consistency", "consistency"))
            self.assertEqual(config.sigma, float(name.split("_sigma")[1][:4]))


if __name__ == "__main__":
    absltest.main()
