"""Tests of tf_consreg.cli: flags made from a config's fields, and the binaries' one-line failures."""

import dataclasses
import os
import subprocess
import sys
import tempfile
import textwrap
from typing import Optional, Sequence, Tuple

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized

from tf_consreg import cli
from tf_consreg.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class _Config:
    output: str
    count: int = 3
    rate: float = 0.5
    name: str = "x"
    on: bool = False
    limit: Optional[int] = None
    radii: Sequence[float] = (0.25, 0.5)
    labels: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.count < 0:
            raise ConfigError(f"--count must be >= 0, got {self.count}")


_HELPS = {name: f"help of {name}" for name in ("output", "count", "rate", "name", "on", "limit", "radii", "labels")}


@dataclasses.dataclass(frozen=True)
class _Inner:
    scale: float = 2.0
    mode: Optional[str] = None

    def __post_init__(self):
        if self.scale <= 0:
            raise ConfigError(f"--scale must be > 0, got {self.scale}")


@dataclasses.dataclass(frozen=True)
class _Outer:
    output: str
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    count: int = 3


@dataclasses.dataclass(frozen=True)
class _Prefixed:
    """A nested config under a prefix, whose default instance sets its flags' defaults (as TrainConfig's spec)."""

    output: str
    count: int = 3
    watch: _Inner = dataclasses.field(default=_Inner(scale=5.0), metadata={cli.FLAG_PREFIX: "watch_"})


class DefineFlagsTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.values = flags.FlagValues()

    def _define(self, helps=None, **kwargs):
        return cli.define_flags(_Config, helps or _HELPS, flag_values=self.values, **kwargs)

    def test_types_and_defaults_come_from_the_fields(self):
        holders = self._define()
        self.values(["prog"])
        self.assertEqual({k: h.value for k, h in holders.items()},
                         {"output": None, "count": 3, "rate": 0.5, "name": "x", "on": False, "limit": None,
                          "radii": ["0.25", "0.5"], "labels": None})
        self.assertEqual(self.values["count"].help, "help of count")

    def test_flags_are_key_flags_of_the_caller(self):
        # A binary's --help (short help) lists its key flags: the flags must be
        # the caller's (here this test module's), not tf_consreg.cli's.
        self._define()
        mine = {flag.name for flag in self.values.get_key_flags_for_module(sys.modules[__name__])}
        self.assertContainsSubset({"output", "count", "rate", "radii"}, mine)
        self.assertEmpty(self.values.get_key_flags_for_module(cli))

    def test_parsed_values_build_the_config(self):
        holders = self._define()
        self.values(["prog", "--output=o.tsv", "--count=7", "--rate=1e-3", "--on", "--limit=4", "--radii=1,2.5",
                     "--labels=a,b"])
        self.assertEqual(cli.config_from_flags(_Config, holders),
                         _Config(output="o.tsv", count=7, rate=1e-3, on=True, limit=4, radii=(1.0, 2.5),
                                 labels=("a", "b")))

    def test_binary_fields_and_other_defaults(self):
        holders = self._define({"count": "c"}, defaults={"count": 0})
        self.values(["prog"])
        self.assertEqual(cli.config_from_flags(_Config, holders, output="fixed"), _Config(output="fixed", count=0))

    def test_list_element_of_the_wrong_type_names_the_flag(self):
        holders = self._define()
        self.values(["prog", "--radii=1,abc"])
        with self.assertRaisesRegex(ConfigError, r"^--radii: '1,abc' is not a list of float values"):
            cli.config_from_flags(_Config, holders, output="o")

    def test_a_nested_configs_fields_are_flags_too(self):
        holders = cli.define_flags(_Outer, {"count": "c", "scale": "s", "mode": "m"}, defaults={"scale": 3.0},
                                   flag_values=self.values)
        self.values(["prog", "--mode=fast"])
        self.assertEqual(cli.config_from_flags(_Outer, holders, output="o"),
                         _Outer(output="o", inner=_Inner(scale=3.0, mode="fast")))
        self.values(["prog", "--scale=-1"])
        with self.assertRaisesRegex(ConfigError, "^--scale must be > 0"):
            cli.config_from_flags(_Outer, holders, output="o")

    def test_a_prefixed_nested_config(self):
        holders = cli.define_flags(_Prefixed, {"count": "c", "watch_scale": "s", "watch_mode": "m"},
                                   flag_values=self.values)
        self.values(["prog"])
        # The defaults are the nesting field's default instance's (5.0), not _Inner's (2.0).
        self.assertEqual(holders["watch_scale"].value, 5.0)
        self.assertEqual(cli.config_from_flags(_Prefixed, holders, output="o"), _Prefixed(output="o"))
        self.values(["prog", "--watch_mode=fast", "--count=4"])
        self.assertEqual(cli.config_from_flags(_Prefixed, holders, output="o"),
                         _Prefixed(output="o", count=4, watch=_Inner(scale=5.0, mode="fast")))
        self.assertNotIn("scale", self.values)
        # The nested config's message names the flag with its prefix.
        self.values(["prog", "--watch_scale=-1"])
        with self.assertRaisesRegex(ConfigError, "^--watch_scale must be > 0, got -1.0$"):
            cli.config_from_flags(_Prefixed, holders, output="o")

    def test_values_by_flag_name_round_trip(self):
        config = _Prefixed(output="o", count=4, watch=_Inner(scale=1.5, mode="m"))
        values = cli.flat_values(config)
        self.assertEqual(values, {"output": "o", "count": 4, "watch_scale": 1.5, "watch_mode": "m"})
        self.assertEqual(cli.config_from_values(_Prefixed, values), config)
        self.assertEqual(cli.flat_values(config, ["watch_mode", "count"]), {"watch_mode": "m", "count": 4})
        # Values not given keep the nesting field's default instance's.
        self.assertEqual(cli.config_from_values(_Prefixed, {"output": "o", "watch_mode": "m"}).watch,
                         _Inner(scale=5.0, mode="m"))
        outer = _Outer(output="o", inner=_Inner(scale=3.0))
        self.assertEqual(cli.config_from_values(_Outer, cli.flat_values(outer)), outer)

    def test_values_that_are_no_fields(self):
        with self.assertRaisesRegex(TypeError, "_Prefixed has no field or nested field 'scale'"):
            cli.config_from_values(_Prefixed, {"output": "o", "scale": 1.0})
        with self.assertRaisesRegex(TypeError, "both watch and its fields watch_mode given"):
            cli.config_from_values(_Prefixed, {"output": "o", "watch": _Inner(), "watch_mode": "m"})

    def test_a_nested_config_is_not_a_flag(self):
        with self.assertRaisesRegex(TypeError, "_Outer.inner: no flag type"):
            cli.define_flags(_Outer, {"inner": "?"}, flag_values=self.values)

    def test_unknown_field_and_stray_default(self):
        with self.assertRaisesRegex(TypeError, "no field 'nope'"):
            self._define({"nope": "?"})
        with self.assertRaisesRegex(TypeError, "defaults for fields without a flag: rate"):
            self._define({"count": "c"}, defaults={"rate": 1.0})


