"""Files: written atomically (never half-written, never replaced by accident), identified by digest,
and run directories that hold one run each."""

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from tf_consreg.errors import ConfigError


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w", replace: bool = True) -> Iterator:
    """Writes a file atomically: a temporary file renamed into place on success.

    A failure leaves no partial file at `path`, and an existing file at `path`
    is only replaced once the new content is complete.

    Args:
      path: destination file.
      mode: "w" for text or "wb" for bytes.
      replace: False to never replace an existing `path`: the complete file
        is hard-linked into place, which fails when `path` exists, so of
        several processes creating `path` at once exactly one succeeds.

    Yields:
      The open temporary file.

    Raises:
      FileExistsError: `replace` is False and `path` exists (nothing written).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with naming(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode.
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # Atomic, and never replaces.
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def check_output_path(path: str, flag: str) -> None:
    """Refuses an output file name that cannot be created as a file; reads only.

    Refused, each in one line naming `--<flag>`: a directory, a symbolic
    link to nothing (writing would replace the link or fail half-way), and a
    name under a regular file or a dangling link (its directory cannot exist).

    Raises:
      ConfigError: as above.
    """
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"--{flag}={path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                          "give a file name, or a link to an existing file")
    if os.path.isdir(path):
        raise ConfigError(f"--{flag}={path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        if os.path.islink(parent):
            raise ConfigError(f"--{flag}={path}: {parent} is a symbolic link to {os.readlink(parent)}, which does "
                              "not exist, so the file cannot be created there")
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--{flag}={path}: {parent} is a file, not a directory, so the file cannot be created "
                          "under it")
    check_writable(path, flag)


def check_writable(path: str, flag: str) -> None:
    """Refuses an output (a file or a directory, existing or not) where nothing can be written.

    Creates and removes an empty hidden file in `path` (an existing
    directory) or in the nearest existing directory above it. That is the
    one honest test: permission bits do not tell (root ignores them), and a
    read-only mount (EROFS) or a directory of another user refuses only when
    written. A full disk may still accept an empty file; a failure later in
    the run is reported by `cli.run` as one line naming the path.

    Raises:
      ConfigError: naming `--<flag>`, the directory and the OS error.
    """
    directory = os.path.abspath(path)
    if not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".tf_consreg-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--{flag}={path}: cannot write in {directory} ({e.strerror or e})") from None


# What a path is, by the file type bits of its mode, for the messages of check_input_file.
_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_input_file(path: str, flag: str, directory_hint: str = "") -> None:
    """Refuses an input file name that is not a readable regular file; never opens it.

    Opening a FIFO for reading blocks until a writer comes, and a device
    (/dev/zero) never ends, so the path is judged by `os.stat` alone.
    Refused, each in one line naming `--<flag>` and saying what the path is:
    nothing there (or a symbolic link to nothing), a path under a file, a
    directory, a FIFO, a socket, a device, and a file this process may not read.

    Args:
      path: the input file (a symbolic link is judged by what it points to).
      flag: the flag that named it, for messages.
      directory_hint: appended to the message for a directory (say, which
        files in it to give instead).

    Raises:
      ConfigError: as above.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"--{flag}: {path} is a symbolic link to {os.readlink(path)}, which does not "
                              "exist") from None
        raise ConfigError(f"--{flag}: {path} not found") from None
    except NotADirectoryError:
        raise ConfigError(f"--{flag}: {path} not found: a directory on its path is a file") from None
    except OSError as e:  # Permission denied on a directory of the path, a loop of links, ...
        raise ConfigError(f"--{flag}: {path} cannot be examined: {e.strerror}") from None
    if stat.S_ISREG(mode):
        if not os.access(path, os.R_OK):
            raise ConfigError(f"--{flag}: {path} is not readable (permission denied)")
        return
    kind = next((name for test, name in _FILE_TYPES if test(mode)), f"not a regular file (mode {mode:o})")
    what = f"; {directory_hint}" if stat.S_ISDIR(mode) and directory_hint else ", not a file"
    raise ConfigError(f"--{flag}: {path} is {kind}{what}")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_json_object(path: str) -> Dict[str, Any]:
    """The JSON object in the file `path`, which the caller needs.

    The one reader of the settings files a run writes (train_config.json, a
    search's or run directory's settings).

    Raises:
      ConfigError: the file cannot be read, is not JSON, or holds something
        other than an object (the message names `path`).
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds no JSON object")
    return value


def read_json_object(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in the file `path`; None if it is missing, unreadable or not an object."""
    try:
        return load_json_object(path)
    except ConfigError:
        return None


