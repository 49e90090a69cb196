r"""Training speed side by side: the authors' PyTorch loop, ours in float32, ours in mixed_bfloat16.

All three train LeNet with the consistency loss (m = 2, lambda = 5, eta = 0.5,
sigma = 0.5) on the same Fashion-MNIST training images, for --epochs epochs
each; the last epoch's clean images per second is reported. They run in
turns (authors, float32, bfloat16, then again) for --rounds rounds, each in a
fresh process, so a load that comes and goes on the machine hits all three
alike; the report gives every round and the medians, and how many cores
other processes used meanwhile.

The authors' loop is their own code, run from a checkout of
jh-jeong/smoothing-consistency (--authors_repo) by a Python with PyTorch
(--torch_python): their `train` function of code/train_consistency.py (their
batch of --batch_size images split into m chunks, one SGD step per chunk,
with their meters and logging), their `get_architecture("lenet", "mnist")`,
`consistency_loss` and SGD settings (lr 0.01, momentum 0.9, weight decay
1e-4, as their prologue builds it). Their scripts parse flags and import
torchvision when imported, so the functions are read out of their files and
run unchanged but for one PyTorch-version fix (`AUTHORS_FIXES`); the data comes from a `DataLoader` over
the arrays in memory (no worker processes) instead of torchvision's MNIST
reader. Ours is `tf_consreg.training.train`, bin/train.py's library call,
with its default batching (--batch_size clean images per step).

  python bench/authors_train_bench.py --authors_repo=/tmp/smoothing-consistency \
      --torch_python=/work/torch-venv/bin/python
  python bench/authors_train_bench.py --authors_repo=... --torch_python=... --rounds=1 --examples=5120

A checkout: git clone <mirror of jh-jeong/smoothing-consistency> /tmp/smoothing-consistency.
The PyTorch child imports no TensorFlow and nothing of tf_consreg.
"""

import argparse
import ast
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import measure

CONTENDERS = ("authors", "none", "mixed_bfloat16")
LABELS = {"authors": "authors' PyTorch loop (float32)", "none": "tf_consreg float32",
          "mixed_bfloat16": "tf_consreg mixed_bfloat16"}
# Top-level definitions of the authors' files that their training step needs: file -> names.
AUTHORS_DEFINITIONS = {
    "train_consistency.py": ("_chunk_minibatch", "train"),
    "train_utils.py": ("AverageMeter", "accuracy", "requires_grad_"),
    "architectures.py": ("get_architecture",),
    "datasets.py": ("get_normalize_layer",),
}


# The one change their code needs on a PyTorch newer than theirs: in `accuracy`, `correct` (from the transposed
# top-k) is no longer contiguous, and `.view(-1)` raises; `.reshape(-1)` copies 5 x batch booleans instead.
AUTHORS_FIXES = {"train_utils.py": ("correct[:k].view(-1)", "correct[:k].reshape(-1)")}


def _authors_functions(code_dir: str, namespace: dict) -> None:
    """Executes the top-level definitions AUTHORS_DEFINITIONS names from the authors' files into `namespace`.

    Only those definitions run, compiled from the files as they are (with
    their file names, so tracebacks point into them) but for AUTHORS_FIXES:
    the rest of each file (argument parsing, the torchvision imports) does not.
    """
    for file_name, names in AUTHORS_DEFINITIONS.items():
        path = os.path.join(code_dir, file_name)
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if file_name in AUTHORS_FIXES:
            old, new = AUTHORS_FIXES[file_name]
            if source.count(old) != 1:
                raise SystemExit(f"{path}: expected {old!r} once; is --authors_repo their repository?")
            source = source.replace(old, new)
        tree = ast.parse(source, filename=path)
        wanted = [node for node in tree.body
                  if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
        missing = set(names) - {node.name for node in wanted}
        if missing:
            raise SystemExit(f"{path} defines no {', '.join(sorted(missing))}: is --authors_repo their repository?")
        exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), namespace)  # pylint: disable=exec-used


