"""One run per output directory: an exclusive lock held for the whole run.

The lock is ``<output_dir>/.adaptdpo.lock``, taken with ``fcntl.flock``: the kernel releases it when the
holding process ends, however it ends (kill -9 included), so a lock left by a killed run is never in
force: the next run sees the old holder's record, logs that it takes the lock over, and proceeds. The
file records the holder (pid, host, start time, command) so that a refused run can name it.

Only the main process of a distributed run takes the lock (every rank writes into the same directory
under its direction).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
from typing import Any

from adaptdpo.training.run_dir import LOCK_FILE

logger = logging.getLogger(__name__)



class RunDirectoryInUse(RuntimeError):
    """Another live process holds the output directory."""


class RunLock:
    """``with RunLock(output_dir): ...`` — raises :class:`RunDirectoryInUse` naming the holder."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fh: Any = None

    def _holder(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.loads(fh.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        import fcntl

        os.makedirs(self.run_dir, exist_ok=True)
        previous = self._holder()
        fh = open(self.path, "a+", encoding="utf-8")  # held open (and locked) for the whole run
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            holder = self._holder()
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
                   f"{holder.get('command')}") if holder else "another process"
            raise RunDirectoryInUse(
                f"{self.run_dir} is in use by {who}. Wait for it to finish, or choose another --output_dir "
                f"(two runs never share a directory)") from None
        if previous.get("pid"):
            logger.warning("%s: taking over the lock of a run that is no longer running (pid %s on %s, started %s)",
                           self.run_dir, previous.get("pid"), previous.get("host"), previous.get("started"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fchmod(fh.fileno(), 0o644)
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        import fcntl

        self._fh.seek(0)
        self._fh.truncate()  # an empty lock file: nobody to report as a stale holder
        self._fh.flush()
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