def differences(here: Mapping[str, Any], there: Mapping[str, Any],
                ignore: Sequence[str] = ()) -> Dict[str, Tuple[Any, Any]]:
    """Settings that differ between two runs: name -> (here, there).

    A name missing on one side counts as None there; names in `ignore` are
    left out.
    """
    names = sorted((set(here) | set(there)) - set(ignore))
    return {name: (here.get(name), there.get(name)) for name in names if here.get(name) != there.get(name)}


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Gives the OSErrors raised inside the file name `path` when they have none.

    A failed write or flush of an open file (ENOSPC, EIO) raises an OSError
    without a file name; the one line `cli.run` prints must name the file.
    """
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from e


# The TensorFlow errors a file write raises for what the OS refused: ENOSPC and
# EDQUOT give RESOURCE_EXHAUSTED, EROFS, EACCES and EPERM PERMISSION_DENIED
# (tsl's ErrnoToCode). Other codes are bugs, not the place written to.
_TF_WRITE_ERRORS = ("ResourceExhaustedError", "PermissionDeniedError")


@contextlib.contextmanager
def naming_tf_write(path: str) -> Iterator[None]:
    """`naming` for writes that TensorFlow makes: its refused writes become OSErrors naming `path`.

    A SavedModel or checkpoint that TensorFlow cannot write raises
    `tf.errors.ResourceExhaustedError` (a full disk) or
    `PermissionDeniedError` (a read-only mount), not OSError; as an OSError
    naming the output the user chose, `cli.run` reports it in one line like
    any other failed write. TensorFlow's message names the file it was
    writing, so it is kept, without the op's decorations.

    Raises:
      OSError: with `filename` `path` and TensorFlow's message, from the
        TensorFlow error.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  # Loaded already by whoever writes with it.
    with naming(path):
        try:
            yield
        except tuple(getattr(tf.errors, name) for name in _TF_WRITE_ERRORS) as e:
            message = re.sub(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]$", "", " ".join(e.message.split()))
            raise OSError(None, message, path) from e


def describe_os_error(error: OSError) -> str:
    """An OSError as one line naming its file: "<path>: <what the OS said>"."""
    what = error.strerror or str(error)
    if error.filename is None:
        return what
    target = f" -> {error.filename2}" if error.filename2 is not None else ""
    return f"{error.filename}{target}: {what}"


def check_run_dir(directory: str, settings_file: str,
                  differences_from: Callable[[Dict[str, Any]], Dict[str, Tuple[Any, Any]]], *, flag: str,
                  kind: str, resume: str) -> None:
    """Refuses a directory that holds something other than this run; reads only.

    A run claims its directory by writing its settings there (the JSON file
    `settings_file`). A directory with that file holds the same run, to
    resume, when the settings do not differ, and another run when they do;
    a directory without it must be empty, or not exist yet.

    Args:
      directory: the run's directory, the value of `--<flag>`.
      settings_file: the name of the settings file in it.
      differences_from: the settings found there -> the ones that differ
        from this run's, name -> (here, there) (see `differences`).
      flag: the directory's flag, for messages.
      kind: what a directory holds ("run", "search"), for messages.
      resume: how to resume instead, for messages ("the same flags to resume").

    Raises:
      ConfigError: `directory` is a file, holds another run, holds unreadable
        settings, or holds other files.
    """
    path = os.path.join(directory, settings_file)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"--{flag}={directory} exists and is not a directory")
    if os.path.isfile(path):
        diff = differences_from(load_json_object(path))
        if diff:
            details = "; ".join(f"--{name}: {new!r} here, {old!r} there" for name, (new, old) in sorted(diff.items()))
            raise ConfigError(f"--{flag}={directory} holds a different {kind} ({details}); use a new --{flag}, "
                              f"or {resume}")
    elif os.path.isdir(directory) and os.listdir(directory):
        raise ConfigError(f"--{flag}={directory} is not empty and holds no {settings_file}; "
                          "use a new or empty directory")
    check_writable(directory, flag)
