"""The export under concurrent load: a short load and a mini-soak, in Python and through the C++ loader.

tf_consreg.serving_load sends mixed signatures and batch sizes from several
threads to one loaded export and checks every answer. The C++ path runs
tools/serving_check --load (TensorFlow's LoadSavedModel + Session::Run, what
TF Serving runs); it is skipped only when g++ is missing, as in
serving_check_test.py. The ten-minute soak is bench/serving_load_bench.py;
these runs last seconds. Each request's work and memory are bounded: a
request of more than the export's max_batch images is refused at once, and
no tensor of a request grows beyond one chunk of noisy copies.
"""

import os
import subprocess
import tempfile

from absl.testing import parameterized
import numpy as np
from scipy import stats as scipy_stats
import tensorflow as tf

from export_test import images_at_margins  # tests/ is on sys.path under pytest
from export_test import linear_model
from serving_check_test import _load_build_module
from tf_consreg import errors
from tf_consreg import export
from tf_consreg import serving_load
from tf_consreg.certify_spec import CertifySpec

SIGMA = 0.25
# The soak criterion: RSS after warm-up grows by less than 5%.
RSS_GROWTH = 0.05
# The load tests' export refuses requests of more images than this (their batches hold at most 5).
MAX_BATCH = 5


def export_linear(export_dir: str, spec: CertifySpec = CertifySpec(
        sigma=SIGMA, n0=50, n=600, alpha=0.001, batch_size=600, stages=(100, 300, 600),
        noise="float")) -> dict:  # Random float images: only float noise takes them.
    """A two-class linear export of `spec` with fresh noise per request and max_batch MAX_BATCH.

    The one call of `export_smoothed` in this file, so that a change of its
    argument list is adapted here only. The grey image (all pixels 0.5) lies
    on the model's hyperplane: P(class 0) = 1/2 under noise.

    Returns:
      The model's weights w and bias b.
    """
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 4, 1)) * 0.25
    b = -float(np.sum(w)) * 0.5
    export.export_smoothed(linear_model(w, b), export_dir, spec, num_classes=2, max_batch=MAX_BATCH)
    return {"w": w, "b": b}


def pool_of_images(w, b) -> np.ndarray:
    """Images whose class-0 probability under noise spans (0, 1), 0.5 included: every kind of answer occurs.

    The linear model's P(class 0) is Phi(margin / sigma) (export_test.linear_model), so these
    margins give certified images of both classes, abstentions and staged stops at every stage.
    """
    p_class0 = np.array([0.97, 0.9, 0.75, 0.6, 0.52, 0.5, 0.48, 0.4, 0.25, 0.1, 0.03])
    return images_at_margins(w, b, SIGMA * scipy_stats.norm.ppf(p_class0), np.random.default_rng(5))


class LoadConfigTest(parameterized.TestCase):

    @parameterized.parameters(
        ({"threads": 0}, "--threads"),
        ({"requests": 1.5}, "--requests"),
        ({"seconds": float("inf")}, "--seconds"),
        ({"signatures": ("metadata",)}, "--signatures"),
        ({"signatures": ()}, "--signatures"),
        ({"batch_sizes": (1, 0)}, "--batch_sizes"),
        ({"seed": -1}, "--seed"),
        ({"warmup": -1}, "--warmup"),
        ({"max_radius": 0.0}, "--max_radius"),
        ({"sample_seconds": float("nan")}, "--sample_seconds"),
    )
    def test_bad_fields_name_the_flag(self, fields, flag):
        with self.assertRaisesRegex(errors.ConfigError, "^" + flag):
            serving_load.LoadConfig(**fields)

    def test_percentiles_are_nearest_rank(self):
        # numpy's "inverted_cdf" method is the nearest-rank definition: an independent reference.
        values = np.random.default_rng(0).exponential(size=37)
        for q in (1, 50, 95, 99, 100):
            self.assertEqual(serving_load.percentile(sorted(values), q),
                             np.percentile(values, q, method="inverted_cdf"))

    def test_the_pool_must_be_float32_images(self):
        with self.assertRaisesRegex(errors.ConfigError, "^images: "):
            serving_load.run_python_load("/nonexistent", np.zeros((3, 4, 4), np.float32), serving_load.LoadConfig())


class ServingLoadTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.export_dir = os.path.join(cls._tmp.name, "linear")
        weights = export_linear(cls.export_dir)
        cls.pool = pool_of_images(weights["w"], weights["b"])
        build = _load_build_module()
        cls.binary = build.build() if build.compiler() is not None else None

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    def _run(self, path, config):
        if path == "python":
            return serving_load.run_python_load(self.export_dir, self.pool, config)
        if self.binary is None:
            self.skipTest("g++ not found on PATH: cannot build tools/serving_check")
        return serving_load.run_cpp_load(self.binary, self.export_dir, self.pool, config)

    def _assert_every_answer_right(self, summary):
        self.assertEqual(summary["errors"], 0, summary["first_error"])
        self.assertEqual(summary["wrong_answers"], 0, summary["first_wrong_answer"])
        self.assertEqual(summary["warmup_failures"], 0)

    @parameterized.parameters("python", "c++")
    def test_short_load_answers_every_request_rightly(self, path):
        # The count bound ends this run (60 s is far beyond 3 x 30 small requests).
        config = serving_load.LoadConfig(threads=3, requests=30, seconds=60, batch_sizes=(1, 5), seed=1)
        summary = self._run(path, config)
        self._assert_every_answer_right(summary)
        self.assertEqual(summary["path"], path)
        self.assertEqual(summary["requests"], 90)
        by_signature = summary["latency_ms"]
        self.assertEqual(sum(by_signature[s]["count"] for s in serving_load.SIGNATURES), 90)
        self.assertEqual(by_signature["all"]["count"], 90)
        for name in ("all", *serving_load.SIGNATURES):
            latency = by_signature[name]
            # 90 requests over 3 signatures picked uniformly: each gets >= 1 except with probability 3 (2/3)^90.
            self.assertGreater(latency["count"], 0, name)
            self.assertTrue(0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"], latency)
        batches = summary["latency_ms_by_batch"]
        self.assertEqual(batches["1"]["count"] + batches["5"]["count"], 90)
        self.assertEqual(summary["images"], batches["1"]["count"] + 5 * batches["5"]["count"])
        self.assertAlmostEqual(summary["requests_per_second"] * summary["seconds"], 90, delta=90 * 1e-5)
        self.assertGreater(summary["peak_rss_kb"], 0)
        self.assertGreaterEqual(summary["peak_rss_kb"], summary["rss_kb_after_warmup"])
        self.assertEqual(summary["timeline"][-1]["requests"], 90)

    @parameterized.parameters("python", "c++")
    def test_mini_soak_keeps_memory_flat(self, path):
        # The time bound ends this run: 4 s, sampled every 0.5 s.
        config = serving_load.LoadConfig(threads=2, requests=10 ** 6, seconds=4, batch_sizes=(1, 4), seed=2,
                                         warmup=2, sample_seconds=0.5)
        summary = self._run(path, config)
        self._assert_every_answer_right(summary)
        self.assertLess(summary["requests"], 2 * 10 ** 6)
        self.assertGreaterEqual(summary["seconds"], 4)
        timeline = summary["timeline"]
        # Samples at 0, every 0.5 s until the threads stop (>= 4 s), and once after: at least 9.
        self.assertGreaterEqual(len(timeline), 9)
        times = [point["t"] for point in timeline]
        self.assertEqual(times, sorted(times))
        self.assertEqual([p["requests"] for p in timeline], sorted(p["requests"] for p in timeline))
        self.assertEqual(timeline[-1]["requests"], summary["requests"])
        # Every request ended in exactly one interval of the timeline.
        self.assertTrue(any("p50_ms" in point for point in timeline))
        # RSS after warm-up may grow by less than 5% (the soak criterion). The warm-up ran every
        # (signature, batch size) from both threads at once, so the allocator already holds the concurrent
        # peak; what a request needs beyond it is its tensors: 2 threads x 4 images x 650 noisy copies
        # (n0 + n, batched by 600) x 16 float32 pixels, a few hundred kB, while 5% of the RSS of a process
        # that holds TensorFlow is over 10 MB. A leak of >= 10 MB in 4 s (tens of kB per request) fails.
        rss0, rss1 = summary["rss_kb_after_warmup"], summary["rss_kb_end"]
        self.assertLess(rss1, rss0 * (1 + RSS_GROWTH), f"RSS grew from {rss0} kB to {rss1} kB")
        self.assertGreater(rss0, 10 * 1024 / RSS_GROWTH)  # The premise above: 5% of RSS is > 10 MB.

    def test_a_request_over_max_batch_is_refused_before_anything_else(self):
        loaded = tf.saved_model.load(self.export_dir)
        self.assertEqual(int(loaded.signatures["metadata"]()["max_batch"]), MAX_BATCH)
        self.assertEqual(export.read_metadata(self.export_dir)["max_batch"], MAX_BATCH)
        # NaN pixels and radii would fail the later checks: the batch size is checked first, from the shape alone.
        images = tf.fill([MAX_BATCH + 1, 4, 4, 1], float("nan"))
        message = (rf"images must be at most max_batch = {MAX_BATCH} per request \(split a larger request\); "
                   rf"got a batch of\] \[{MAX_BATCH + 1}\]")
        for name in serving_load.SIGNATURES:
            inputs = {"images": images}
            if name == "certify_radius":
                inputs["radius"] = tf.fill([MAX_BATCH + 1], float("nan"))
            with self.subTest(signature=name):
                with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message):
                    loaded.signatures[name](**inputs)
        # The maximum itself is served.
        answer = loaded.signatures["predict"](images=tf.constant(self.pool[:MAX_BATCH]))
        self.assertEqual(answer["class"].shape, (MAX_BATCH,))

    @parameterized.parameters("python", "c++")
    def test_a_load_over_max_batch_counts_errors_naming_both_sizes(self, path):
        config = serving_load.LoadConfig(threads=1, requests=2, warmup=1, batch_sizes=(MAX_BATCH + 1,))
        summary = self._run(path, config)
        # The warm-up's 3 requests (one per signature) and the 2 timed ones: every one refused, none answered.
        self.assertEqual(summary["errors"], 5)
        self.assertEqual(summary["warmup_failures"], 3)
        self.assertEqual(summary["wrong_answers"], 0)
        self.assertRegex(summary["first_error"].splitlines()[0],
                         rf"^(serving_default|certify_radius|predict): assertion failed: \[images must be at most "
                         rf"max_batch = {MAX_BATCH} per request .*; got a batch of\] \[{MAX_BATCH + 1}\]$")

    def test_cpp_bad_load_flags_fail_with_one_line(self):
        if self.binary is None:
            self.skipTest("g++ not found on PATH: cannot build tools/serving_check")
        path = os.path.join(self._tmp.name, "pool.f32")
        self.pool.astype("<f4").tofile(path)
        common = [self.binary, "--load", f"--saved_model_dir={self.export_dir}"]
        with_pool = [*common, f"--images={path}", f"--shape={','.join(map(str, self.pool.shape))}"]
        cases = {
            "no pool": (common, "--load needs --images and --shape=N,H,W,C (the pool of images)"),
            "threads": ([*with_pool, "--threads=0"], "--threads: expected an integer >= 1, got '0'"),
            "seconds": ([*with_pool, "--seconds=soon"], "--seconds: expected a number > 0, got 'soon'"),
            "batch": ([*with_pool, "--batch_sizes=1,2.5"], "--batch_sizes: expected an integer >= 1, got '2.5'"),
            "signature": ([*with_pool, "--signatures=predict,metadata"],
                          "--signatures: 'metadata' is not one of serving_default, certify_radius, predict"),
        }
        for name, (command, message) in cases.items():
            with self.subTest(case=name):
                result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
                self.assertEqual(result.returncode, 1)
                self.assertEqual(result.stdout, "")
                self.assertEqual(result.stderr.strip().splitlines()[-1], "serving_check: error: " + message)


