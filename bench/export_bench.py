r"""Speed of the exported smoothed classifier against the library's certification.

Runs CERTIFY (n0 selection + n estimation samples per image) on the same
model and images three ways:

  library   tf_consreg.smoothing.Smooth.certify_batch (what bin/certify uses)
  python    the SavedModel's serving_default via tf.saved_model.load
  c++       the same signature through tensorflow::LoadSavedModel
            (tools/serving_check, the loader TF Serving uses)

and prints requests/s and seconds per image for each, plus the export's time
relative to the library (the export should be at most 10% slower). Every path
is warmed up first; each is then timed in several interleaved rounds and the
fastest round counts, which discounts other load on a shared machine.

With --radius, it then times the per-request latency of `certify_radius`
(staged CERTIFY at that radius for every image, n_max = n, the export's
default stages) against `serving_default` (fixed-n CERTIFY, n0 + n samples)
through the export, in Python and in C++, interleaved in the same rounds,
and reports the estimation samples certify_radius drew per image. The
export has a fixed seed, so every round (and the C++ loader) draws the same
samples and the rounds differ only by the machine's load. The
latency depends on the images (an image far from the radius stops early), so
give a trained model: with --model_dir the requests hold test images of the
run's dataset (every --skip-th), not random ones. Other processes' load on
the CPU is reported beside the times.

  python bench/export_bench.py                      # LeNet, n = 10,000, 1 and 8 images per request
  python bench/export_bench.py --noise=float        # the same with float noise, to compare the modes
  python bench/export_bench.py --model_dir=runs/fmnist_consistency_0.50 --rounds=5
  python bench/export_bench.py --model_dir=runs/fmnist_consistency_0.50 --n=100000 --radius=0.5 \
      --images 1 8 --skip_library
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import measure

_BUILD_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools", "serving_check", "build.py")


def _best(seconds):
    return min(seconds)


def _time_library(smooth, images, args):
    start = time.perf_counter()
    smooth.certify_batch(images, args.n0, args.n, args.alpha, args.batch_size)
    return time.perf_counter() - start


def _time_python(signature, images):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    images = tf.constant(images)
    start = time.perf_counter()
    signature(images=images)["class"].numpy()
    return time.perf_counter() - start


def _time_cpp(binary, export_dir, images, requests, radii=None):
    """Seconds per request of serving_default, or of certify_radius with `radii`, through the C++ loader."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.f32")
        images.astype("<f4").tofile(path)
        shape = ",".join(map(str, images.shape))
        command = [binary, f"--saved_model_dir={export_dir}", f"--images={path}", f"--shape={shape}", "--warmup=1",
                   f"--repeat={requests}"]
        if radii is not None:
            radii_path = os.path.join(tmp, "radii.f32")
            radii.astype("<f4").tofile(radii_path)
            command += ["--signature=certify_radius", f"--radii={radii_path}", "--outputs=class"]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(l for l in result.stderr.splitlines() if l.startswith("timing\t"))
    return float(line.rsplit("=", 1)[1])


