"""Builds tools/serving_check/serving_check.cc against the TensorFlow pip package.

    python tools/serving_check/build.py [--out_dir DIR]

prints the path of the binary. Compiling takes ~20 s, so `build()` caches the
binary under a key made of the source, the TensorFlow version and the compile
and link flags: later calls with the same key return at once.
"""

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving_check.cc")
BINARY_NAME = "serving_check"


class BuildError(RuntimeError):
    """g++ is missing or failed to compile or link serving_check."""


def _flags() -> tuple[list[str], list[str], str]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    lib_dir = tf.sysconfig.get_lib()
    # -isystem instead of -I: TensorFlow's headers warn a lot under g++ 12.
    compile_flags = [
        "-isystem" + f[2:] if f.startswith("-I") else f
        for f in tf.sysconfig.get_compile_flags()
    ]
    # --no-as-needed: nothing in serving_check refers to a symbol of
    # libtensorflow_cc's kernels or session factories directly, so without it
    # the linker drops the library and LoadSavedModel finds no session factory.
    link_flags = [
        f"-L{lib_dir}",
        "-Wl,--no-as-needed",
        "-l:libtensorflow_framework.so.2",
        "-l:libtensorflow_cc.so.2",
        f"-Wl,-rpath,{lib_dir}",
    ]
    return compile_flags, link_flags, tf.__version__


def cache_key() -> str:
    """Returns a hex digest of the source, TensorFlow version and flags."""
    compile_flags, link_flags, version = _flags()
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    for part in [version, *compile_flags, *link_flags]:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/tf_consreg/serving_check` (default `~/.cache/...`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "tf_consreg", "serving_check")


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def compiler() -> Optional[str]:
    """Returns the path of g++, or None when it is not installed."""
    return shutil.which("g++")


def build(out_dir: Optional[str] = None) -> str:
    """Compiles serving_check unless a binary for the same key exists.

    Args:
      out_dir: directory for `<cache key>/serving_check`; default
        `default_cache_dir()`, or the system temp directory when that is not
        writable.

    Returns:
      The path of the executable.

    Raises:
      BuildError: g++ is missing or the build fails (message holds g++'s
        output).
    """
    gxx = compiler()
    if gxx is None:
        raise BuildError("g++ not found on PATH; install g++ to build serving_check")
    if out_dir is None:
        out_dir = default_cache_dir()
        # A read-only home (e.g. a sandboxed test) falls back to the temp directory.
        if not _writable(out_dir):
            out_dir = os.path.join(tempfile.gettempdir(), "tf_consreg_serving_check")
    target_dir = os.path.join(out_dir, cache_key())
    binary = os.path.join(target_dir, BINARY_NAME)
    if os.access(binary, os.X_OK):
        return binary
    os.makedirs(target_dir, exist_ok=True)
    compile_flags, link_flags, _ = _flags()
    # Build beside the target and rename: concurrent builds never see a
    # half-written binary.
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix="." + BINARY_NAME + ".")
    os.close(fd)
    try:
        command = [gxx, "-O2", SOURCE, "-o", tmp, *compile_flags, *link_flags]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(
                f"g++ failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=None, help="cache directory (default: %(default)s)")
    print(build(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
