"""Loads a command (tf_consreg/commands/<name>.py) for in-process tests, one test module at a time.

Commands define their flags on absl's global FLAGS when imported, and several
share names (--dataset, --data_dir, ...), so importing two of them into one
pytest process fails. A test module loads its command in `setUpModule` with
`load` and removes its flags again in `tearDownModule` with `unload`; pytest
runs one module's tests together, so each command's flags exist only while
its tests run.
"""

import importlib
import sys
import types

from absl import flags

PACKAGE = "tf_consreg.commands"


def load(name: str) -> types.ModuleType:
    """Imports tf_consreg.commands.<name> afresh (its flags registered) and parses no arguments."""
    before = set(flags.FLAGS)
    module_name = f"{PACKAGE}.{name}"
    sys.modules.pop(module_name, None)  # Afresh: a module unloaded before defines its flags again.
    module = importlib.import_module(module_name)
    module.defined_flags = sorted(set(flags.FLAGS) - before)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS([name])
    return module


def unload(module: types.ModuleType) -> None:
    """Removes the flags `load` registered for `module`, and the module itself."""
    for name in module.defined_flags:
        delattr(flags.FLAGS, name)
    sys.modules.pop(module.__name__, None)


def flag_defaults(name: str) -> dict:
    """The flags command <name> defines, with their defaults (loaded and unloaded again)."""
    module = load(name)
    try:
        return {flag: flags.FLAGS[flag].default for flag in module.defined_flags}
    finally:
        unload(module)