def _time_certify_radius(signature, images, radii):
    """(seconds, estimation samples per image) of one certify_radius request."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    images, radii = tf.constant(images), tf.constant(radii)
    start = time.perf_counter()
    samples = signature(images=images, radius=radii)["samples"].numpy()
    return time.perf_counter() - start, samples


def _compare_certify_radius(signatures, binary, export_dir, images, args):
    """Per-request latency of certify_radius against serving_default at the same n_max; prints a table."""
    from measure import OtherLoad  # pylint: disable=import-outside-toplevel

    radii = np.full(len(images), args.radius, np.float32)
    # Warm-up of both signatures: the first call of a loaded signature optimizes its graph.
    _time_python(signatures["serving_default"], images)
    _time_certify_radius(signatures["certify_radius"], images, radii)
    times = {"serving_default, python": [], "certify_radius, python": [], "serving_default, c++": [],
             "certify_radius, c++": []}
    samples = []
    with OtherLoad() as load:
        for _ in range(args.rounds):
            times["serving_default, python"].append(_time_python(signatures["serving_default"], images))
            seconds, drawn = _time_certify_radius(signatures["certify_radius"], images, radii)
            times["certify_radius, python"].append(seconds)
            samples.extend(drawn.tolist())
            if binary:
                times["serving_default, c++"].append(_time_cpp(binary, export_dir, images, requests=1))
                times["certify_radius, c++"].append(_time_cpp(binary, export_dir, images, 1, radii=radii))
    other = "unknown" if load.cores is None else f"{load.cores:.2f} of {os.cpu_count()} cores"
    print(f"\n{len(images)} image(s) per request, certify_radius at radius {args.radius} vs serving_default, "
          f"n_max = {args.n} (other processes: {other}):")
    base = {path: _best(times[f"serving_default, {path}"]) for path in ("python", "c++") if times[f"serving_default, {path}"]}
    for name, seconds in times.items():
        if not seconds:
            continue
        best = _best(seconds)
        path = name.split(", ")[1]
        print(f"  {name:24s} {best * 1000:9.1f} ms/request  {best / len(images) * 1000:9.1f} ms/image  "
              f"{base[path] / best:6.1f}x faster than serving_default  (rounds: "
              f"{', '.join(f'{s:.3f}' for s in seconds)} s)")
    print(f"  certify_radius drew {np.mean(samples):,.0f} estimation samples per image on average "
          f"(median {np.median(samples):,.0f}; serving_default draws {args.n:,}), plus n0 = {args.n0} selection")
    # The same numbers as rows of docs/benchmarks.md's latency table.
    print("\n  | images/request | path | serving_default ms/request | certify_radius ms/request | speed-up "
          "| estimation samples/image (mean) | other processes (cores) |")
    for path in base:
        radius_best = _best(times[f"certify_radius, {path}"])
        print(f"  | {len(images)} | {path} | {base[path] * 1000:.1f} | {radius_best * 1000:.1f} | "
              f"{base[path] / radius_best:.1f}x | {np.mean(samples):,.0f} of {args.n:,} | {other} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=None, help="a training run (default: an untrained LeNet; the "
                        "speed does not depend on the weights)")
    parser.add_argument("--sigma", type=float, default=None, help="default: the run's (--model_dir), else 0.25")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch_size", type=int, default=1000, help="noisy copies per forward pass")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8], help="images per request")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path; the best counts")
    parser.add_argument("--no_cpp", action="store_true", help="skip the C++ loader")
    parser.add_argument("--radius", type=float, default=None, help="also time certify_radius at this radius "
                        "against serving_default")
    parser.add_argument("--skip", type=int, default=20, help="with --model_dir: every skip-th test image")
    parser.add_argument("--skip_library", action="store_true", help="skip the library-vs-export comparison")
    parser.add_argument("--noise", choices=("grid", "float"), default="grid", help="the export's and the library's "
                        "noise: grid (bin/export.py's default) or float")
    args = parser.parse_args()

    # tf_consreg first: it chooses TF_ENABLE_ONEDNN_OPTS before TensorFlow loads,
    # and the C++ program inherits the same environment, so all paths match.
    from tf_consreg import data  # pylint: disable=import-outside-toplevel
    from tf_consreg import export  # pylint: disable=import-outside-toplevel
    from tf_consreg import models  # pylint: disable=import-outside-toplevel
    from tf_consreg import smoothing  # pylint: disable=import-outside-toplevel
    from tf_consreg import run_config  # pylint: disable=import-outside-toplevel
    from tf_consreg.certify_spec import CertifySpec  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    model = (models.load_base_model(args.model_dir) if args.model_dir
             else models.get_architecture("lenet", "fashion_mnist"))
    test_images = None
    if args.model_dir:
        run = run_config.read_train_config(args.model_dir)
        test_images = data.load_arrays(run.dataset, "test", data_dir=run.data_dir)[0][::args.skip]
        args.sigma = run.sigma if args.sigma is None else args.sigma
    args.sigma = 0.25 if args.sigma is None else args.sigma
    num_classes = model.outputs[0].shape[-1]
    binary = None
    if not args.no_cpp:
        spec = importlib.util.spec_from_file_location("serving_check_build", _BUILD_PY)
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        binary = build.build()

    print(f"machine: {measure.machine()}")
    print(f"model {model.name}, CERTIFY n0={args.n0} n={args.n} alpha={args.alpha}, batch {args.batch_size} "
          f"noisy copies per forward pass, {args.noise} noise, best of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "export")
        # A fixed seed: every round and both loaders draw the same noise (the
        # export keys it per image as the library does), so certify_radius does
        # the same work each time and the best round discounts only the load,
        # not a lucky draw that settled early. The cost per sample does not
        # depend on the seed.
        spec = CertifySpec(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
                           noise=args.noise)
        export.export_smoothed(model, export_dir, spec, num_classes=num_classes, seed=0)
        print(f"stages of certify_radius: {export.read_metadata(export_dir)['stages']}")
        signatures = tf.saved_model.load(export_dir).signatures
        signature = signatures[export.SERVING_SIGNATURE]
        smooth = smoothing.Smooth(model, num_classes=num_classes, sigma=args.sigma, noise=args.noise)
        rng = np.random.default_rng(0)
        for count in args.images:
            if test_images is not None:
                images = test_images[:count]
            else:
                # 8-bit images (float32(k) / 255), which both noise modes take.
                images = rng.integers(0, 256, size=(count, *model.inputs[0].shape[1:])).astype(np.float32)
                images /= np.float32(255)
            if args.radius is not None:
                _compare_certify_radius(signatures, binary, export_dir, images, args)
            if args.skip_library:
                continue
            _time_library(smooth, images, args)  # warm-up: tracing and graph optimization
            _time_python(signature, images)
            times = {"library": [], "python": [], "c++": []}
            for _ in range(args.rounds):
                times["library"].append(_time_library(smooth, images, args))
                times["python"].append(_time_python(signature, images))
                if binary:
                    times["c++"].append(_time_cpp(binary, export_dir, images, requests=1))
            print(f"\n{count} image(s) per request:")
            base = _best(times["library"])
            for path, seconds in times.items():
                if not seconds:
                    continue
                best = _best(seconds)
                print(f"  {path:8s} {1 / best:8.3f} requests/s  {best / count * 1000:8.1f} ms/image  "
                      f"{best / base:5.2f}x library time  (rounds: {', '.join(f'{s:.2f}' for s in seconds)} s)")
            slowest = max(_best(s) for p, s in times.items() if s and p != "library")
            verdict = "OK" if slowest <= 1.10 * base else "SLOWER THAN 10% OVER THE LIBRARY"
            print(f"  export vs library: {slowest / base:.2f}x -> {verdict}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
