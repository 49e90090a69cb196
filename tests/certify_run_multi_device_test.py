"""The certification run under --strategy=mirrored: each example's samples split across 2 logical CPU devices.

conftest.py makes the 2 devices. The rows differ from a one-device run's
(other noise), so they are checked against themselves: reproducible, resumed,
sharded, and refused when resumed with another strategy.
"""

import json

import tensorflow as tf

from certify_run_test import RunFixture, make_nearest_mean_model, read_rows, without_time
from tf_consreg import certify_log
from tf_consreg import certify_run
from tf_consreg.errors import ConfigError


class MirroredCertifyDatasetTest(RunFixture, tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = make_nearest_mean_model(cls.dir)
        cls.config = dict(model=cls.model, dataset="fashion_mnist", sigma=0.25, n0=10, n=101, batch_size=200,
                          alpha=0.001, max=6, strategy="mirrored")

    def test_settings_reproducible_rows_and_resume(self):
        output = self._output()
        self.assertEqual(certify_run.certify_dataset(self._config(output, max=3), verbose=0), 3)
        with open(output + certify_log.SETTINGS_SUFFIX, encoding="utf-8") as f:
            settings = json.load(f)
        self.assertEqual((settings["strategy"], settings["replicas"]), ("mirrored", 2))
        self.assertEqual(certify_run.certify_dataset(self._config(output), verbose=0), 3)
        rows = without_time(read_rows(output)[1])
        self.assertEqual([r[0] for r in rows], ["0", "1", "2", "3", "4", "5"])
        self.assertGreater(max(float(r[3]) for r in rows), 0.2)  # Certifies, not only abstains.

        again = self._output()
        certify_run.certify_dataset(self._config(again), verbose=0)
        self.assertEqual(without_time(read_rows(again)[1]), rows)
        # Shards of a mirrored run are its rows too.
        shard = self._output()
        certify_run.certify_dataset(self._config(shard, num_shards=2, shard_index=1), verbose=0)
        self.assertEqual(without_time(read_rows(shard)[1]), rows[1::2])

        with self.assertRaisesRegex(ConfigError, "replicas: 2 there, 1 now; strategy: 'mirrored' there, "
                                    "'default' now"):
            certify_run.certify_dataset(self._config(output, max=8, strategy="default"), verbose=0)


if __name__ == "__main__":
    tf.test.main()
