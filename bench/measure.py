"""What the benchmarks share: the machine line, the load other processes put on the CPU, and TSV row times.

On 2 shared cores any other job changes a throughput a lot, so benchmarks
report how many cores other processes used while they measured.
"""

import datetime
import os
import platform
import re
import resource
from typing import List

from tf_consreg import precision


def machine() -> str:
    """The line every benchmark prints first, so that figures name the machine they came from.

    The CPU's model name (a virtual machine's may be generic, so its bfloat16
    flags too, which tell the generation), the cores, Python, and TensorFlow
    with its oneDNN setting, e.g. `Intel(R) Xeon(R) Processor (bfloat16 flags:
    avx512_bf16, amx_bf16), 2 cores, Python 3.11.7, TensorFlow 2.21.0
    (TF_ENABLE_ONEDNN_OPTS=1)`.
    """
    # Here, not at the top, so that a benchmark sets its environment (oneDNN, threads) before TensorFlow loads.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    model, flags = precision.cpu_capability()
    if flags is None:
        bf16 = "bfloat16 flags unknown"
    else:
        bf16 = "bfloat16 flags: " + (", ".join(flags) if flags else "none")
    return (f"{model or platform.processor() or platform.machine()} ({bf16}), {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__} "
            f"(TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')})")


class OtherLoad:
    """Cores used by other processes between enter and exit (`cores`; None if /proc is unavailable).

    From /proc/stat's busy time, minus this process's own CPU time and that of
    its finished child processes.
    """

    def __enter__(self):
        self.cores = None
        self._start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self._start and end:
            total = end[0] - self._start[0]
            busy = total - (end[1] - self._start[1])
            mine = end[2] - self._start[2]
            self.cores = max(0.0, busy - mine) / max(total, 1) * os.cpu_count()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
        return sum(values[:8]), values[3] + values[4], own * ticks


def row_seconds(path: str) -> List[float]:
    """The `time` column of a bin/certify.py or bin/predict.py TSV (H:MM:SS.ffffff per example), in seconds."""
    seconds = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
        # By name: a staged run's log has the column samples after time.
        column = lines[0].split("\t").index("time")
        for line in lines[1:]:
            match = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d+)?)", line.split("\t")[column])
            hours, minutes, secs = match.groups()
            seconds.append(datetime.timedelta(hours=int(hours), minutes=int(minutes),
                                              seconds=float(secs)).total_seconds())
    return seconds
