"""Loads a bin/*.py binary for in-process tests, one test module at a time.

Binaries define their flags on absl's global FLAGS when imported, and several
share names (--dataset, --data_dir, ...), so importing two of them into one
pytest process fails. A test module loads its binary in `setUpModule` with
`load` and removes its flags again in `tearDownModule` with `unload`; pytest
runs one module's tests together, so each binary's flags exist only while its
tests run.
"""

import importlib.util
import os
import types

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str) -> types.ModuleType:
    """Imports bin/<name>.py afresh (its flags registered) and parses no arguments."""
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(f"bin_{name}", os.path.join(REPO, "bin", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.defined_flags = sorted(set(flags.FLAGS) - before)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS([name])
    return module


def unload(module: types.ModuleType) -> None:
    """Removes the flags `load` registered for `module`."""
    for name in module.defined_flags:
        delattr(flags.FLAGS, name)


def flag_defaults(name: str) -> dict:
    """The flags bin/<name>.py defines, with their defaults (loaded and unloaded again)."""
    module = load(name)
    try:
        return {flag: flags.FLAGS[flag].default for flag in module.defined_flags}
    finally:
        unload(module)
