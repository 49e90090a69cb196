r"""Training throughput of bin/train.py with 1 process and with 2 worker processes (MultiWorkerMirroredStrategy).

Runs the real binary (LeNet, Fashion-MNIST, consistency, m = 2, a global batch
of --batch_size clean images, no evaluation) for a few epochs and reports the
last epoch's speed in clean images per second, as bin/train.py logs it
(`images_per_second`: the chief's, for the whole cluster), for:

  1. one process, one device (--strategy=default);
  2. two worker processes on 127.0.0.1 (--strategy=multi_worker), each free to
     use every core;
  3. the same two workers, each pinned to its own core with `taskset` (when
     the machine has taskset and at least 2 cores).

On one machine the workers share its cores and add an all-reduce of every
gradient over loopback gRPC per step, so expect no gain: this measures the
overhead of the multi-worker path, not a speed-up. The load average of the
minute before each run is printed, since other processes change the numbers.

  python bench/multi_worker_bench.py
  python bench/multi_worker_bench.py --examples=20480 --epochs=3 --batch_size=512
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "bin", "train.py")
_SPEED = re.compile(r"images_per_second: ([0-9.e+]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(args, model_dir: str):
    return [f"--model_dir={model_dir}", "--dataset=fashion_mnist", "--arch=lenet", "--method=consistency",
            "--sigma=0.5", "--lbd=5", "--eta=0.5", f"--epochs={args.epochs}", f"--train_examples={args.examples}",
            "--eval_examples=0", f"--batch_size={args.batch_size}"]


def _last_speed(stdout: str) -> float:
    speeds = _SPEED.findall(stdout)
    if not speeds:
        raise RuntimeError(f"no images_per_second in the output:\n{stdout[-2000:]}")
    return float(speeds[-1])


def _run(commands, envs, timeout: float):
    """Starts the processes together; returns (stdouts, seconds). Kills all of them on any failure."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c, e in zip(commands, envs)]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise RuntimeError(f"exit {p.returncode}:\n{err[-3000:]}")
    return [out for out, _ in outputs], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10240, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256, help="global batch, clean images per step")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per setting")
    args = parser.parse_args()

    print(f"machine: {measure.machine()}")
    print(f"LeNet / Fashion-MNIST, consistency, m = 2, global batch {args.batch_size} clean images, "
          f"{args.examples} images/epoch, last of {args.epochs} epochs")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    settings = ["1 process", "2 workers"] + (["2 workers, 1 core each"] if pin else [])
    results = {}
    for name in settings:
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            if name == "1 process":
                commands = [[sys.executable, TRAIN, *_flags(args, os.path.join(tmp, "run")), "--strategy=default"]]
                envs = [env]
            else:
                ports = [_free_port(), _free_port()]
                cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
                commands, envs = [], []
                for index in range(2):
                    prefix = ["taskset", "-c", str(index)] if name.endswith("1 core each") else []
                    commands.append([*prefix, sys.executable, TRAIN, *_flags(args, os.path.join(tmp, "run")),
                                     "--strategy=multi_worker"])
                    envs.append({**env, "TMPDIR": tmp, "TF_CONFIG": json.dumps(
                        {"cluster": cluster, "task": {"type": "worker", "index": index}})})
            outputs, seconds = _run(commands, envs, args.timeout)
        speed = _last_speed(outputs[0])
        results[name] = speed
        print(f"{name:24s} {speed:8.0f} clean images/s   (wall {seconds:5.1f} s incl. start-up; "
              f"load average before: {load:.2f})", flush=True)
    base = results["1 process"]
    for name in settings[1:]:
        print(f"{name}: {results[name] / base:.2f}x the single process")


if __name__ == "__main__":
    main()