def _authors_child(args) -> None:
    """Runs the authors' training loop for args.epochs epochs (under their PyTorch)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorboardX  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from torch.utils.data import DataLoader, TensorDataset  # pylint: disable=import-outside-toplevel

    code_dir = os.path.join(args.authors_repo, "code")
    sys.path.insert(0, code_dir)
    import consistency  # pylint: disable=import-outside-toplevel,import-error
    from archs.lenet import LeNet  # pylint: disable=import-outside-toplevel,import-error
    from third_party.smoothadv import Attacker  # pylint: disable=import-outside-toplevel,import-error

    device = torch.device("cpu")
    # The module globals their definitions read, from their own modules and flags.
    namespace = {
        "__name__": "authors", "torch": torch, "time": time, "np": np, "nn": torch.nn,
        "F": torch.nn.functional, "Optimizer": torch.optim.Optimizer, "DataLoader": DataLoader,
        "Attacker": Attacker, "consistency_loss": consistency.consistency_loss, "LeNet": LeNet, "device": device,
        "args": argparse.Namespace(num_noise_vec=args.num_noise, lbd=args.lbd, eta=args.eta, adv_training=False,
                                   print_freq=10),
    }
    _authors_functions(code_dir, namespace)

    arrays = np.load(args.arrays)
    images = torch.from_numpy(arrays["images"])  # NCHW float32 in [0, 1], as torchvision's ToTensor gives.
    labels = torch.from_numpy(arrays["labels"]).long()
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(images, labels), shuffle=True, batch_size=args.batch_size, num_workers=0)
    model = namespace["get_architecture"]("lenet", "mnist")
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    speeds = []
    with tempfile.TemporaryDirectory() as log_dir:
        writer = tensorboardX.SummaryWriter(log_dir)
        for epoch in range(args.epochs):
            began = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # Their progress lines.
                namespace["train"](loader, model, criterion, optimizer, epoch, args.sigma, None, device, writer)
            speeds.append(len(images) / (time.perf_counter() - began))
        writer.close()
    print(json.dumps({"images_per_second": speeds, "torch": torch.__version__, "threads": torch.get_num_threads()}))


def _ours_child(args) -> None:
    """Runs tf_consreg.training.train (bin/train.py's library call) under args.contender's policy."""
    from tf_consreg import training  # pylint: disable=import-outside-toplevel
    from tf_consreg.run_config import TrainConfig  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory() as model_dir:
        config = TrainConfig.from_dict(dict(
            model_dir=model_dir, epochs=args.epochs, train_examples=args.examples, eval_examples=0,
            method="consistency", num_noise=args.num_noise, lbd=args.lbd, eta=args.eta, sigma=args.sigma,
            batch_size=args.batch_size, mixed_precision=args.contender))
        history = training.train(config)
    print(json.dumps({"images_per_second": history.history["images_per_second"]}))


def _run(command, env):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from measure import OtherLoad  # pylint: disable=import-outside-toplevel

    with OtherLoad() as load:
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:3])} ... failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), load.cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors_repo", required=True, help="checkout of jh-jeong/smoothing-consistency")
    parser.add_argument("--torch_python", default=sys.executable, help="a Python with PyTorch and tensorboardX")
    parser.add_argument("--examples", type=int, default=15360, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per process; the last one is timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_noise", type=int, default=2)
    parser.add_argument("--lbd", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=0.5)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--contender", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--arrays", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender == "authors":
        _authors_child(args)
        return
    if args.contender:
        _ours_child(args)
        return
    if not os.path.isfile(os.path.join(args.authors_repo, "code", "train_consistency.py")):
        raise SystemExit(f"--authors_repo={args.authors_repo} holds no code/train_consistency.py")

    import numpy as np  # pylint: disable=import-outside-toplevel

    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    images, labels = data.load_arrays("fashion_mnist", "train", limit=args.examples)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    common = [f"--examples={args.examples}", f"--epochs={args.epochs}", f"--batch_size={args.batch_size}",
              f"--num_noise={args.num_noise}", f"--lbd={args.lbd}", f"--eta={args.eta}", f"--sigma={args.sigma}",
              f"--authors_repo={args.authors_repo}"]
    results = {contender: [] for contender in CONTENDERS}
    loads = []
    torch_info = ""
    with tempfile.TemporaryDirectory() as directory:
        arrays = os.path.join(directory, "fashion_mnist_train.npz")
        np.savez(arrays, images=np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels=labels.astype(np.int64))
        for round_index in range(args.rounds):
            for contender in CONTENDERS:
                python = args.torch_python if contender == "authors" else sys.executable
                command = [python, os.path.abspath(__file__), f"--contender={contender}", f"--arrays={arrays}",
                           *common]
                result, cores = _run(command, env)
                results[contender].append(result["images_per_second"][-1])
                loads.append(cores)
                if contender == "authors":
                    torch_info = f"PyTorch {result['torch']} ({result['threads']} threads)"
                print(f"round {round_index + 1}: {LABELS[contender]:32s} {result['images_per_second'][-1]:8,.0f} "
                      f"clean images/s (other processes: "
                      f"{'unknown' if cores is None else f'{cores:.2f} cores'})", flush=True)

    print(f"\nmachine: {measure.machine()}; {torch_info}")
    print(f"LeNet / Fashion-MNIST, consistency m={args.num_noise} lambda={args.lbd:g} eta={args.eta:g} "
          f"sigma={args.sigma:g}, {args.examples} images/epoch, last of {args.epochs} epochs, {args.rounds} rounds")
    known = [c for c in loads if c is not None]
    print(f"other processes used {min(known):.2f}-{max(known):.2f} of {os.cpu_count()} cores while measuring"
          if known else "other processes' load: unknown")
    median = {contender: statistics.median(speeds) for contender, speeds in results.items()}
    print("| training loop | clean images/s (median) | rounds | x authors' | x float32 |")
    print("|---|---:|---|---:|---:|")
    for contender in CONTENDERS:
        rounds = ", ".join(f"{s:,.0f}" for s in results[contender])
        print(f"| {LABELS[contender]} | {median[contender]:,.0f} | {rounds} | "
              f"{median[contender] / median['authors']:.2f} | "
              + ("" if contender == "authors" else f"{median[contender] / median['none']:.2f}") + " |")


if __name__ == "__main__":
    main()
