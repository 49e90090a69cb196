"""Every flagfile in configs/ parses with bin/train.py's flags into a valid config."""

import glob
import os
import sys

from absl import flags

import binaries  # tests/binaries.py
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
train_bin = None  # bin/train.py, loaded by setUpModule.


def setUpModule():
    global train_bin
    train_bin = binaries.load("train")


def tearDownModule():
    binaries.unload(train_bin)

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
            self.assertIn(config.objective.method, name.replace("smoothadv_consistency", "consistency"))
            self.assertEqual(config.sigma, float(name.split("_sigma")[1][:4]))
        if config.objective.method == "smoothmix":  # The EXPERIMENTS.MD row's suffixes: _onestep, _eta5.
            self.assertEqual(config.objective.mix_step, int("_onestep" in name))
            self.assertEqual(config.objective.eta, 5.0 if "_eta5" in name or name.startswith("cifar10") else 1.0)


if __name__ == "__main__":
    absltest.main()
