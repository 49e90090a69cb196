r"""The exported smoothed classifier under concurrent load: throughput, latency, peak RSS, and a soak.

Exports a model (an untrained LeNet on Fashion-MNIST's shape unless
--model_dir; the cost of a request does not depend on the weights, except
that certify_radius and predict stop earlier on confident images) with fresh
noise per request, then sends it loads through the two loaders:

  c++     tools/serving_check --load: LoadSavedModel + Session::Run from T
          threads on one SavedModelBundle, what TF Serving runs (in-process:
          no network port is opened)
  python  tf_consreg.serving_load.run_python_load: tf.saved_model.load, the
          signatures called from T threads

Every run is its own process (so its RSS is its own) and every answer is
checked against its signature's contract; a run with an error or a wrong
answer is reported as such. It measures:

  1. per signature, at 1, 2 and 4 threads: requests/s, images/s, p50/p99
     latency (--seconds each, --batch_size_load images per request);
  2. per batch size (--rss_batch_sizes), all signatures mixed at
     --rss_threads threads: peak RSS (VmHWM since the model loaded) and the
     RSS after warm-up;
  3. the soak: --soak_seconds (10 minutes) of mixed signatures and batch
     sizes at --soak_threads threads; RSS growth after warm-up (must be < 5%)
     and latency over time, written to <out_dir>/soak_<path>.tsv and plotted
     in <out_dir>/soak.png;
  4. one request at n_max: a second export with --request_n samples (n_max,
     default 100,000) and --max_batch; the peak RSS (VmHWM since the model
     loaded) of a process that loads it and answers one request of B images
     (--request_batch_sizes, default 1 and the export's max_batch), no
     warm-up, per path and signature (serving_default, whose work is fixed
     at B (n0 + n) forward passes, only at B = 1 unless --request_full);
     then a request of max_batch + 1 images, which must be refused.

Everything goes to <out_dir>/serving_load.json too. On a shared machine the
numbers are noisy: the cores other processes used are printed beside each.

  python bench/serving_load_bench.py --out_dir=/tmp/serving_load
  python bench/serving_load_bench.py --paths c++ --soak_seconds=60 --seconds=5
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import measure

_BUILD_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools", "serving_check", "build.py")
_SIGNATURES = ("serving_default", "certify_radius", "predict")
# The soak criterion.
_RSS_GROWTH = 0.05


def _build_binary() -> str:
    spec = importlib.util.spec_from_file_location("serving_check_build", _BUILD_PY)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.build()


def _run(path, binary, export_dir, pool_path, config, nice):
    """One load in its own process; returns (summary, cores other processes used meanwhile)."""
    from tf_consreg import serving_load  # pylint: disable=import-outside-toplevel

    with measure.OtherLoad() as load:
        if path == "c++":
            pool = np.load(pool_path)
            # An hour beyond the time bound: on a loaded machine loading and warm-up alone take many minutes.
            summary = serving_load.run_cpp_load(binary, export_dir, pool, config, nice=nice,
                                                timeout=config.seconds + 3600)
        else:
            command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(
                {"export_dir": export_dir, "pool": pool_path, "config": dataclasses.asdict(config)})]
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    preexec_fn=(lambda: os.nice(nice)) if nice else None)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"python load failed ({result.returncode}): {last}")
            summary = json.loads(result.stdout.strip().splitlines()[-1])
    return summary, load.cores


def _worker(spec: str) -> None:
    """The python path in a process of its own: prints its summary as one JSON line."""
    from tf_consreg import serving_load  # pylint: disable=import-outside-toplevel

    spec = json.loads(spec)
    fields = dict(spec["config"])
    for key in ("signatures", "batch_sizes"):
        fields[key] = tuple(fields[key])
    summary = serving_load.run_python_load(spec["export_dir"], np.load(spec["pool"]),
                                           serving_load.LoadConfig(**fields))
    print(json.dumps(summary))


def _verdict(summary) -> str:
    if summary["errors"] or summary["wrong_answers"] or summary["warmup_failures"]:
        return (f"FAILED: {summary['errors']} errors, {summary['wrong_answers']} wrong answers "
                f"({summary['first_error'] or summary['first_wrong_answer']})")
    return "all answers checked, none wrong"


def _cores(cores) -> str:
    return "unknown" if cores is None else f"{cores:.2f}"


def _plot(soaks, path) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    figure, (rss_axis, latency_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, summary in soaks.items():
        timeline = summary["timeline"]
        t = [p["t"] for p in timeline]
        rss_axis.plot(t, [p["rss_kb"] / 1024 for p in timeline], label=name)
        points = [p for p in timeline if "p50_ms" in p]
        latency_axis.plot([p["t"] for p in points], [p["p50_ms"] for p in points], label=f"{name} p50")
        latency_axis.plot([p["t"] for p in points], [p["p99_ms"] for p in points], "--", label=f"{name} p99")
    rss_axis.set_ylabel("RSS (MiB)")
    rss_axis.legend()
    latency_axis.set_ylabel("latency (ms)")
    latency_axis.set_xlabel("seconds since warm-up")
    latency_axis.set_yscale("log")
    latency_axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def _one_request_section(args, model, num_classes, max_batch, binary, tmp, pool_path):
    """Section 4: the peak RSS of one request at n_max, and the refusal of max_batch + 1 images."""
    from tf_consreg import export  # pylint: disable=import-outside-toplevel
    from tf_consreg.certify_spec import CertifySpec  # pylint: disable=import-outside-toplevel
    from tf_consreg import serving_load  # pylint: disable=import-outside-toplevel

    export_dir = os.path.join(tmp, "export_n_max")
    export.export_smoothed(model, export_dir, CertifySpec(sigma=args.sigma, n0=args.n0, n=args.request_n,
                                                          alpha=args.alpha, batch_size=args.batch_size),
                           num_classes=num_classes, max_batch=max_batch)
    stages = export.read_metadata(export_dir)["stages"]
    batches = list(dict.fromkeys(args.request_batch_sizes or [1, max_batch]))
    print(f"\n4. one request at n_max = {args.request_n} (stages {stages}), max_batch {max_batch}, "
          f"{args.batch_size} noisy copies per forward pass; its own process, no warm-up")
    print("| path | signature | images | RSS after load MiB | peak RSS MiB | latency s | other cores |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for path in args.paths:
        for signature in _SIGNATURES:
            for batch in batches:
                if signature == "serving_default" and batch > 1 and not args.request_full:
                    continue
                config = serving_load.LoadConfig(threads=1, requests=1, seconds=10 ** 6, warmup=0,
                                                 signatures=(signature,), batch_sizes=(batch,))
                summary, cores = _run(path, binary, export_dir, pool_path, config, args.nice)
                rows.append({"path": path, "signature": signature, "batch_size": batch, "other_cores": cores,
                             "summary": summary})
                print(f"| {path} | {signature} | {batch} | {summary['rss_kb_after_warmup'] / 1024:.0f} | "
                      f"{summary['peak_rss_kb'] / 1024:.0f} | {summary['latency_ms']['all']['max'] / 1000:.1f} | "
                      f"{_cores(cores)} |" + ("" if _verdict(summary).startswith("all") else f" {_verdict(summary)}"),
                      flush=True)
    for path in args.paths:
        config = serving_load.LoadConfig(threads=1, requests=1, seconds=10 ** 6, warmup=0,
                                         signatures=("predict",), batch_sizes=(max_batch + 1,))
        summary, _ = _run(path, binary, export_dir, pool_path, config, args.nice)
        refused = summary["errors"] == 1 and "max_batch" in summary["first_error"]
        message = (summary["first_error"].splitlines() or [""])[0]
        print(f"  {path}: a request of {max_batch + 1} images: "
              f"{'refused in ' if refused else 'NOT REFUSED: '}{summary['latency_ms']['all']['max']:.0f} ms: "
              f"{message}")
        rows.append({"path": path, "signature": "predict", "batch_size": max_batch + 1, "refused": refused,
                     "summary": summary})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out_dir", default=os.path.join(tempfile.gettempdir(), "serving_load"))
    parser.add_argument("--model_dir", default=None, help="a training run (default: an untrained LeNet)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch_size", type=int, default=1000, help="noisy copies per forward pass")
    parser.add_argument("--paths", nargs="+", default=["c++", "python"], choices=["c++", "python"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound of each throughput run")
    parser.add_argument("--batch_size_load", type=int, default=1, help="images per request in the throughput runs")
    parser.add_argument("--rss_batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rss_threads", type=int, default=2)
    parser.add_argument("--rss_seconds", type=float, default=20.0)
    parser.add_argument("--soak_seconds", type=float, default=600.0, help="0: no soak")
    parser.add_argument("--soak_paths", nargs="+", default=["c++", "python"], choices=["c++", "python"])
    parser.add_argument("--soak_threads", type=int, default=2)
    parser.add_argument("--soak_batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sample_seconds", type=float, default=10.0, help="soak timeline interval")
    parser.add_argument("--nice", type=int, default=0, help="niceness added to each load's process")
    parser.add_argument("--max_batch", type=int, default=None, help="the exports' max_batch (default: the library's)")
    parser.add_argument("--request_n", type=int, default=100000, help="n (n_max) of the one-request export; 0: skip")
    parser.add_argument("--request_batch_sizes", type=int, nargs="+", default=None,
                        help="images of the one request (default: 1 and max_batch)")
    parser.add_argument("--request_full", action="store_true",
                        help="serving_default at every --request_batch_sizes, not only 1")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--malloc_arena_max", type=int, default=None,
                        help="MALLOC_ARENA_MAX for the loads' processes (glibc's malloc arenas; default: glibc's, "
                             "8 per core)")
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker)
        return
    if args.malloc_arena_max is not None:
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)  # Inherited by every load's process.

    # tf_consreg first: it chooses TF_ENABLE_ONEDNN_OPTS before TensorFlow loads; the loads inherit it.
    from tf_consreg import export  # pylint: disable=import-outside-toplevel
    from tf_consreg.certify_spec import CertifySpec  # pylint: disable=import-outside-toplevel
    from tf_consreg import models  # pylint: disable=import-outside-toplevel
    from tf_consreg import serving_load  # pylint: disable=import-outside-toplevel

    model = (models.load_base_model(args.model_dir) if args.model_dir
             else models.get_architecture("lenet", "fashion_mnist"))
    num_classes = model.outputs[0].shape[-1]
    binary = _build_binary() if "c++" in args.paths + args.soak_paths else None
    max_batch = export.DEFAULT_MAX_BATCH if args.max_batch is None else args.max_batch
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"machine: {measure.machine()}; MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    results = {"machine": measure.machine(), "args": vars(args), "throughput": [], "rss": [], "soak": {}}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "export")
        export.export_smoothed(model, export_dir, CertifySpec(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                                                              batch_size=args.batch_size),
                               num_classes=num_classes, max_batch=max_batch)
        metadata = export.read_metadata(export_dir)
        pool_path = os.path.join(tmp, "pool.npy")
        rng = np.random.default_rng(0)
        # Random 8-bit images, float32(k) / 255: the input contract of the exports' default grid noise.
        pixels = rng.integers(0, 256, size=(256, *model.inputs[0].shape[1:]))
        np.save(pool_path, (pixels.astype(np.float32) / np.float32(255)).astype(np.float32))
        print(f"model {model.name}, n0={args.n0} n={args.n} alpha={args.alpha}, stages {metadata['stages']}, "
              f"{args.batch_size} noisy copies per forward pass, fresh noise per request; random 8-bit images")

        if 1 in args.sections:
            print(f"\n1. throughput and latency, {args.batch_size_load} image(s) per request, {args.seconds:g} s per run")
            print("| path | signature | threads | requests/s | images/s | p50 ms | p99 ms | requests | other cores |")
            print("|---|---|---|---|---|---|---|---|---|")
        for path in args.paths if 1 in args.sections else ():
            for signature in _SIGNATURES:
                for threads in args.threads:
                    config = serving_load.LoadConfig(threads=threads, requests=10 ** 6, seconds=args.seconds,
                                                     signatures=(signature,), batch_sizes=(args.batch_size_load,))
                    summary, cores = _run(path, binary, export_dir, pool_path, config, args.nice)
                    latency = summary["latency_ms"][signature]
                    results["throughput"].append({"path": path, "signature": signature, "threads": threads,
                                                  "other_cores": cores, "summary": summary})
                    print(f"| {path} | {signature} | {threads} | {summary['requests_per_second']:.2f} | "
                          f"{summary['images_per_second']:.2f} | {latency.get('p50', float('nan')):.0f} | "
                          f"{latency.get('p99', float('nan')):.0f} | {summary['requests']} | {_cores(cores)} |"
                          + ("" if _verdict(summary).startswith("all") else f" {_verdict(summary)}"), flush=True)

        if 2 in args.sections:
            print(f"\n2. RSS per batch size, all signatures mixed, {args.rss_threads} threads, {args.rss_seconds:g} s")
            print("| path | images/request | RSS after warm-up MiB | peak RSS MiB | requests | other cores |")
            print("|---|---|---|---|---|---|")
        for path in args.paths if 2 in args.sections else ():
            for batch in args.rss_batch_sizes:
                config = serving_load.LoadConfig(threads=args.rss_threads, requests=10 ** 6, seconds=args.rss_seconds,
                                                 batch_sizes=(batch,))
                summary, cores = _run(path, binary, export_dir, pool_path, config, args.nice)
                results["rss"].append({"path": path, "batch_size": batch, "other_cores": cores, "summary": summary})
                print(f"| {path} | {batch} | {summary['rss_kb_after_warmup'] / 1024:.0f} | "
                      f"{summary['peak_rss_kb'] / 1024:.0f} | {summary['requests']} | {_cores(cores)} |"
                      + ("" if _verdict(summary).startswith("all") else f" {_verdict(summary)}"), flush=True)

        if args.soak_seconds > 0 and 3 in args.sections:
            print(f"\n3. soak: {args.soak_seconds:g} s, {args.soak_threads} threads, all signatures, batch sizes "
                  f"{args.soak_batch_sizes}")
            for path in args.soak_paths:
                config = serving_load.LoadConfig(threads=args.soak_threads, requests=10 ** 9,
                                                 seconds=args.soak_seconds, batch_sizes=tuple(args.soak_batch_sizes),
                                                 sample_seconds=args.sample_seconds)
                summary, cores = _run(path, binary, export_dir, pool_path, config, args.nice)
                results["soak"][path] = {"other_cores": cores, "summary": summary}
                rss0, rss1 = summary["rss_kb_after_warmup"], summary["rss_kb_end"]
                growth = rss1 / rss0 - 1
                windows = [p for p in summary["timeline"] if "p50_ms" in p]
                first, last = windows[0], windows[-1]
                print(f"  {path}: {summary['requests']} requests ({summary['requests_per_second']:.2f}/s), "
                      f"RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB ({growth:+.2%}, "
                      f"{'OK' if growth < _RSS_GROWTH else 'OVER'} the {_RSS_GROWTH:.0%} bound), peak "
                      f"{summary['peak_rss_kb'] / 1024:.0f} MiB; p50/p99 {first['p50_ms']:.0f}/{first['p99_ms']:.0f}"
                      f" ms in the first {args.sample_seconds:g} s, {last['p50_ms']:.0f}/{last['p99_ms']:.0f} ms in"
                      f" the last; {_verdict(summary)}; other processes {_cores(cores)} cores", flush=True)
                with open(os.path.join(args.out_dir, f"soak_{path.replace('+', 'p')}.tsv"), "w",
                          encoding="utf-8") as f:
                    f.write("t\trss_kb\trequests\tp50_ms\tp99_ms\n")
                    for p in summary["timeline"]:
                        f.write(f"{p['t']:.3f}\t{p['rss_kb']}\t{p['requests']}\t{p.get('p50_ms', '')}\t"
                                f"{p.get('p99_ms', '')}\n")
            _plot({path: value["summary"] for path, value in results["soak"].items()},
                  os.path.join(args.out_dir, "soak.png"))

        if args.request_n > 0 and 4 in args.sections:
            results["request"] = _one_request_section(args, model, num_classes, max_batch, binary, tmp, pool_path)
    with open(os.path.join(args.out_dir, "serving_load.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    print(f"\nwritten: {args.out_dir}/serving_load.json, soak_*.tsv, soak.png")


if __name__ == "__main__":
    main()
