"""The Bazel BUILD files match the source tree: one target per file, real deps.

Checks, without Bazel, that every `.py` under tf_consreg/, bin/, tests/,
bench/ and tools/ is a source of exactly one py_library / py_binary / py_test,
that no BUILD file names a file or target that does not exist, that each
target's deps name every tf_consreg module its sources import (at module level
or inside a function; a test's `binaries.load("<name>")` imports command
<name>), that a test's data holds the bin/ scripts it runs, and that every
command in tf_consreg/commands has its bin/ py_binary.
A file without a target fails with a stanza to paste into its BUILD file. The
BUILD files are Starlark, whose syntax is Python's: they are executed here
with stand-ins for the few rules they use.

Under `bazel test` the test reads the source tree (found through its own
file's real path), not its runfiles, so files that no BUILD file declares
are seen too.
"""

import ast
import collections
import dataclasses
import glob as glob_lib
import os
import sys
from typing import Dict, List, Optional, Set

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CHECKED_DIRS = ("tf_consreg", "bin", "tests", "bench", "tools")
PACKAGE = "tf_consreg"
COMMANDS = "tf_consreg.commands"  # one module per command; bin/<name>.py runs command <name>
PY_RULES = ("py_library", "py_binary", "py_test")
TEST_SIZES = ("small", "medium", "large", "enormous")
BUILD_FILE_NAMES = ("BUILD", "BUILD.bazel")
CONFIGS_LABEL = "//:configs"  # the flagfiles in configs/
# Never Bazel packages nor sources (bazel-* output links are skipped too).
_SKIP_DIRS = {".git", "__pycache__"}


@dataclasses.dataclass
class Target:
    """A rule instance from a BUILD file."""

    kind: str  # py_library, py_binary, py_test, filegroup, genrule, ...
    label: str  # //package:name
    srcs: List[str]  # labels
    deps: List[str]  # labels
    data: List[str]  # labels
    attrs: dict


def canonical_label(ref: str, package: str) -> str:
    """`//pkg:name` for a label written in package `package` (`:x`, `x`, `//p`, `//p:x`)."""
    if ref.startswith("@"):
        return ref
    if ref.startswith("//"):
        pkg, _, name = ref[2:].partition(":")
        return f"//{pkg}:{name or os.path.basename(pkg)}"
    return f"//{package}:{ref[1:] if ref.startswith(':') else ref}"


def label_path(label: str) -> str:
    """The workspace-relative path a `//pkg:name` label names when it is a file."""
    pkg, _, name = label[2:].partition(":")
    return os.path.join(pkg, name) if pkg else name


def _ignored_dirs() -> Set[str]:
    path = os.path.join(REPO, ".bazelignore")
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {line.strip().rstrip("/") for line in f if line.strip() and not line.startswith("#")}


def build_file_dirs() -> List[str]:
    """Workspace-relative directories holding a BUILD file, as Bazel's `//...` sees them."""
    ignored = _ignored_dirs()
    found = []
    for root, dirs, files in os.walk(REPO):
        rel = os.path.relpath(root, REPO)
        rel = "" if rel == "." else rel
        # Subdirectories with their own WORKSPACE are other repositories.
        dirs[:] = sorted(
            d for d in dirs
            if d not in _SKIP_DIRS and not d.startswith("bazel-") and os.path.join(rel, d) not in ignored
            and not os.path.exists(os.path.join(root, d, "WORKSPACE")))
        if any(name in files for name in BUILD_FILE_NAMES):
            found.append(rel)
    return found


