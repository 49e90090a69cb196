"""Tests of tf_consreg.files: atomic outputs, file digests and run directories."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
from unittest import mock
import unittest

from absl.testing import absltest

import mounts  # tests/mounts.py
from tf_consreg import files
from tf_consreg.errors import ConfigError


class AtomicOutputTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        self.path = os.path.join(self.dir, "out.txt")

    def test_replaces_only_when_complete(self):
        with files.atomic_output(self.path) as f:
            f.write("first\n")
        with self.assertRaises(RuntimeError):
            with files.atomic_output(self.path) as f:
                f.write("half")
                raise RuntimeError("killed")
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "first\n")
        with files.atomic_output(self.path) as f:
            f.write("second\n")
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "second\n")
        self.assertEqual(os.listdir(self.dir), ["out.txt"])  # No temporary file left.

    def test_without_replace_an_existing_file_is_kept(self):
        with files.atomic_output(self.path, replace=False) as f:
            f.write("first\n")
        with self.assertRaises(FileExistsError):
            with files.atomic_output(self.path, replace=False) as f:
                f.write("second\n")
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "first\n")
        self.assertEqual(os.listdir(self.dir), ["out.txt"])

    def test_without_replace_exactly_one_of_many_writers_creates_the_file(self):
        start, outcomes = threading.Barrier(8), []

        def create(i):
            start.wait()
            try:
                with files.atomic_output(self.path, replace=False) as f:
                    f.write(f"writer {i}\n" * 1000)
                outcomes.append(i)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        self.assertLen(outcomes, 1)
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), f"writer {outcomes[0]}\n" * 1000)
        self.assertEqual(os.listdir(self.dir), ["out.txt"])


class CheckOutputPathTest(absltest.TestCase):
    """Each name that cannot become a file is refused in one line naming the flag, before anything is written."""

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        self.file = os.path.join(self.dir, "a_file")
        with open(self.file, "w", encoding="utf-8") as f:
            f.write("x")

    def test_writable_names_pass(self):
        for path in (os.path.join(self.dir, "new.tsv"), self.file, os.path.join(self.dir, "sub", "deeper", "n.tsv")):
            files.check_output_path(path, "output")
        link = os.path.join(self.dir, "link.tsv")
        os.symlink(self.file, link)
        files.check_output_path(link, "output")  # A link to an existing file is that file.

    def test_refused(self):
        dangling = os.path.join(self.dir, "dangling")
        os.symlink(os.path.join(self.dir, "nowhere"), dangling)
        for path, message in (
                (self.dir, f"--output={self.dir} is a directory; give a file name"),
                (dangling, f"--output={dangling} is a symbolic link to {self.dir}/nowhere, which does not exist"),
                (os.path.join(self.file, "x.tsv"), f"--output={self.file}/x.tsv: {self.file} is a file, not a "
                                                   "directory"),
                (os.path.join(self.file, "sub", "x.tsv"), f"{self.file} is a file, not a directory"),
                (os.path.join(dangling, "x.tsv"), f"{dangling} is a symbolic link to {self.dir}/nowhere, which does "
                                                  "not exist, so the file cannot be created there"),
        ):
            with self.assertRaises(ConfigError) as raised:
                files.check_output_path(path, "output")
            self.assertIn(message, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))
        self.assertEqual(sorted(os.listdir(self.dir)), ["a_file", "dangling"])


class CheckWritableTest(absltest.TestCase):
    """An output where nothing can be written is refused before any work, naming the flag and the OS error."""

    def test_a_read_only_mount_is_refused(self):
        with mounts.tmpfs("ro") as read_only:
            if read_only is None:  # No mount here: the OS error that a read-only mount gives, raised by mock.
                read_only = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
                patch = mock.patch.object(files.tempfile, "mkstemp",
                                          side_effect=OSError(errno.EROFS, os.strerror(errno.EROFS)))
            else:
                patch = contextlib.nullcontext()
            with patch:
                for path in (os.path.join(read_only, "out.tsv"), os.path.join(read_only, "new", "dir"), read_only):
                    with self.assertRaisesRegex(ConfigError, rf"^--output={path}: cannot write in {read_only} "
                                                             r"\(Read-only file system\)$"):
                        files.check_writable(path, "output")
                with self.assertRaisesRegex(ConfigError, "Read-only file system"):
                    files.check_output_path(os.path.join(read_only, "out.tsv"), "output")
                with self.assertRaisesRegex(ConfigError, "^--model_dir=.*Read-only file system"):
                    files.check_run_dir(os.path.join(read_only, "run"), "settings.json", lambda there: {},
                                        flag="model_dir", kind="run", resume="")
            self.assertEqual(os.listdir(read_only), [])

    def test_a_writable_place_passes_and_is_left_as_it_was(self):
        directory = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        files.check_writable(os.path.join(directory, "a", "b", "out.tsv"), "output")
        files.check_writable(directory, "output")
        self.assertEqual(os.listdir(directory), [])  # The probe is gone, and no directory was made.

    def test_naming_gives_a_failed_write_its_file(self):
        with self.assertRaises(OSError) as raised:
            with files.naming("/data/out.tsv"), open("/dev/full", "w", encoding="utf-8") as f:
                f.write("x" * 100000)  # /dev/full: ENOSPC, as a full disk; the error names no file.
        self.assertEqual((raised.exception.errno, raised.exception.filename), (errno.ENOSPC, "/data/out.tsv"))
        with self.assertRaises(OSError) as raised:
            with files.naming("/data/out.tsv"):
                open("/nonexistent/x", encoding="utf-8")  # pylint: disable=consider-using-with
        self.assertEqual(raised.exception.filename, "/nonexistent/x")  # Its own name is kept.

    def test_describe_os_error(self):
        self.assertEqual(files.describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/d/x.tsv")),
                         "/d/x.tsv: No space left on device")
        self.assertEqual(files.describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")),
                         "/a -> /b: Invalid cross-device link")


class CheckInputFileTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        self.file = os.path.join(self.dir, "a_file")
        with open(self.file, "w", encoding="utf-8") as f:
            f.write("x\n")

    def assert_refused(self, path, message, **kwargs):
        with self.assertRaises(ConfigError) as raised:
            files.check_input_file(path, "tsv", **kwargs)
        self.assertEqual(str(raised.exception), message)

    def test_a_file_and_a_link_to_one_pass(self):
        link = os.path.join(self.dir, "link")
        os.symlink(self.file, link)
        files.check_input_file(self.file, "tsv")
        files.check_input_file(link, "tsv")

    def test_what_is_not_there(self):
        dangling = os.path.join(self.dir, "dangling")
        os.symlink(os.path.join(self.dir, "nowhere"), dangling)
        missing = os.path.join(self.dir, "missing.tsv")
        self.assert_refused(missing, f"--tsv: {missing} not found")
        self.assert_refused(dangling, f"--tsv: {dangling} is a symbolic link to {self.dir}/nowhere, which does not "
                                      "exist")
        under_file = os.path.join(self.file, "x.tsv")
        self.assert_refused(under_file, f"--tsv: {under_file} not found: a directory on its path is a file")

    def test_what_is_there_but_not_a_file_is_named(self):
        fifo = os.path.join(self.dir, "pipe")
        os.mkfifo(fifo)  # Never opened: opening it for reading would block this test.
        link_to_fifo = os.path.join(self.dir, "link_to_pipe")
        os.symlink(fifo, link_to_fifo)
        # A socket's path holds at most 107 bytes: Bazel's test directories are longer, so /tmp.
        sock_dir = tempfile.mkdtemp(prefix="sock", dir="/tmp")
        self.addCleanup(shutil.rmtree, sock_dir, ignore_errors=True)
        sock_path = os.path.join(sock_dir, "sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(sock_path)
            self.assert_refused(sock_path, f"--tsv: {sock_path} is a socket, not a file")
        self.assert_refused(fifo, f"--tsv: {fifo} is a FIFO (named pipe), not a file")
        self.assert_refused(link_to_fifo, f"--tsv: {link_to_fifo} is a FIFO (named pipe), not a file")
        self.assert_refused("/dev/zero", "--tsv: /dev/zero is a character device, not a file")
        self.assert_refused(self.dir, f"--tsv: {self.dir} is a directory, not a file")
        self.assert_refused(self.dir, f"--tsv: {self.dir} is a directory; give the files in it",
                            directory_hint="give the files in it")

    @unittest.skipIf(os.geteuid() == 0, "root may read any file")
    def test_an_unreadable_file(self):
        os.chmod(self.file, 0)
        self.assert_refused(self.file, f"--tsv: {self.file} is not readable (permission denied)")


class FileSha256Test(absltest.TestCase):

    def test_known_digests(self):
        # FIPS 180-2's example: SHA-256("abc"); and the digest of no bytes.
        directory = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        for content, digest in ((b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
                                (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")):
            path = os.path.join(directory, "f")
            with open(path, "wb") as f:
                f.write(content)
            self.assertEqual(files.file_sha256(path), digest)

    def test_reads_in_blocks(self):
        # 2.5 MiB: three 1 MiB blocks, the last one partial.
        path = os.path.join(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()), "big")
        content = bytes(range(256)) * (10 * 1024)
        with open(path, "wb") as f:
            f.write(content)
        self.assertEqual(files.file_sha256(path), hashlib.sha256(content).hexdigest())


class JsonObjectTest(absltest.TestCase):

    def test_strict_and_lenient_readers(self):
        directory = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        cases = {"object.json": '{"a": [1, 2]}', "list.json": "[1, 2]", "torn.json": '{"a": ', "missing.json": None}
        for name, text in cases.items():
            if text is not None:
                with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                    f.write(text)
        path = lambda name: os.path.join(directory, name)  # pylint: disable=unnecessary-lambda-assignment
        self.assertEqual(files.load_json_object(path("object.json")), {"a": [1, 2]})
        self.assertEqual(files.read_json_object(path("object.json")), {"a": [1, 2]})
        with self.assertRaisesWithLiteralMatch(ConfigError, f"{path('list.json')} holds no JSON object"):
            files.load_json_object(path("list.json"))
        for name in ("torn.json", "missing.json"):
            with self.assertRaisesRegex(ConfigError, f"^{path(name)} is unreadable: "):
                files.load_json_object(path(name))
        for name in ("list.json", "torn.json", "missing.json"):
            self.assertIsNone(files.read_json_object(path(name)), name)


class RunDirTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = os.path.join(tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir()), "run")
        self.here = {"lr": 0.1, "epochs": 3}

    def _check(self):
        files.check_run_dir(self.dir, "settings.json",
                            lambda there: files.differences(self.here, there, ignore=("epochs",)),
                            flag="run_dir", kind="run", resume="the same flags to resume")

    def _write(self, name, text):
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, name), "w", encoding="utf-8") as f:
            f.write(text)

    def test_new_empty_and_same_run_pass(self):
        self._check()  # Not there yet.
        os.makedirs(self.dir)
        self._check()  # Empty.
        self._write("settings.json", json.dumps({"lr": 0.1, "epochs": 1}))
        self._check()  # The same run, with other epochs.

    def test_another_run_is_refused_naming_what_differs(self):
        self._write("settings.json", json.dumps({"lr": 0.5, "seed": 2}))
        with self.assertRaisesRegex(ConfigError, r"^--run_dir=.*/run holds a different run \(--lr: 0.1 here, 0.5 "
                                                 r"there; --seed: None here, 2 there\); use a new --run_dir, or "
                                                 r"the same flags to resume$"):
            self._check()

    def test_other_files_unreadable_settings_and_a_file_are_refused(self):
        self._write("notes.txt", "")
        with self.assertRaisesRegex(ConfigError, "is not empty and holds no settings.json"):
            self._check()
        self._write("settings.json", "{")
        with self.assertRaisesRegex(ConfigError, "settings.json is unreadable"):
            self._check()
        self._write("settings.json", "[0.1, 3]")  # JSON, but no settings to compare.
        with self.assertRaisesWithLiteralMatch(ConfigError,
                                               f"{os.path.join(self.dir, 'settings.json')} holds no JSON object"):
            self._check()
        self.dir = os.path.join(self.dir, "notes.txt")
        with self.assertRaisesRegex(ConfigError, "exists and is not a directory"):
            self._check()


if __name__ == "__main__":
    absltest.main()
