"""Who used the CPU while a benchmark ran: every process's CPU seconds (user + system, from /proc), sampled by a
background thread, so that a window's share per process can be read afterwards (Linux only; elsewhere empty)."""
from __future__ import annotations

import os
import threading
import time

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, a short name) for every process this user can read."""
    out = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = cmd.split(" ")[0] if cmd.startswith("ray::") else os.path.basename(cmd.split(" ")[0]) or stat.split(
            "(", 1)[1].split(")")[0]
        out[int(pid)] = ((int(fields[11]) + int(fields[12])) / TICKS, name[:60])
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