_PROGRAM = textwrap.dedent('''
    import dataclasses
    import os
    from tf_consreg import cli
    from tf_consreg import files
    from tf_consreg.errors import ConfigError

    @dataclasses.dataclass(frozen=True)
    class Config:
        n: int = 1

        def __post_init__(self):
            if self.n < 1:
                raise ConfigError(f"--n must be >= 1, got {self.n}")

    HOLDERS = cli.define_flags(Config, {"n": "a number"})

    def main(argv):
        print("ran with", cli.config_from_flags(Config, HOLDERS).n)
        if os.environ.get("PROG_OUTPUT"):
            with files.naming(os.environ["PROG_OUTPUT"]), open(os.environ["PROG_OUTPUT"], "w") as f:
                f.write("x" * 100000)

    if __name__ == "__main__":
        cli.run(main)
''')


class CheckValueTest(parameterized.TestCase):
    """config_from_values checks each value's type, every float finite, before the config's own checks."""

    @parameterized.named_parameters(
        ("inf", {"rate": float("inf")}, "--rate must be a finite number, got inf"),
        ("nan", {"rate": float("nan")}, "--rate must be a finite number, got nan"),
        ("nan_in_a_list", {"radii": (0.5, float("nan"))}, "--radii: each value must be a finite number, got nan"),
        ("nested_inf", {"scale": float("-inf")}, "--scale must be a finite number, got -inf"),
        ("string_for_float", {"rate": "0.5"}, "--rate must be a finite number, got '0.5'"),
        ("bool_for_int", {"count": True}, "--count must be an integer, got True"),
        ("float_for_int", {"count": 1.0}, "--count must be an integer, got 1.0"),
        ("int_for_bool", {"on": 1}, "--on must be true or false, got 1"),
        ("string_for_list", {"radii": "0.5"}, "--radii must be a list, got '0.5'"),
        ("null_with_a_default", {"count": None}, "--count must be given, got null"),
    )
    def test_refused(self, values, message):
        config_cls = _Outer if "scale" in values else _Config
        with self.assertRaisesWithLiteralMatch(ConfigError, message):
            cli.config_from_values(config_cls, {"output": "o", **values})

    def test_the_origin_names_the_file_and_field(self):
        with self.assertRaisesWithLiteralMatch(ConfigError, "run.json: field 'rate' must be a finite number, got inf"):
            cli.config_from_values(_Config, {"output": "o", "rate": float("inf")}, origin="run.json")

    def test_accepted(self):
        # An int where a float goes (JSON's 1), None where the type is Optional, a list for a tuple.
        config = cli.config_from_values(_Config, {"output": "o", "rate": 1, "limit": None, "radii": [1.5]})
        self.assertEqual((config.rate, config.limit, tuple(config.radii)), (1, None, (1.5,)))