def largest_allocation(session: tf.compat.v1.Session, signature: "meta_graph_pb2.SignatureDef",
                       inputs: dict) -> int:
    """Bytes of the largest block any op allocated in one run of `signature`, as TF Serving runs it.

    From the run's step stats (FULL_TRACE), which list every op executed,
    those inside the graph's functions and loop bodies too, with each op's
    largest allocation (`peak_bytes`) and each output's size.
    """
    run_metadata = tf.compat.v1.RunMetadata()
    session.run({key: value.name for key, value in signature.outputs.items()},
                {signature.inputs[key].name: value for key, value in inputs.items()},
                options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                run_metadata=run_metadata)
    largest = 0
    for device in run_metadata.step_stats.dev_stats:
        for node in device.node_stats:
            for memory in node.memory:
                largest = max(largest, memory.peak_bytes)
            for output in node.output:
                largest = max(largest, output.tensor_description.allocation_description.requested_bytes)
    return largest


class MemoryBoundTest(parameterized.TestCase):
    """No tensor of a request grows with B x n: the samples go through the model in chunks of batch_size copies."""

    # n is 8 times batch_size, so one image's samples span 8 chunks, and a request of MAX_BATCH images 40.
    BATCH_SIZE = 300
    N = 2400

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        export_dir = os.path.join(cls._tmp.name, "large_n")
        export_linear(export_dir, CertifySpec(sigma=SIGMA, n0=50, n=cls.N, alpha=0.001, batch_size=cls.BATCH_SIZE,
                                              stages=(100, 300, cls.N), noise="float"))  # Grey 0.5 pixels: off the grid.
        # A graph-mode session over the SavedModel: the runtime TF Serving and the C++ loader use.
        cls.graph = tf.Graph()
        cls.session = tf.compat.v1.Session(graph=cls.graph)
        with cls.graph.as_default():
            cls.signatures = tf.compat.v1.saved_model.load(cls.session, ["serve"], export_dir).signature_def

    @classmethod
    def tearDownClass(cls):
        cls.session.close()
        cls._tmp.cleanup()
        super().tearDownClass()

    @parameterized.parameters(*serving_load.SIGNATURES)
    def test_the_largest_tensor_is_one_chunk_whatever_the_batch(self, name):
        # Grey images lie on the hyperplane (p = 1/2): they abstain, and the staged signatures run every stage
        # to n, the most work a request can ask. A radius of 0.1 cannot be certified at p = 1/2.
        pixels = 4 * 4 * 1
        # The largest tensor of a chunk is its noisy copies, float32 [BATCH_SIZE, 4, 4, 1]; the linear model's
        # other per-copy tensors are smaller (2 logits, an int64 class). Exact byte counts: no tolerance.
        chunk_bytes = self.BATCH_SIZE * pixels * 4
        largest = {}
        for batch in (1, MAX_BATCH):
            inputs = {"images": np.full((batch, 4, 4, 1), 0.5, np.float32)}
            if name == "certify_radius":
                inputs["radius"] = np.full(batch, 0.1, np.float32)
            largest[batch] = largest_allocation(self.session, self.signatures[name], inputs)
        # Drawing a request's samples at once would take MAX_BATCH x N copies: 40 times one chunk.
        self.assertGreaterEqual(MAX_BATCH * self.N * pixels * 4, 40 * chunk_bytes)
        # One image's N samples fill whole chunks; a request of MAX_BATCH images needs no bigger one.
        self.assertEqual(largest, {1: chunk_bytes, MAX_BATCH: chunk_bytes})


