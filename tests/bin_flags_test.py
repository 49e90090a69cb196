"""Every float flag of every config-built binary refuses a value that is not finite (issue #22, item 3).

Each binary is loaded in process in turn (tests/binaries.py): its flags are
absl's global ones, so two binaries cannot be loaded at once. A value is
set on one flag, the binary's `main` runs, and it must stop with the one
ConfigError naming that flag before it does anything else.
"""

import os
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized

import binaries  # tests/binaries.py
from tf_consreg import analysis
from tf_consreg import certify_run
from tf_consreg import cli
from tf_consreg import export
from tf_consreg import run_config
from tf_consreg import tuning
from tf_consreg.errors import ConfigError

# The configs each binary builds from its flags.
_CONFIGS = {
    "train": (run_config.TrainConfig,),
    "tune": (run_config.TrainConfig, tuning.TuneConfig),
    "certify": (certify_run.CertifyConfig,),
    "predict": (certify_run.CertifyConfig,),
    "export": (export.VersionExportConfig,),
    "analyze": (analysis.AnalyzeConfig,),
}


def _float_fields(config_classes) -> dict:
    """Flag name -> whether it is a list, for the float fields (and float lists) of the configs, nested ones too."""
    found = {}
    for config_cls in config_classes:
        for name, (_, _, hint) in cli._flag_fields(config_cls).items():  # pylint: disable=protected-access
            kind = cli._unwrap(hint)  # pylint: disable=protected-access
            if kind is float or kind == (list, float):
                found[name] = kind != float
    return found


class FiniteFlagsTest(parameterized.TestCase):

    @parameterized.parameters(*_CONFIGS)
    def test_every_float_flag_refuses_infinity_and_nan(self, binary):
        module = binaries.load(binary)
        try:
            floats = {name: is_list for name, is_list in _float_fields(_CONFIGS[binary]).items()
                      if name in module.defined_flags}
            # Every float flag the binary defines is a field of its configs, so none escapes the check.
            float_flags = {name for name in module.defined_flags
                           if isinstance(flags.FLAGS[name].parser, flags.FloatParser)}
            self.assertContainsSubset(float_flags, floats)
            self.assertNotEmpty(floats)
            for name, is_list in sorted(floats.items()):
                for bad, shown in (("inf", "inf"), ("-inf", "-inf"), ("nan", "nan")):
                    with self.subTest(flag=name, value=bad), flagsaver.flagsaver():
                        flags.FLAGS[name].parse(f"0.5,{bad}" if is_list else bad)
                        with self.assertRaises(ConfigError) as caught:
                            module.main([binary])
                        expected = (f"--{name}: each value must be a finite number, got {shown}" if is_list
                                    else f"--{name} must be a finite number, got {shown}")
                        self.assertEqual(str(caught.exception), expected)
        finally:
            binaries.unload(module)

    def test_nothing_is_written_to_the_model_dir_before_the_check(self):
        # The case: the run directory kept flags.txt, so the corrected command was "a different run".
        module = binaries.load("train")
        try:
            model_dir = os.path.join(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()), "run")
            for method, flag in (("smoothmix", "attack_step"), ("consistency", "eta"), ("consistency", "lbd"),
                                 ("smoothadv", "epsilon")):
                with self.subTest(flag=flag), flagsaver.flagsaver(model_dir=model_dir, method=method, mock_data=True):
                    flags.FLAGS[flag].parse("inf")
                    with self.assertRaisesWithLiteralMatch(ConfigError, f"--{flag} must be a finite number, got inf"):
                        module.main(["train"])
                    self.assertFalse(os.path.exists(model_dir))
        finally:
            binaries.unload(module)


if __name__ == "__main__":
    absltest.main()
