"""Who used the CPU while a benchmark ran: every process's CPU seconds (user + system, from /proc), sampled by a
background thread, so that a window's share per process can be read afterwards (Linux only; elsewhere empty)."""
from __future__ import annotations

import os
import threading
import time

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, a short name) for every process this user can read."""
    if not os.path.isdir("/proc"):
        return {}
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        command, fields = stat.split("(", 1)[1].rsplit(")", 1)
        utime, stime = fields.split()[11:13]
        # a Ray process by its role ("ray::RayTrainWorker"), others by program, kernel threads by command
        name = program.split(" ")[0] if program.startswith("ray::") else os.path.basename(program) or command
        out[int(pid)] = ((int(utime) + int(stime)) / TICKS, name[:60])
    return out


class CpuSampler:
    """`with CpuSampler() as s: ...`, then `s.shares(t0, t1)`: per process, the share of one core it used between
    the first sample at or after t0 and the last at or before t1 (wall-clock `time.time()` seconds)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.samples = every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), cpu_seconds()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self, t0: float, t1: float) -> dict[int, tuple[float, str]]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (start, before), (end, after) = inside[0], inside[-1]
        return {pid: ((seconds - before[pid][0]) / (end - start), name)
                for pid, (seconds, name) in after.items() if pid in before}
