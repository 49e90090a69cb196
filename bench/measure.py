"""What the benchmarks share: the load other processes put on the CPU, and certification TSV row times.

On 2 shared cores any other job changes a throughput a lot, so benchmarks
report how many cores other processes used while they measured.
"""

import datetime
import os
import re
import resource
from typing import List


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