class _Package:
    """Executes one BUILD file and records its targets."""

    def __init__(self, package: str, targets: Dict[str, Target], exported: Set[str]):
        self.package = package
        self.targets = targets
        self.exported = exported

    def _add(self, kind, name, srcs=(), deps=(), data=(), **attrs):
        label = canonical_label(":" + name, self.package)
        if label in self.targets:
            raise ValueError(f"{label} is declared twice")
        canon = lambda refs: [canonical_label(r, self.package) for r in refs]  # noqa: E731
        self.targets[label] = Target(kind, label, canon(srcs), canon(deps), canon(data), attrs)

    def _rule(self, kind):
        return lambda name, **attrs: self._add(kind, name, **attrs)

    def _glob(self, include, exclude=(), **_):
        base = os.path.join(REPO, self.package)
        matched = set()
        for pattern in include:
            matched.update(os.path.relpath(p, base) for p in glob_lib.glob(os.path.join(base, pattern), recursive=True)
                           if os.path.isfile(p))
        for pattern in exclude:
            matched.difference_update(
                os.path.relpath(p, base) for p in glob_lib.glob(os.path.join(base, pattern), recursive=True))
        return sorted(matched)

    def _pytest_test(self, name, src=None, deps=(), data=(), **attrs):
        # Mirrors tests/pytest_test.bzl: the test file is the target's only
        # checked-in source (its main is a generated copy of pytest_runner.py).
        self._add("py_test", name, srcs=[src or name + ".py"], deps=list(deps) + ["//tests:conftest"],
                  data=list(data) + ["//:pytest.ini"], macro="pytest_test", **attrs)

    def _load(self, bzl, *symbols, **aliases):
        known = {"pytest_test": self._pytest_test}
        for symbol in list(symbols) + list(aliases.values()):
            if symbol not in known:
                raise ValueError(f"//{self.package}/BUILD loads {symbol!r} from {bzl}: "
                                 "tests/build_files_test.py does not know that macro; teach it")
        self.namespace.update({alias: known[symbol] for alias, symbol in aliases.items()})
        self.namespace.update({symbol: known[symbol] for symbol in symbols})

    def execute(self, path: str):
        self.namespace = {
            "load": self._load,
            "package": lambda **_: None,
            "licenses": lambda *_: None,
            "exports_files": lambda srcs, **_: self.exported.update(canonical_label(s, self.package) for s in srcs),
            "glob": self._glob,
        }
        for kind in PY_RULES + ("filegroup", "genrule", "sh_binary", "sh_test", "test_suite"):
            self.namespace[kind] = self._rule(kind)
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, self.namespace)  # pylint: disable=exec-used


def load_build_files():
    """Returns ({label: Target}, {exported file labels}) for the whole workspace."""
    targets: Dict[str, Target] = {}
    exported: Set[str] = set()
    for package in build_file_dirs():
        name = next(n for n in BUILD_FILE_NAMES if os.path.exists(os.path.join(REPO, package, n)))
        _Package(package, targets, exported).execute(os.path.join(REPO, package, name))
    return targets, exported


def checked_py_files() -> List[str]:
    """Workspace-relative paths of the .py files that must belong to a target."""
    files = []
    for top in CHECKED_DIRS:
        for root, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            files += [os.path.relpath(os.path.join(root, n), REPO) for n in names if n.endswith(".py")]
    return sorted(files)


