"""Helpers of the fault-injection suite: find and kill real processes by where they work, never by name."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def processes_under(folder: str | os.PathLike, comm: str) -> list[int]:
    """Pids of processes named `comm` whose working folder is inside `folder` (ours alone: the test's tmp)."""
    target = str(Path(folder).resolve())
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            name = Path(f"/proc/{entry.name}/comm").read_text().strip()
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if name == comm and (cwd == target or cwd.startswith(target + "/")):
            out.append(int(entry.name))
    return out


class Assassin(threading.Thread):
    """Kills the first `comm` process that appears under `folder`, `times` times (one kill per process)."""

    def __init__(self, folder: str | os.PathLike, comm: str, times: int = 1, sig: int = signal.SIGKILL,
                 give_up_s: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.folder, self.comm, self.times, self.sig, self.give_up_s = folder, comm, times, sig, give_up_s
        self.killed: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while len(self.killed) < self.times and not self._halt.is_set() and time.monotonic() - t0 < self.give_up_s:
            for pid in processes_under(self.folder, self.comm):
                if pid not in self.killed:
                    try:
                        os.kill(pid, self.sig)
                        self.killed.append(pid)
                    except OSError:
                        pass
                    break
            time.sleep(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
