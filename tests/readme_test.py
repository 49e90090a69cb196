"""Every code block of README.md and docs/*.md is checked, so none can go stale.

- Python blocks compile, and every module, name and attribute they take from
  an import resolves (methods of the clients they construct too). Blocks that
  need nothing but this checkout run as written (`RunnableBlocksTest`, slow:
  README's "Use it from Python" trains, certifies and exports). A block that
  talks to a TF Serving server (it constructs `RestClient` or `GrpcClient`)
  cannot run here, where no server can be started: it is compiled and resolved
  only.
- Shell blocks: every command line is split as the shell would split it.
  `python bin/<name>.py ...` (and `bazel run //bin:<name> -- ...`, and the
  command of `sbatch --wrap=...`) parses with that binary's real absl flags,
  so an unknown flag or a malformed value fails; `--flagfile=configs/...` is
  read. Scripts, flagfiles and files of the checkout that a command names
  exist; `python -c` programs run in a temporary directory; the C++ checker's
  flags (`<binary> ...`) are ones its source parses. Programs that are not
  ours (docker, curl, sbatch, tensorboard, ...) are left alone.
- Other blocks are program output, file layouts or error messages; a
  TF Serving `model_config_list` block parses as a ModelServerConfig.
- Every relative link and #anchor in these files resolves.

Shell variables (`$i`, `$SLURM_ARRAY_TASK_ID`, `"$PWD/..."`) stand for a shard
index or a directory: each becomes "0", which parses as either.
"""

import ast
import builtins
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
import pytest

