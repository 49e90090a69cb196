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

  python bench/export_bench.py                      # LeNet, n = 10,000, 1 and 8 images per request
  python bench/export_bench.py --model_dir=runs/fmnist_consistency_0.50 --rounds=5
"""

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

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


def _time_cpp(binary, export_dir, images, requests):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.f32")
        images.astype("<f4").tofile(path)
        shape = ",".join(map(str, images.shape))
        result = subprocess.run(
            [binary, f"--saved_model_dir={export_dir}", f"--images={path}", f"--shape={shape}", "--warmup=1",
             f"--repeat={requests}"], capture_output=True, text=True, check=True)
    line = next(l for l in result.stderr.splitlines() if l.startswith("timing\t"))
    return float(line.rsplit("=", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=None, help="a training run (default: an untrained LeNet; the "
                        "speed does not depend on the weights)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch_size", type=int, default=1000, help="noisy copies per forward pass")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8], help="images per request")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path; the best counts")
    parser.add_argument("--no_cpp", action="store_true", help="skip the C++ loader")
    args = parser.parse_args()

    # tf_consreg first: it chooses TF_ENABLE_ONEDNN_OPTS before TensorFlow loads,
    # and the C++ program inherits the same environment, so all paths match.
    from tf_consreg import export  # pylint: disable=import-outside-toplevel
    from tf_consreg import models  # pylint: disable=import-outside-toplevel
    from tf_consreg import smoothing  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    model = (models.load_base_model(args.model_dir) if args.model_dir
             else models.get_architecture("lenet", "fashion_mnist"))
    num_classes = model.outputs[0].shape[-1]
    binary = None
    if not args.no_cpp:
        spec = importlib.util.spec_from_file_location("serving_check_build", _BUILD_PY)
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        binary = build.build()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"TensorFlow {tf.__version__}, TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}")
    print(f"model {model.name}, CERTIFY n0={args.n0} n={args.n} alpha={args.alpha}, batch {args.batch_size} "
          f"noisy copies per forward pass, best of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = os.path.join(tmp, "export")
        export.export_smoothed(model, export_dir, sigma=args.sigma, num_classes=num_classes, n0=args.n0, n=args.n,
                               alpha=args.alpha, batch_size=args.batch_size)
        signature = tf.saved_model.load(export_dir).signatures[export.SERVING_SIGNATURE]
        smooth = smoothing.Smooth(model, num_classes=num_classes, sigma=args.sigma)
        rng = np.random.default_rng(0)
        for count in args.images:
            images = rng.uniform(size=(count, *model.inputs[0].shape[1:])).astype(np.float32)
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
