"""The exported smoothed classifier under concurrent load, in Python and through TensorFlow's C++ loader.

TF Serving answers many requests at once from one loaded SavedModel. This
module sends such a load to an export of `export_smoothed` and checks every
answer:

    config = LoadConfig(threads=4, requests=200, seconds=60, batch_sizes=(1, 8))
    summary = run_python_load(export_dir, images, config)   # tf.saved_model.load + threads
    summary = run_cpp_load(binary, export_dir, images, config)  # tools/serving_check --load

`images` is a pool, float32 [N, H, W, C] in [0, 1]: each request draws its
batch from it, and a `certify_radius` request asks each image a radius
uniform in (0, max_radius]. Both paths run in this machine's processes and
open no network port: the Python path calls the loaded signatures from
threads, and the C++ path (tools/serving_check, built by
tools/serving_check/build.py) runs `Session::Run` from threads on one
`SavedModelBundle`, which is what TF Serving does behind its ports.

Both return the same summary (a dict, the C++ program's JSON line):
`requests`, `images`, `seconds`, `requests_per_second`, `images_per_second`,
`latency_ms` (count, p50, p95, p99, max; per signature and "all"),
`latency_ms_by_batch`, `rss_kb_after_warmup`, `rss_kb_end`, `peak_rss_kb`
(VmHWM, reset once the model has loaded if the kernel allows: `peak_rss_since`),
`timeline` (every `sample_seconds`: t, rss_kb, requests done, p50_ms and
p99_ms of the requests that ended in the interval), `errors` (failed
requests) and `wrong_answers` (answers that break the contract; the Python
path checks with `serving_client.check_answer`), both counting the warm-up
too (`warmup_failures` counts its share), `first_error` and
`first_wrong_answer`. Percentiles are nearest-rank.
"""

import dataclasses
import json
import math
import os
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_consreg import errors
from tf_consreg import serving_client
from tf_consreg.signatures import CERTIFY_RADIUS_SIGNATURE
from tf_consreg.signatures import INPUT_KEY
from tf_consreg.signatures import METADATA_SIGNATURE
from tf_consreg.signatures import PREDICT_SIGNATURE
from tf_consreg.signatures import RADIUS_KEY
from tf_consreg.signatures import SERVING_SIGNATURE

SIGNATURES = (SERVING_SIGNATURE, CERTIFY_RADIUS_SIGNATURE, PREDICT_SIGNATURE)


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """One load run: who sends what, and for how long.

    Attributes:
      threads: concurrent senders, all on one loaded model.
      requests: requests per thread (the count bound).
      seconds: no request starts after this many seconds (the time bound).
      signatures: the signatures mixed; each request picks one uniformly.
      batch_sizes: images per request; each request picks one uniformly.
      seed: seeds what each thread picks (signature, batch size, images,
        radii); the model's own noise is the export's business.
      warmup: before the timed run, every thread sends every (signature,
        batch size) this many times, all at once, so that the allocator has
        seen the concurrent peak before RSS is measured.
      max_radius: certify_radius asks radii uniform in (0, max_radius];
        None: twice the export's sigma.
      sample_seconds: the interval of the RSS and latency timeline.
    """

    threads: int = 1
    requests: int = 10
    seconds: float = 60.0
    signatures: Tuple[str, ...] = SIGNATURES
    batch_sizes: Tuple[int, ...] = (1,)
    seed: int = 0
    warmup: int = 1
    max_radius: Optional[float] = None
    sample_seconds: float = 1.0

    def __post_init__(self):
        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        def positive_number(value):
            return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0)

        errors.check(positive_int(self.threads), f"--threads: {self.threads!r} is not an integer >= 1")
        errors.check(positive_int(self.requests), f"--requests: {self.requests!r} is not an integer >= 1")
        errors.check(positive_number(self.seconds), f"--seconds: {self.seconds!r} is not a number > 0")
        signatures = tuple(self.signatures)
        errors.check(bool(signatures) and all(s in SIGNATURES for s in signatures),
                     f"--signatures: {list(signatures)!r} must be some of {', '.join(SIGNATURES)}")
        object.__setattr__(self, "signatures", signatures)
        batch_sizes = tuple(self.batch_sizes)
        errors.check(bool(batch_sizes) and all(positive_int(b) for b in batch_sizes),
                     f"--batch_sizes: {list(batch_sizes)!r} must be integers >= 1")
        object.__setattr__(self, "batch_sizes", batch_sizes)
        errors.check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                     f"--seed: {self.seed!r} is not an integer >= 0")
        errors.check(isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and self.warmup >= 0,
                     f"--warmup: {self.warmup!r} is not an integer >= 0")
        errors.check(self.max_radius is None or positive_number(self.max_radius),
                     f"--max_radius: {self.max_radius!r} is not a number > 0")
        errors.check(positive_number(self.sample_seconds),
                     f"--sample_seconds: {self.sample_seconds!r} is not a number > 0")