import binaries

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FENCE = re.compile(r"^```([\w.+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
# Programs of other projects: their command lines are not checked here.
_EXTERNAL = {"apt-get", "bazel", "cd", "curl", "docker", "export", "rm", "sbatch", "sudo"}
_PYTHONS = {".venv/bin/python", "python", "python3"}
# Directories of the checkout: a path under one of them, named in a command, must exist.
_CHECKOUT_DIRS = ("bench/", "bin/", "configs/", "scripts/", "tests/", "tools/")
# A block constructing one of these needs a running TF Serving.
_SERVER_CLIENTS = ("RestClient", "GrpcClient")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block."""
    path: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    text: str

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> List[str]:
    """README.md and docs/*.md, relative to the repository."""
    docs = sorted(os.path.relpath(p, _REPO) for p in glob.glob(os.path.join(_REPO, "docs", "*.md")))
    return ["README.md"] + docs


def _read(path: str) -> str:
    with open(os.path.join(_REPO, path), encoding="utf-8") as f:
        return f.read()


def code_blocks(path: str) -> List[Block]:
    text = _read(path)
    return [Block(path, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def all_blocks(lang: Optional[str] = None) -> List[Block]:
    return [b for path in doc_files() for b in code_blocks(path) if lang is None or b.lang == lang]


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = _read("README.md")
    start = text.index(heading + "\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def needs_server(code: str) -> bool:
    return any(re.search(rf"\b{name}\(", code) for name in _SERVER_CLIENTS)


# --- Python blocks ---------------------------------------------------------

def unresolved_names(code: str) -> List[str]:
    """The names `code` takes from its imports that do not exist, as "line N: a.b" strings.

    Follows imported modules and names, attributes of them (`tf_consreg.Smooth`)
    and the methods called on instances of imported classes, whether bound by
    assignment (`rest = RestClient(...)`) or by `with ... as`.
    """
    tree = ast.parse(code)
    bound: Dict[str, object] = {}
    problems = []

    def resolve(node: ast.AST) -> Tuple[bool, object]:
        """(known, object) for a Name/Attribute chain; unknown roots are not checked."""
        if isinstance(node, ast.Name):
            return (node.id in bound, bound.get(node.id))
        if isinstance(node, ast.Attribute):
            known, value = resolve(node.value)
            if not known:
                return False, None
            if not hasattr(value, node.attr):
                problems.append(f"line {node.lineno}: {ast.unparse(node)}")
                return False, None
            return True, getattr(value, node.attr)
        return False, None

    def instance_of(call: ast.AST) -> Optional[type]:
        if isinstance(call, ast.Call):
            known, value = resolve(call.func)
            if known and isinstance(value, type):
                return value
        return None

    for node in ast.walk(tree):  # imports first: a block names what it imports at its top
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = importlib.import_module(alias.name)
                bound[alias.asname or alias.name.split(".")[0]] = (
                    module if alias.asname else importlib.import_module(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        problems.append(f"line {node.lineno}: {node.module}.{alias.name}")
                        continue
                bound[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            cls = instance_of(node.value)
            if cls is not None:
                bound[node.targets[0].id] = cls
        elif isinstance(node, ast.withitem) and isinstance(node.optional_vars, ast.Name):
            cls = instance_of(node.context_expr)
            if cls is not None:
                bound[node.optional_vars.id] = cls
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
            resolve(node)
    return sorted(set(problems))


# --- Shell blocks ----------------------------------------------------------

def _logical_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(offset of the first line, text) per command: continuations joined, quotes spanning lines kept."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        first, buffer = i, lines[i]
        i += 1
        while i < len(lines):
            if buffer.endswith("\\"):
                buffer = buffer[:-1] + " " + lines[i].lstrip()
            else:
                try:
                    shlex.split(buffer, comments=True)
                    break
                except ValueError:  # a quote left open: the string goes on
                    buffer += "\n" + lines[i]
            i += 1
        yield first, buffer


def shell_commands(text: str) -> Iterator[Tuple[int, List[str]]]:
    """(line offset, argv) of every simple command; redirections and their targets dropped."""
    for offset, line in _logical_lines(text):
        # The guides' placeholders (<binary>, <version>) are words, not redirections.
        line = re.sub(r"<(\w+)>", r"@\1@", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        command: List[str] = []
        skip_next = False
        for token in tokens + [";"]:
            if skip_next:
                skip_next = False
            elif token in (">", ">>", "<", "2>"):
                skip_next = True
            elif token in (";", "&&", "||", "|", "&"):
                if command:
                    yield offset, [re.sub(r"\$\{?[A-Za-z_]\w*\}?", "0", a) for a in command]
                command = []
            else:
                command.append(token)


def _serving_check_flags() -> set:
    source = _read(os.path.join("tools", "serving_check", "serving_check.cc"))
    return set(re.findall(r'name == "(\w+)"', source)) | {"load"}


class ShellChecker:
    """Checks the commands of shell blocks; collects the bin/ command lines to parse by binary."""

    def __init__(self):
        self.problems: List[str] = []
        self.binary_argv: Dict[str, List[Tuple[str, List[str]]]] = {}
        self.python_programs: List[Tuple[str, str]] = []
        self.cpp_flags = _serving_check_flags()

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def check_paths(self, where: str, args: List[str]) -> None:
        for arg in args:
            value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
            if value.startswith(_CHECKOUT_DIRS) and not glob.glob(os.path.join(_REPO, value)):
                self.fail(where, f"{value} does not exist in the checkout")

    def check(self, where: str, argv: List[str]) -> None:
        while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):  # VAR=value command
            argv = argv[1:]
        if not argv:
            return
        program = argv[0]
        if program in _PYTHONS:
            self.check_python(where, argv[1:])
        elif program == "bash":
            if not os.path.isfile(os.path.join(_REPO, argv[1])):
                self.fail(where, f"bash {argv[1]}: no such script")
        elif program == "@binary@":  # <binary>: tools/serving_check's C++ program
            for arg in argv[1:]:
                name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
                if name not in self.cpp_flags:
                    self.fail(where, f"tools/serving_check does not parse {arg!r}")
        elif program == "bazel":
            self.check_bazel(where, argv[1:])
        elif program == "sbatch":
            for arg in argv[1:]:
                if arg.startswith("--wrap="):
                    for _, wrapped in shell_commands(arg[len("--wrap="):]):
                        self.check(where, wrapped)
        elif program == ".venv/bin/tensorboard" or program in _EXTERNAL:
            pass
        else:
            self.fail(where, f"unknown program {program!r}: teach tests/readme_test.py how to check it")

    def check_python(self, where: str, args: List[str]) -> None:
        if args[:1] == ["-c"]:
            self.python_programs.append((where, args[1]))
        elif args[:1] == ["-m"]:
            if importlib.util.find_spec(args[1]) is None:
                self.fail(where, f"python -m {args[1]}: no such module")
        elif args and args[0].endswith(".py"):
            script = args[0]
            if not os.path.isfile(os.path.join(_REPO, script)):
                self.fail(where, f"{script} does not exist")
            elif script.startswith("bin/"):
                self.add_binary(where, os.path.basename(script)[:-3], args[1:])
            else:
                self.check_paths(where, args[1:])
        else:
            self.fail(where, f"python {' '.join(args)}: not a script, -c or -m")

    def check_bazel(self, where: str, args: List[str]) -> None:
        target = next((a for a in args[1:] if a.startswith("//")), None)
        if args[0] in ("run", "test") and target and not target.endswith("/..."):
            package, _, name = target[2:].partition(":")
            if args[0] == "run" and package == "bin":
                rest = args[args.index("--") + 1:] if "--" in args else []
                self.add_binary(where, name, rest)
            elif not glob.glob(os.path.join(_REPO, package, name + ".*")):
                self.fail(where, f"{target}: no source {package}/{name}.* for it")

    def add_binary(self, where: str, name: str, args: List[str]) -> None:
        kept = []
        for arg in args:
            if arg.startswith("--flagfile="):
                path = arg[len("--flagfile="):]
                if path.startswith("configs/"):
                    if not os.path.isfile(os.path.join(_REPO, path)):
                        self.fail(where, f"{path} does not exist")
                        continue
                    arg = "--flagfile=" + os.path.join(_REPO, path)
                else:
                    continue  # a run's own flags (flags.txt, best.flags), written by an earlier command
            kept.append(arg)
        self.check_paths(where, kept)
        self.binary_argv.setdefault(name, []).append((where, kept))


def check_shell_blocks() -> ShellChecker:
    checker = ShellChecker()
    for block in all_blocks("sh"):
        for offset, argv in shell_commands(block.text):
            checker.check(f"{block.path}:{block.line + 1 + offset}", argv)
    return checker


def flag_problems(name: str, commands: List[Tuple[str, List[str]]]) -> List[str]:
    """Parses each argv with bin/<name>.py's flags; the parse errors, one per command."""
    problems = []
    module = binaries.load(name)
    try:
        for where, args in commands:
            with flagsaver.flagsaver():
                try:
                    flags.FLAGS([f"{name}.py", *args])
                except flags.Error as e:
                    problems.append(f"{where}: bin/{name}.py {' '.join(args)}: {e}")
    finally:
        binaries.unload(module)
    return problems


# --- Links -----------------------------------------------------------------

def github_anchors(markdown: str) -> set:
    """The anchors GitHub gives the headings of `markdown` (code blocks skipped)."""
    anchors, seen = set(), {}
    for line in _FENCE.sub("", markdown).split("\n"):
        match = re.match(r"^#{1,6} (.*)$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problems() -> List[str]:
    problems = []
    for path in doc_files():
        text = _FENCE.sub("", _read(path))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https://, mailto:
            file_part, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(os.path.join(_REPO, linked)):
                problems.append(f"{path}: link to {target}: {linked} does not exist")
            elif anchor and anchor not in github_anchors(_read(linked)):
                problems.append(f"{path}: link to {target}: {linked} has no heading #{anchor}")
    return problems


class DocBlocksTest(absltest.TestCase):

    def test_every_block_is_of_a_checked_kind(self):
        for block in all_blocks():
            with self.subTest(block.where()):
                # Untagged blocks hold output, layouts and messages; anything runnable must say its language.
                self.assertIn(block.lang, ("python", "sh", ""), "tag code blocks ```python or ```sh")

    def test_python_blocks_compile_and_resolve_their_imports(self):
        blocks = all_blocks("python")
        self.assertNotEmpty(blocks)
        for block in blocks:
            with self.subTest(block.where()):
                compile(block.text, block.where(), "exec")
                self.assertEmpty(unresolved_names(block.text))

    def test_shell_commands_parse_with_the_binaries_flags(self):
        checker = check_shell_blocks()
        # Every binary the README's table lists appears in some guide's commands.
        self.assertContainsSubset({"train", "certify", "predict", "analyze", "tune", "export", "query"},
                                  set(checker.binary_argv))
        problems = list(checker.problems)
        for name, commands in sorted(checker.binary_argv.items()):
            problems += flag_problems(name, commands)
        self.assertEmpty(problems, "\n" + "\n".join(problems))

    def test_python_c_programs_run(self):
        programs = check_shell_blocks().python_programs
        self.assertNotEmpty(programs)
        cwd = os.getcwd()
        for where, program in programs:
            with self.subTest(where), tempfile.TemporaryDirectory() as directory:
                os.chdir(directory)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        exec(compile(program, where, "exec"), {"__builtins__": builtins})  # pylint: disable=exec-used
                finally:
                    os.chdir(cwd)

    def test_serving_config_blocks_parse(self):
        from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
        from tensorflow_serving.config import model_server_config_pb2  # pylint: disable=g-import-not-at-top
        configs = [b for b in all_blocks("") if b.text.startswith("model_config_list")]
        self.assertNotEmpty(configs)
        for block in configs:
            with self.subTest(block.where()):
                text_format.Parse(block.text, model_server_config_pb2.ModelServerConfig())

    def test_links_and_anchors_resolve(self):
        problems = link_problems()
        self.assertEmpty(problems, "\n" + "\n".join(problems))


class CheckerTest(absltest.TestCase):
    """The checks above fail where they should (a checker that passes everything checks nothing)."""

    def test_unknown_flag_and_bad_value_fail(self):
        problems = flag_problems("analyze", [("a", ["--no_such_flag=1"]), ("b", ["--format=json"])])
        self.assertLen(problems, 1)
        self.assertStartsWith(problems[0], "a: bin/analyze.py --no_such_flag=1")

    def test_commands_split_as_the_shell_splits_them(self):
        text = ("A=1 python bin/x.py --a='b c' \\\n    --d=$i --e=<dir>/f > out.txt  # comment\n"
                ".venv/bin/python -c 'print(1,\n 2)' > f\nx && y | z\n")
        self.assertEqual(list(shell_commands(text)), [
            (0, ["A=1", "python", "bin/x.py", "--a=b c", "--d=0", "--e=@dir@/f"]),
            (2, [".venv/bin/python", "-c", "print(1,\n 2)"]),
            (4, ["x"]), (4, ["y"]), (4, ["z"])])

    def test_missing_files_and_unknown_programs_fail(self):
        checker = ShellChecker()
        checker.check("w", ["python", "bin/train.py", "--flagfile=configs/no_such.flags"])
        checker.check("w", ["bash", "scripts/no_such.sh"])
        checker.check("w", ["frobnicate"])
        checker.check("w", ["@binary@", "--no_such_flag=1"])
        self.assertLen(checker.problems, 4)

    def test_unresolved_names_are_found(self):
        code = ("import tf_consreg\nfrom tf_consreg.serving_client import RestClient\n"
                "rest = RestClient('h', 1, 'm')\nrest.no_such_method()\ntf_consreg.NoSuchName\n")
        self.assertEqual(unresolved_names(code), ["line 4: rest.no_such_method", "line 5: tf_consreg.NoSuchName"])

    def test_anchors_follow_github(self):
        self.assertEqual(github_anchors("# A b\n## Fixed-radius (staged) certification\n# A b\n"),
                         {"a-b", "fixed-radius-staged-certification", "a-b-1"})


class RunnableBlocksTest(absltest.TestCase):

    @pytest.mark.slow
    def test_blocks_without_a_server_run(self):
        blocks = [b for b in all_blocks("python") if not needs_server(b.text)]
        readme = readme_block("## Use it from Python")
        self.assertIn(readme, [b.text for b in blocks])
        for block in blocks:
            with self.subTest(block.where()), tempfile.TemporaryDirectory() as directory:
                env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
                result = subprocess.run([sys.executable, "-c", block.text], cwd=directory, env=env,
                                        capture_output=True, text=True, timeout=600, check=False)
                self.assertEqual(result.returncode, 0, result.stderr[-3000:])
                if block.text == readme:  # It trains, certifies and exports.
                    self.assertRegex(result.stdout, r"classes \[[-\d ]+\] radii \[")
                    export = os.path.join(directory, "serving", "fmnist", "1")
                    self.assertTrue(os.path.isfile(os.path.join(export, "saved_model.pb")))


if __name__ == "__main__":
    absltest.main()
