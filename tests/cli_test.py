"""Tests of tf_consreg.cli: atomic outputs (the one-line errors are tested with each binary)."""

import os
import tempfile
import threading

from absl.testing import absltest

from tf_consreg import cli


class AtomicOutputTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
        self.path = os.path.join(self.dir, "out.txt")

    def test_replaces_only_when_complete(self):
        with cli.atomic_output(self.path) as f:
            f.write("first\n")
        with self.assertRaises(RuntimeError):
            with cli.atomic_output(self.path) as f:
                f.write("half")
                raise RuntimeError("killed")
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "first\n")
        with cli.atomic_output(self.path) as f:
            f.write("second\n")
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "second\n")
        self.assertEqual(os.listdir(self.dir), ["out.txt"])  # No temporary file left.

    def test_without_replace_an_existing_file_is_kept(self):
        with cli.atomic_output(self.path, replace=False) as f:
            f.write("first\n")
        with self.assertRaises(FileExistsError):
            with cli.atomic_output(self.path, replace=False) as f:
                f.write("second\n")
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual(f.read(), "first\n")
        self.assertEqual(os.listdir(self.dir), ["out.txt"])

    def test_without_replace_exactly_one_of_many_writers_creates_the_file(self):
        start, outcomes = threading.Barrier(8), []

        def create(i):
            start.wait()
            try:
                with cli.atomic_output(self.path, replace=False) as f:
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


if __name__ == "__main__":
    absltest.main()