class RunTest(absltest.TestCase):
    """Every way a command line can be wrong ends in one line and exit status 2."""

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        self.program = os.path.join(self.dir, "prog.py")
        with open(self.program, "w", encoding="utf-8") as f:
            f.write(_PROGRAM)

    def _run(self, *args, stdout=subprocess.PIPE, **extra_env):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra_env)
        return subprocess.run([sys.executable, self.program, *args], stdout=stdout, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=120, check=False)

    def assertFailsWithOneLine(self, result, pattern):
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.strip().splitlines()
        self.assertLen(lines, 1, result.stderr)
        self.assertRegex(lines[0], r"^prog\.py: error: " + pattern)

    def test_runs(self):
        result = self._run("--n=4")
        self.assertEqual((result.returncode, result.stdout), (0, "ran with 4\n"), result.stderr)

    def test_config_error(self):
        self.assertFailsWithOneLine(self._run("--n=0"), "--n must be >= 1, got 0")

    def test_malformed_value(self):
        self.assertFailsWithOneLine(self._run("--n=abc"), ".*--n.*abc")

    def test_unknown_flag(self):
        self.assertFailsWithOneLine(self._run("--nope=1"), ".*nope")

    def test_missing_flagfile(self):
        self.assertFailsWithOneLine(self._run("--flagfile=" + os.path.join(self.dir, "missing.flags")),
                                    ".*missing.flags")

    def test_flagfile_that_is_not_text(self):
        path = os.path.join(self.dir, "binary.flags")
        with open(path, "wb") as f:
            f.write(b"--n=2\n\xff\xfe\x00\x81\n")
        self.assertFailsWithOneLine(self._run("--flagfile=" + path), "a --flagfile is not UTF-8 text")

    def test_a_failed_write_during_the_run(self):
        # /dev/full fails every write with ENOSPC, as a full disk does, without root or a mount.
        result = self._run("--n=3", PROG_OUTPUT="/dev/full")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "ran with 3\n")
        lines = result.stderr.strip().splitlines()
        self.assertLen(lines, 1, result.stderr)
        self.assertRegex(lines[0], r"^prog\.py: error: /dev/full: No space left on device; nothing written before")

    def test_unexpected_argument(self):
        self.assertFailsWithOneLine(self._run("extra"), "unexpected arguments: extra")

    def test_a_closed_stdout_ends_quietly(self):
        # `prog.py --help | head -3`, with head gone before the help is written (the read end closed first):
        # absl's help, and main's output, fail with EPIPE. Before, --help said a flagfile could not be read.
        for args in (("--help",), ("--n=5",)):
            with self.subTest(args=args):
                read_end, write_end = os.pipe()
                os.close(read_end)
                try:
                    result = self._run(*args, stdout=write_end)
                finally:
                    os.close(write_end)
                self.assertEqual((result.returncode, result.stderr), (141, ""))


class FormatFlagsTest(absltest.TestCase):
    """format_flags, the one way the project writes flags (a run's flags.txt, a search's best.flags)."""

    def test_parses_back_to_the_same_values(self):
        values = flags.FlagValues()
        flags.DEFINE_bool("on", True, "", flag_values=values)
        flags.DEFINE_bool("off", False, "", flag_values=values)
        flags.DEFINE_integer("count", 0, "", flag_values=values)
        flags.DEFINE_float("rate", 0.0, "", flag_values=values)
        flags.DEFINE_string("path", None, "", flag_values=values)
        flags.DEFINE_list("radii", None, "", flag_values=values)
        flags.DEFINE_string("unset", "kept", "", flag_values=values)
        text = cli.format_flags({"on": False, "off": True, "count": 7, "rate": 1 / 3, "path": "/a dir/x",
                                 "radii": (0.25, 1.0), "unset": None})
        self.assertEqual(text, "--noon\n--off\n--count=7\n--rate=0.3333333333333333\n--path=/a dir/x\n"
                               "--radii=0.25,1.0\n")
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "flags.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            values(["prog", f"--flagfile={path}"])
        self.assertEqual((values.on, values.off, values.count, values.rate, values.path, values.radii, values.unset),
                         (False, True, 7, 1 / 3, "/a dir/x", ["0.25", "1.0"], "kept"))

    def test_a_line_break_cannot_be_written(self):
        with self.assertRaisesRegex(ValueError, "--data_dir: .* holds a line break"):
            cli.format_flags({"data_dir": "a\nb"})


if __name__ == "__main__":
    absltest.main()
