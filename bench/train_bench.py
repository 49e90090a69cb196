r"""Training throughput of bin/train.py's code path, in clean images per second.

Runs `tf_consreg.training.train` with bin/train.py's defaults (LeNet,
Fashion-MNIST, consistency, m = 2, batch 256 clean images per step) for a few
epochs without evaluation and reports the speed of the last epoch, once with
TensorFlow's oneDNN kernels on (the package default) and once off, and under
each --mixed_precision policy of --precisions, with each policy's ratio to
float32 under the same oneDNN setting. It prints the CPU's bfloat16 capability
first (tf_consreg.precision): mixed_bfloat16 is only fast where it is native.
Each setting runs in a fresh process, since TensorFlow reads
TF_ENABLE_ONEDNN_OPTS only when it loads.

  python bench/train_bench.py                 # both oneDNN settings, float32 and mixed_bfloat16
  python bench/train_bench.py --examples=20480 --epochs=3 --onednn=1
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import measure


def _child(args) -> None:
    import keras  # noqa: F401  pylint: disable=import-outside-toplevel

    from tf_consreg import run_config  # pylint: disable=import-outside-toplevel
    from tf_consreg import training  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory() as model_dir:
        objective = run_config.ObjectiveConfig(method=args.method, sigma=0.5, num_noise=args.num_noise,
                                               **({"lbd": 5.0, "eta": 0.5} if args.method == "consistency" else {}))
        config = run_config.TrainConfig(model_dir=model_dir, objective=objective, epochs=args.epochs,
                                        train_examples=args.examples, eval_examples=0, batch_size=args.batch_size,
                                        steps_per_execution=args.steps_per_execution,
                                        mixed_precision=args.mixed_precision)
        history = training.train(config)
    speeds = history.history["images_per_second"]
    print(json.dumps({"images_per_second": speeds[-1], "all_epochs": speeds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=15360, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_noise", type=int, default=2)
    parser.add_argument("--method", default="consistency")
    parser.add_argument("--steps_per_execution", type=int, default=1)
    parser.add_argument("--onednn", choices=["both", "0", "1"], default="both")
    parser.add_argument("--precisions", default="none,mixed_bfloat16",
                        help="comma-separated --mixed_precision values; float32 (none) is the ratios' base")
    parser.add_argument("--mixed_precision", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from tf_consreg import precision  # pylint: disable=import-outside-toplevel

    print(f"machine: {measure.machine()}")
    print(f"bfloat16: {precision.probe().describe()}")
    print(f"LeNet / Fashion-MNIST, {args.method}, m = {args.num_noise}, batch {args.batch_size} clean images, "
          f"{args.examples} images/epoch, last of {args.epochs} epochs")
    settings = ["1", "0"] if args.onednn == "both" else [args.onednn]
    policies = args.precisions.split(",")
    for onednn in settings:
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
        speeds = {}
        for policy in policies:
            child = [sys.executable, __file__, "--child", f"--examples={args.examples}", f"--epochs={args.epochs}",
                     f"--batch_size={args.batch_size}", f"--num_noise={args.num_noise}", f"--method={args.method}",
                     f"--steps_per_execution={args.steps_per_execution}", f"--mixed_precision={policy}"]
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            speeds[policy] = result["images_per_second"]
            ratio = f" = {speeds[policy] / speeds['none']:.2f} x float32" if "none" in speeds else ""
            print(f"TF_ENABLE_ONEDNN_OPTS={onednn} --mixed_precision={policy}: {speeds[policy]:8.0f} clean images/s"
                  f"{ratio} (epochs: {', '.join(f'{s:.0f}' for s in result['all_epochs'])})", flush=True)

if __name__ == "__main__":
    main()