def _pool(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.float32 or images.ndim != 4 or len(images) == 0:
        raise errors.ConfigError(f"images: the pool must be float32 [N, H, W, C] with N >= 1, got "
                                 f"{images.dtype} {list(images.shape)}")
    return images


def _check_pool(pool: np.ndarray, contract: serving_client.Contract) -> None:
    """Refuses a pool that the export's input contract refuses (a grid export: pixels off the 8-bit grid).

    Every request would fail otherwise, and the run would measure error paths.

    Raises:
      ConfigError: naming the first bad pixel.
    """
    try:
        serving_client.check_images(pool, contract)
    except ValueError as e:
        raise errors.ConfigError(f"images: the pool breaks the export's input contract: {e}") from None


def status_kb(field: str) -> Optional[int]:
    """`field` (VmRSS, VmHWM, ...) of /proc/self/status in kB; None where /proc is not Linux's."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile q in (0, 100] of ascending `sorted_values` (the C++ program's rule)."""
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


def latency_summary(seconds: Sequence[float]) -> Dict[str, float]:
    """count, p50, p95, p99 and max in milliseconds of request latencies in seconds."""
    if not seconds:
        return {"count": 0}
    ordered = sorted(seconds)
    return {"count": len(ordered), **{f"p{q}": 1000 * percentile(ordered, q) for q in (50, 95, 99)},
            "max": 1000 * ordered[-1]}


@dataclasses.dataclass(frozen=True)
class _Record:
    end: float  # seconds since the timed run started
    latency: float  # seconds
    signature: str
    batch_size: int


def _summary(records: List[_Record], wall: float, threads: int, samples: List[Tuple[float, Optional[int], int]],
             signatures: Sequence[str], batch_sizes: Sequence[int]) -> Dict[str, Any]:
    """The summary's throughput, latency and timeline fields (the C++ program computes the same)."""
    images = sum(r.batch_size for r in records)
    latency = {"all": latency_summary([r.latency for r in records])}
    for name in dict.fromkeys(signatures):
        latency[name] = latency_summary([r.latency for r in records if r.signature == name])
    by_batch = {str(b): latency_summary([r.latency for r in records if r.batch_size == b])
                for b in dict.fromkeys(batch_sizes)}
    timeline = []
    previous = -1.0
    for t, rss, done in samples:
        point = {"t": t, "rss_kb": rss, "requests": done}
        window = sorted(r.latency for r in records if previous < r.end <= t)
        if window:
            point.update(p50_ms=1000 * percentile(window, 50), p99_ms=1000 * percentile(window, 99))
        timeline.append(point)
        previous = t
    return {"threads": threads, "requests": len(records), "images": images, "seconds": wall,
            "requests_per_second": len(records) / wall, "images_per_second": images / wall,
            "latency_ms": latency, "latency_ms_by_batch": by_batch, "timeline": timeline}


class _Tally:
    """Failed requests and wrong answers, counted across threads, with the first message of each."""

    def __init__(self):
        self._lock = threading.Lock()
        self.errors = 0
        self.wrong = 0
        self.first_error = ""
        self.first_wrong = ""

    def error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.first_error = self.first_error or message

    def wrong_answer(self, message: str) -> None:
        with self._lock:
            self.wrong += 1
            self.first_wrong = self.first_wrong or message


def _metadata(loaded) -> Dict[str, Any]:
    """The `metadata` signature of a loaded export as plain Python values."""
    values = {}
    for key, tensor in loaded.signatures[METADATA_SIGNATURE]().items():
        value = np.asarray(tensor.numpy()).tolist()  # A scalar string's numpy() is bytes.
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        values[key] = value
    return values


def run_python_load(export_dir: str, images, config: LoadConfig) -> Dict[str, Any]:
    """Sends `config`'s load to the export through `tf.saved_model.load`, from threads.

    The model is loaded once and its signatures are called concurrently, as a
    Python service or a notebook with a thread pool does. Each answer is
    checked with `serving_client.check_answer` against the contract of the
    export's `metadata` signature.

    Args:
      export_dir: a SavedModel written by `export_smoothed`.
      images: the pool, float32 [N, H, W, C] in [0, 1].
      config: the load.

    Returns:
      The summary described in the module docstring, with "path": "python".

    Raises:
      ConfigError: the pool is not float32 [N, H, W, C], or breaks the
        export's input contract (a grid export: a pixel off the 8-bit grid).
      ContractError: the export's metadata lacks num_classes, stages or sigma.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    pool = _pool(images)
    loaded = tf.saved_model.load(export_dir)
    contract = serving_client.Contract.from_metadata(_metadata(loaded))
    _check_pool(pool, contract)
    max_radius = config.max_radius if config.max_radius is not None else 2 * contract.sigma
    functions = {name: loaded.signatures[name] for name in config.signatures}
    peak_reset = reset_peak_rss()
    tally = _Tally()

    def request(rng: np.random.Generator, signature: str, batch_size: int) -> float:
        inputs = {INPUT_KEY: pool[rng.integers(0, len(pool), size=batch_size)]}
        if signature == CERTIFY_RADIUS_SIGNATURE:
            # (0, max_radius]: 1 - U with U uniform in [0, 1).
            inputs[RADIUS_KEY] = ((1.0 - rng.random(batch_size)) * max_radius).astype(np.float32)
        feeds = {key: tf.constant(value) for key, value in inputs.items()}
        start = time.perf_counter()
        try:
            outputs = {key: value.numpy() for key, value in functions[signature](**feeds).items()}
        except tf.errors.OpError as e:
            tally.error(f"{signature}: {e.message.splitlines()[0] if e.message else type(e).__name__}")
            return time.perf_counter() - start
        latency = time.perf_counter() - start
        try:
            serving_client.check_answer(signature, outputs, batch_size, contract, radius=inputs.get(RADIUS_KEY))
        except serving_client.ContractError as e:
            tally.wrong_answer(f"{signature} (batch {batch_size}): {e}")
        return latency

    def warm(thread: int) -> None:
        rng = np.random.default_rng([config.seed, thread, 1])
        for _ in range(config.warmup):
            for signature in config.signatures:
                for batch_size in config.batch_sizes:
                    request(rng, signature, batch_size)

    _run_threads(warm, config.threads)
    warmup_failures = tally.errors + tally.wrong
    rss_after_warmup = status_kb("VmRSS")

    records: List[List[_Record]] = [[] for _ in range(config.threads)]
    done = [0] * config.threads
    start = time.perf_counter()

    def send(thread: int) -> None:
        rng = np.random.default_rng([config.seed, thread, 0])
        for _ in range(config.requests):
            if time.perf_counter() - start >= config.seconds:
                break
            signature = config.signatures[rng.integers(len(config.signatures))]
            batch_size = int(config.batch_sizes[rng.integers(len(config.batch_sizes))])
            latency = request(rng, signature, batch_size)
            records[thread].append(_Record(time.perf_counter() - start, latency, signature, batch_size))
            done[thread] += 1

    samples = _run_threads(send, config.threads, sampler=(start, config.sample_seconds, rss_after_warmup,
                                                          lambda: sum(done)))
    wall = time.perf_counter() - start
    summary = {"path": "python",
               **_summary([r for part in records for r in part], wall, config.threads, samples,
                          config.signatures, config.batch_sizes),
               "rss_kb_after_warmup": rss_after_warmup, "rss_kb_end": samples[-1][1],
               "peak_rss_kb": status_kb("VmHWM"), "peak_rss_since": "model loaded" if peak_reset else "process start",
               "errors": tally.errors, "wrong_answers": tally.wrong, "warmup_failures": warmup_failures,
               "first_error": tally.first_error, "first_wrong_answer": tally.first_wrong}
    return summary


def _run_threads(work: Callable[[int], None], threads: int,
                 sampler: Optional[Tuple[float, float, Optional[int], Callable[[], int]]] = None
                 ) -> List[Tuple[float, Optional[int], int]]:
    """Runs work(0..threads-1) in threads; with `sampler`, samples (t, VmRSS, requests done) meanwhile.

    `sampler` is (start, interval, RSS at t = 0, requests done so far). The
    last sample is taken after every thread has finished. An exception in a
    thread is raised here once all have stopped.
    """
    failures: List[BaseException] = []

    def guarded(thread: int) -> None:
        try:
            work(thread)
        except BaseException as e:  # pylint: disable=broad-except  # re-raised below
            failures.append(e)

    workers = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in range(threads)]
    for worker in workers:
        worker.start()
    samples: List[Tuple[float, Optional[int], int]] = []
    if sampler is not None:
        start, interval, rss0, done = sampler
        samples.append((0.0, rss0, 0))
        following = interval
        while any(worker.is_alive() for worker in workers):
            time.sleep(0.02)
            now = time.perf_counter() - start
            if now >= following:
                samples.append((now, status_kb("VmRSS"), done()))
                following += interval
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    if sampler is not None:
        samples.append((time.perf_counter() - sampler[0], status_kb("VmRSS"), sampler[3]()))
    return samples


def run_cpp_load(binary: str, export_dir: str, images, config: LoadConfig, *, timeout: Optional[float] = None,
                 nice: int = 0) -> Dict[str, Any]:
    """Sends `config`'s load through TensorFlow's C++ loader: `tools/serving_check --load`.

    Args:
      binary: the serving_check executable (tools/serving_check/build.py builds it).
      export_dir: a SavedModel written by `export_smoothed`.
      images: the pool, float32 [N, H, W, C] in [0, 1].
      config: the load.
      timeout: seconds to wait for the program; None: config.seconds plus 10 minutes for loading and warm-up.
      nice: niceness added to the program's (os.nice), for a shared machine.

    Returns:
      The program's summary (module docstring), with "path": "c++".

    Raises:
      ConfigError: the pool is not float32 [N, H, W, C], or breaks the
        export's input contract (read from its metadata file,
        `assets.extra/smoothing_metadata.json`; a SavedModel without one,
        which the program can still load, is sent the pool as it is).
      RuntimeError: the program failed; the message holds its last stderr line.
    """
    from tf_consreg import export  # pylint: disable=import-outside-toplevel

    pool = _pool(images)
    if os.path.isfile(os.path.join(export_dir, export.ASSETS_EXTRA, export.METADATA_FILE)):
        _check_pool(pool, serving_client.Contract.from_metadata(export.read_metadata(export_dir)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.f32")
        pool.astype("<f4").tofile(path)
        command = [binary, "--load", f"--saved_model_dir={export_dir}", f"--images={path}",
                   f"--shape={','.join(map(str, pool.shape))}", f"--threads={config.threads}",
                   f"--requests={config.requests}", f"--seconds={config.seconds!r}",
                   f"--signatures={','.join(config.signatures)}",
                   f"--batch_sizes={','.join(map(str, config.batch_sizes))}", f"--seed={config.seed}",
                   f"--warmup={config.warmup}", f"--sample_seconds={config.sample_seconds!r}"]
        if config.max_radius is not None:
            command.append(f"--max_radius={config.max_radius!r}")
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                timeout=config.seconds + 600 if timeout is None else timeout,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("serving_check: error")]
        last = lines[-1] if lines else (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"serving_check --load failed ({result.returncode}): {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])