def export_contract_breaker(export_dir: str) -> None:
    """A SavedModel with the export's signature names whose every answer breaks one clause of the contract.

    Its metadata says 2 classes, stages (10, 20), sigma 0.25. serving_default answers class 2 (not a class
    of 2); certify_radius certifies at half the radius asked; predict reports 15 samples (not a stage).
    """
    images_spec = tf.TensorSpec([None, 4, 4, 1], tf.float32)

    def ones(images, dtype):
        return tf.ones(tf.shape(images)[:1], dtype)

    class Breaker(tf.Module):

        @tf.function(input_signature=[])
        def metadata(self):
            return {"num_classes": tf.constant(2, tf.int64), "stages": tf.constant([10, 20], tf.int64),
                    "sigma": tf.constant(0.25, tf.float64)}

        @tf.function(input_signature=[images_spec])
        def certify(self, images):
            return {"class": 2 * ones(images, tf.int64), "radius": 0.1 * ones(images, tf.float32),
                    "p_lower": 0.9 * ones(images, tf.float32)}

        @tf.function(input_signature=[images_spec, tf.TensorSpec([None], tf.float32)])
        def certify_radius(self, images, radius):
            return {"class": 0 * ones(images, tf.int64), "certified": ones(images, tf.bool), "radius": radius / 2,
                    "samples": 10 * ones(images, tf.int64)}

        @tf.function(input_signature=[images_spec])
        def predict(self, images):
            return {"class": 0 * ones(images, tf.int64), "samples": 15 * ones(images, tf.int64)}

    module = Breaker()
    tf.saved_model.save(module, export_dir, signatures={
        "metadata": module.metadata, "serving_default": module.certify, "certify_radius": module.certify_radius,
        "predict": module.predict})


class WrongAnswersAreCaughtTest(parameterized.TestCase):
    """Both paths count an answer that breaks its contract as wrong and say which field broke."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        cls.export_dir = os.path.join(cls._tmp.name, "breaker")
        export_contract_breaker(cls.export_dir)
        cls.pool = np.full((3, 4, 4, 1), 0.5, np.float32)
        build = _load_build_module()
        cls.binary = build.build() if build.compiler() is not None else None

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()

    @parameterized.product(path=("python", "c++"),
                           case=(("serving_default", "class"), ("certify_radius", "certified"),
                                 ("predict", "samples")))
    def test_every_broken_answer_is_counted(self, path, case):
        signature, field = case
        config = serving_load.LoadConfig(threads=1, requests=3, warmup=1, signatures=(signature,))
        if path == "python":
            summary = serving_load.run_python_load(self.export_dir, self.pool, config)
        elif self.binary is None:
            self.skipTest("g++ not found on PATH: cannot build tools/serving_check")
        else:
            summary = serving_load.run_cpp_load(self.binary, self.export_dir, self.pool, config)
        self.assertEqual(summary["errors"], 0, summary["first_error"])
        self.assertEqual(summary["requests"], 3)
        # The warm-up request and the 3 timed ones: every answer is wrong.
        self.assertEqual(summary["wrong_answers"], 4)
        self.assertEqual(summary["warmup_failures"], 1)
        self.assertStartsWith(summary["first_wrong_answer"], f"{signature} (batch 1): {field}[0] = ")


if __name__ == "__main__":
    tf.test.main()
