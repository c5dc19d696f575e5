"""A lock on a folder held while a process writes into it: one training run per workdir, one build per
records folder.

The lock (`FOLDER/.lock`, JSON: pid, host, start time) is created atomically; its modification time is a heartbeat
refreshed while the holder lives. Another process, from any host, is refused with the holder named. A lock whose
holder is gone (a dead process on this host, or no heartbeat for `stale_after_s` from another host) is taken
over, with a message.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from exo2ego_jax.errors import Exo2EgoError

LOCK_FILE = ".lock"


class FolderBusy(Exo2EgoError):
    """Another launch holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class FolderLock:
    def __init__(self, folder: str, *, what: str = "workdir", heartbeat_s: float = 20.0, stale_after_s: float = 180.0):
        self.path = os.path.join(folder, LOCK_FILE)
        self.what = what
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread = None

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            holder["age_s"] = time.time() - os.path.getmtime(self.path)
            return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half written by a launch killed at that instant
            return {"pid": -1, "host": "?", "started": "?", "age_s": time.time() - os.path.getmtime(self.path)}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and holder["pid"] > 0:
            return not _alive(holder["pid"])
        return holder["age_s"] > self.stale_after_s

    def live_holder(self) -> dict | None:
        """The holder of the lock ({pid, host, started, age_s}) when a live process holds it, else None."""
        holder = self._holder()
        return None if holder is None or self._stale(holder) else holder

    def acquire(self) -> FolderLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                if not self._stale(holder):
                    raise FolderBusy(
                        f"{self.what} {os.path.dirname(self.path)!r} is in use by pid {holder.get('pid')} on host "
                        f"{holder.get('host')} since {holder.get('started')} (lock {self.path}); wait for that "
                        "process to finish, or write somewhere else") from None
                print(f"taking over the stale lock of pid {holder.get('pid')} on host {holder.get('host')} (started "
                      f"{holder.get('started')}): that process is gone", flush=True)
                with contextlib.suppress(FileNotFoundError):  # another launch moved it first
                    os.replace(self.path, self.path + ".stale")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, f)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return self
        raise FolderBusy(f"{self.what} {os.path.dirname(self.path)!r}: another launch took the lock at the same time")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
