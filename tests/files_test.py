"""Tests of tf_consreg.files: atomic outputs and file digests."""

import hashlib
import os
import tempfile
import threading

from absl.testing import absltest

from tf_consreg import files


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


if __name__ == "__main__":
    absltest.main()