def _module_file(dotted: str) -> Optional[str]:
    """The file defining tf_consreg module `dotted`, or None if it is not a module."""
    base = os.path.join(*dotted.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(os.path.join(REPO, path)):
            return path
    return None


def _script_dirs(path: str) -> List[str]:
    """Directories whose scripts a file in `path` imports by bare name (pytest puts tests/ on sys.path;
    a script's own directory is on it)."""
    top = path.split(os.sep)[0]
    return sorted({"tests", top}) if top in ("tests", "bench") else ["bin"] if top == "bin" else []


def _loaded_command(node: ast.AST) -> Optional[str]:
    """The command <name> that a call `binaries.load("<name>")` (tests/binaries.py) imports, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "binaries" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def imported_files(path: str) -> Set[str]:
    """Project files that `path` imports, directly (module or function level)."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()

    def add_module(dotted):
        # `from tf_consreg import __version__` names an attribute, not a module:
        # walk up to the package that defines it.
        while dotted:
            module = _module_file(dotted)
            if module:
                found.add(module)
                return
            dotted = dotted.rpartition(".")[0]

    def add_script(name):
        for directory in _script_dirs(path):
            script = os.path.join(directory, name + ".py")
            if os.path.isfile(os.path.join(REPO, script)) and script != path:
                found.add(script)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add_module(alias.name)
                elif "." not in alias.name:
                    add_script(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == PACKAGE:
                for alias in node.names:
                    add_module(f"{node.module}.{alias.name}")
            elif "." not in node.module:
                add_script(node.module)
        elif _loaded_command(node):
            add_module(f"{COMMANDS}.{_loaded_command(node)}")
    return found


def parent_package_inits(module: str) -> List[str]:
    """The `__init__.py` files Python runs before it can import `module`."""
    parts = module.split(os.sep)[:-1]
    inits = [os.path.join(*parts[:i], "__init__.py") for i in range(1, len(parts) + 1)]
    return [p for p in inits if p != module and os.path.isfile(os.path.join(REPO, p))]


def _expected_label(path: str) -> str:
    """The conventional target of a file: //dir:stem (a package's __init__.py: //dir)."""
    directory, base = os.path.split(path)
    name = base[:-len(".py")]
    return f"//{directory}:{os.path.basename(directory) if name == '__init__' else name}"


def _short_label(label: str, package: str) -> str:
    pkg, _, name = label[2:].partition(":")
    if pkg == package:
        return ":" + name
    return f"//{pkg}" if name == os.path.basename(pkg) else label


def _buildifier_order(label: str):
    package, _, name = label.partition(":")
    return (0 if label.startswith(":") else 1 if label.startswith("//") else 2, package, name)


def run_scripts(path: str) -> Set[str]:
    """bin/ scripts that `path` runs: those it names as "<script>.py" (to run them in a subprocess)."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = {os.path.basename(node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py")}
    scripts = {os.path.join("bin", name) for name in names}
    return {s for s in scripts if os.path.isfile(os.path.join(REPO, s)) and s != path}


def reads_configs(path: str) -> bool:
    """Whether `path` names the configs/ directory (the flagfiles), as in os.path.join(REPO, "configs", ...)."""
    if os.path.join(REPO, path) == os.path.realpath(__file__):
        return False  # this file names it to look for it
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    return any(isinstance(node, ast.Constant) and isinstance(node.value, str)
               and (node.value == "configs" or node.value.startswith("configs/")) for node in ast.walk(tree))


class Workspace:
    """The targets of every BUILD file, and which target owns each source file."""

    def __init__(self):
        if not os.path.isfile(os.path.join(REPO, "WORKSPACE")):
            raise AssertionError(f"{REPO} is not the workspace root (no WORKSPACE file)")
        self.targets, self.exported = load_build_files()
        self.py_targets = {label: t for label, t in self.targets.items() if t.kind in PY_RULES}
        self.owners = collections.defaultdict(list)  # file -> labels of py targets listing it in srcs
        for label, target in self.py_targets.items():
            for src in target.srcs:
                self.owners[label_path(src)].append(label)

    def closure(self, label: str) -> Set[str]:
        """`label` and every target it reaches through deps and data."""
        seen, todo = set(), [label]
        while todo:
            current = todo.pop()
            if current in seen or current not in self.targets:
                continue
            seen.add(current)
            todo += self.targets[current].deps + self.targets[current].data
        return seen

    def owner(self, path: str) -> str:
        return self.owners[path][0] if self.owners.get(path) else _expected_label(path)

    def suggest(self, path: str) -> str:
        """A BUILD stanza for a file that has no target yet, from its imports."""
        label = _expected_label(path)
        package, _, name = label[2:].partition(":")
        deps, data = set(), set()
        for module in imported_files(path):
            (data if module.startswith(("tests" + os.sep, "bin" + os.sep)) else deps).add(self.owner(module))
        top = path.split(os.sep)[0]
        if top in ("tests", "bench"):
            data.update(self.owner(script) for script in run_scripts(path))
            if reads_configs(path):
                data.add(CONFIGS_LABEL)
        # See tf_consreg/BUILD: libraries name the package __init__ directly,
        # other targets need it somewhere in their dependencies.
        init = self.owner(os.path.join(PACKAGE, "__init__.py"))
        if top == PACKAGE:
            if not path.startswith(os.path.join(PACKAGE, "models")):
                deps.add(init)
        elif any(dep.startswith(f"//{PACKAGE}") for dep in deps) and not any(
                init in self.closure(dep) for dep in deps):
            deps.add(init)
        if top == "tests" and path.endswith("_test.py"):
            kind, attrs = "pytest_test", ['    size = "medium",  # the smallest of small/medium/large (60/300/900 s) '
                                          '>= 5x its run time']
        else:
            kind = "py_binary" if top in ("bin", "bench") else "py_library"
            attrs = [f'    srcs = ["{os.path.basename(path)}"],']
        lines = [f"{kind}(", f'    name = "{name}",', *attrs]
        for attr, labels in (("data", data), ("deps", deps)):
            short = sorted({_short_label(l, package) for l in labels}, key=_buildifier_order)
            if len(short) == 1:
                lines.append(f'    {attr} = ["{short[0]}"],')
            elif short:
                lines += [f"    {attr} = ["] + [f'        "{l}",' for l in short] + ["    ],"]
        return "\n".join(lines + [")"])


class BuildFilesTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.workspace = Workspace()
        cls.targets = cls.workspace.targets
        cls.exported = cls.workspace.exported
        cls.py_targets = cls.workspace.py_targets
        cls.owners = cls.workspace.owners

    def _closure(self, label: str) -> Set[str]:
        return self.workspace.closure(label)

    def test_found_the_build_files(self):
        self.assertIn("//:pytest.ini", self.exported)
        packages = {label[2:].partition(":")[0] for label in self.targets}
        for package in ("tf_consreg", "tf_consreg/models", "bin", "tests"):
            self.assertIn(package, packages)

    def test_every_py_file_belongs_to_exactly_one_target(self):
        problems = []
        for path in checked_py_files():
            owners = self.owners.get(path, [])
            if not owners:
                problems.append(f"{path} is in no Bazel target; add to {os.path.dirname(path)}/BUILD (check the "
                                f"deps and data):\n{self.workspace.suggest(path)}")
            elif len(owners) > 1:
                problems.append(f"{path} is a source of {len(owners)} targets ({', '.join(sorted(owners))}); "
                                "keep it in one and depend on that one")
        self.assertEmpty(problems, "\n" + "\n".join(problems))

    def test_listed_files_exist(self):
        problems = []
        for label, target in sorted(self.targets.items()):
            if target.kind == "genrule":
                refs = target.srcs
            else:
                refs = target.srcs + (target.data if target.kind in PY_RULES else [])
            for ref in refs:
                if ref.startswith("@") or ref in self.targets:
                    continue
                if not os.path.exists(os.path.join(REPO, label_path(ref))):
                    problems.append(f"{label} lists {ref}, which is neither a file nor a target")
        for ref in sorted(self.exported):
            if not os.path.exists(os.path.join(REPO, label_path(ref))):
                problems.append(f"exports_files names {ref}, which does not exist")
        self.assertEmpty(problems, "\n" + "\n".join(problems))

    def test_deps_are_declared_targets(self):
        problems = [f"{label} depends on {dep}, which no BUILD file declares"
                    for label, target in sorted(self.py_targets.items())
                    for dep in target.deps if not dep.startswith("@") and dep not in self.targets]
        self.assertEmpty(problems, "\n" + "\n".join(problems))

    def test_kinds_follow_the_layout(self):
        problems = []
        for path in checked_py_files():
            expected = {"bin": "py_binary", "bench": "py_binary", "tf_consreg": "py_library"}.get(path.split(os.sep)[0])
            if path.startswith("tests" + os.sep):
                expected = "py_test" if path.endswith("_test.py") else "py_library"
            if path.startswith("bench" + os.sep) and not path.endswith("_bench.py"):
                expected = "py_library"  # What the benchmarks share.
            if expected is None:  # tools/: libraries or binaries
                continue
            for label in self.owners.get(path, []):
                if self.targets[label].kind != expected:
                    problems.append(f"{path} is in a {self.targets[label].kind} ({label}); expected a {expected}")
        self.assertEmpty(problems, "\n" + "\n".join(problems))

    def test_tests_run_under_pytest_with_a_size(self):
        for label, target in sorted(self.py_targets.items()):
            if target.kind != "py_test":
                continue
            with self.subTest(label):
                self.assertEqual(target.attrs.get("macro"), "pytest_test",
                                 f"{label}: use pytest_test so that pytest and tests/conftest.py run it")
                self.assertIn(target.attrs.get("size"), TEST_SIZES, f"{label}: set size to one of {TEST_SIZES}")
                self.assertEqual([label_path(s) for s in target.srcs],
                                 [label_path(label) + ".py"], f"{label}: name the target after its file")

    def test_deps_cover_imports(self):
        problems = []
        for label, target in sorted(self.py_targets.items()):
            closure = self._closure(label)
            direct = set(target.deps) | set(target.data) | {label}
            for src in target.srcs:
                if not os.path.isfile(os.path.join(REPO, label_path(src))):
                    continue  # test_listed_files_exist reports it
                if label_path(src).split(os.sep)[0] in ("tests", "bench"):
                    for script in sorted(run_scripts(label_path(src))):
                        if not closure & set(self.owners.get(script, [])):
                            problems.append(f"{label}: {label_path(src)} runs {script}; add "
                                            f"{self.workspace.owner(script)} to its data")
                    if reads_configs(label_path(src)) and CONFIGS_LABEL not in closure:
                        problems.append(f"{label}: {label_path(src)} reads configs/; add {CONFIGS_LABEL} to its data")
                for module in sorted(imported_files(label_path(src))):
                    owners = self.owners.get(module, [])
                    if owners and not direct & set(owners):
                        where = "deps" if self.targets[owners[0]].kind == "py_library" else "data"
                        problems.append(f"{label}: {label_path(src)} imports {module}; add {owners[0]} to its {where}")
                    # Python runs the parent packages' __init__.py first; they
                    # must be in the runfiles, unless they import this target
                    # themselves (a cycle Bazel cannot express).
                    for init in parent_package_inits(module):
                        for init_label in self.owners.get(init, []):
                            if init_label not in closure and label not in self._closure(init_label):
                                problems.append(f"{label}: importing {module} runs {init}; add {init_label} "
                                                "to its deps")
        self.assertEmpty(problems, "\n" + "\n".join(sorted(set(problems))))


    def test_every_command_has_a_py_binary(self):
        # bin/<name>.py is the shim of command <name>: a py_binary that depends on the command's library.
        commands_dir = os.path.join(REPO, *COMMANDS.split("."))
        commands = sorted(n[:-len(".py")] for n in os.listdir(commands_dir) if n.endswith(".py") and n != "__init__.py")
        self.assertNotEmpty(commands)
        shims = sorted(n[:-len(".py")] for n in os.listdir(os.path.join(REPO, "bin")) if n.endswith(".py"))
        self.assertEqual(shims, commands, "bin/ holds one shim per command in tf_consreg/commands, and nothing else")
        for name in commands:
            with self.subTest(name):
                binary = self.targets.get(f"//bin:{name}")
                self.assertIsNotNone(binary, f"bin/BUILD has no py_binary {name}")
                self.assertEqual(binary.kind, "py_binary")
                self.assertIn(f"//{COMMANDS.replace('.', '/')}:{name}", binary.deps)


class PytestRunnerTest(absltest.TestCase):
    """tests/pytest_runner.py, the main of every Bazel test."""

    def setUp(self):
        super().setUp()
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        self.addCleanup(sys.path.pop, 0)
        import pytest_runner  # pylint: disable=import-outside-toplevel
        self.runner = pytest_runner
        self.root = os.path.dirname(os.path.dirname(os.path.abspath(pytest_runner.__file__)))

    def test_runs_the_file_with_the_workspace_config(self):
        args = self.runner.pytest_args(["main.py", "tests/stats_test.py"], {})
        self.assertEqual(args, [os.path.join(self.root, "tests/stats_test.py"), "--rootdir", self.root,
                                "-c", os.path.join(self.root, "pytest.ini"), "-n", "0", "-m", "slow or not slow"])

    def test_follows_bazels_test_protocol(self):
        args = self.runner.pytest_args(["main.py", "tests/stats_test.py", "-v"],
                                       {"XML_OUTPUT_FILE": "/out/test.xml", "TESTBRIDGE_TEST_ONLY": "clopper"})
        self.assertEqual(args[-4:], ["--junitxml=/out/test.xml", "-k", "clopper", "-v"])


if __name__ == "__main__":
    absltest.main()
