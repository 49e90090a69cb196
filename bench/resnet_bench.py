r"""Training throughput of a CIFAR ResNet through ConsistencyModel, in clean images per second.

Builds the compiled wrapper with `tf_consreg.training.build` (the code path of
bin/train.py) and fits it on CIFAR-10-shaped mock data through the library's
training pipeline (`tf_consreg.data.make_input`, random crop + flip), so the
number includes the input pipeline as training sees it. Reports the last
epoch's speed, timed from the end of its first step (which pays for tracing)
to its end. A CPU baseline for later GPU runs.

  python bench/resnet_bench.py                         # ResNet-20, consistency, m = 2, batch 64
  python bench/resnet_bench.py --arch=cifar_resnet110 --method=gaussian --num_noise=1
"""

import argparse
import tempfile

import keras

import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet20")
    parser.add_argument("--method", default="consistency", choices=["consistency", "gaussian"])
    parser.add_argument("--num_noise", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64, help="clean images per step")
    parser.add_argument("--examples", type=int, default=1280, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps_per_execution", type=int, default=1)
    args = parser.parse_args()

    from tf_consreg import callbacks  # pylint: disable=import-outside-toplevel
    from tf_consreg import data  # pylint: disable=import-outside-toplevel
    from tf_consreg import run_config  # pylint: disable=import-outside-toplevel
    from tf_consreg import training  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(0)
    extra = {"lbd": 10.0, "eta": 0.5} if args.method == "consistency" else {}
    with tempfile.TemporaryDirectory() as model_dir:
        objective = run_config.ObjectiveConfig(method=args.method, sigma=0.5, num_noise=args.num_noise, **extra)
        config = run_config.TrainConfig(model_dir=model_dir, dataset="cifar10", arch=args.arch, objective=objective,
                                        batch_size=args.batch_size, epochs=args.epochs, lr=0.1, lr_step_size=50,
                                        train_examples=args.examples, eval_examples=0,
                                        steps_per_execution=args.steps_per_execution)
        pipeline = data.make_input("cifar10", "train", args.batch_size, training=True, limit=args.examples,
                                   seed=0, drop_remainder=True, mock=True)
        model = training.build(config, pipeline.steps_per_epoch)
        history = model.fit(pipeline.dataset, epochs=args.epochs, callbacks=[callbacks.Throughput(args.batch_size)],
                            shuffle=False, verbose=0)
    speeds = history.history["images_per_second"]
    print(f"machine: {measure.machine()}")
    print(f"{args.arch} / CIFAR-10 shapes, {args.method}, m = {args.num_noise}, batch {args.batch_size} clean "
          f"images ({args.batch_size * args.num_noise} noisy copies) per step, {pipeline.steps_per_epoch} steps/epoch")
    print(f"training: {speeds[-1]:8.1f} clean images/s ({speeds[-1] * args.num_noise:.1f} noisy copies/s; "
          f"epochs: {', '.join(f'{s:.1f}' for s in speeds)})")


if __name__ == "__main__":
    main()
