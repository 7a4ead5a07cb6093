"""The registry's in-memory record cache: each record kept with the identity of the file it was
read from, and served again only while a `stat` of that path still shows the same file.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from adapters.types import AdapterRecord

# (st_mtime_ns, st_ino, st_size). Registry writers replace a record by renaming a new file over
# it, so a new version is a new inode; they also give it an mtime above the one it replaces
# (`next_mtime_ns`), so a path never shows the same signature for two versions, even when a
# freed inode number is reused and the kernel's coarse clock gives two writes the same time.
Signature = tuple[int, int, int]


def signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def next_mtime_ns(previous: Signature | None, now_ns: int) -> int:
    """The mtime for a file replacing one with `previous`: now, or just after it if the clock
    has not moved past it (same tick, or stepped back)."""
    return now_ns if previous is None else max(now_ns, previous[0] + 1)


# Why a stat per use and not the registry's generation counter: the stat answers for this one
# record, so a write for another tenant or name costs nothing, and it sees every writer of the
# file (another replica, an operator's editor), not only those that bump the counter. A stat
# takes about a microsecond; reading and parsing the record 10 to 20, the hop to a worker thread
# 30 to 70 (`loadtests/bench_hot_path.py`): so a hit is checked on the event loop, with no thread.
# Local filesystems: on NFS a stat answers from the client's attribute cache, so another host's
# change can show up to `actimeo` late, where the read it replaces revalidated on open.
class RecordCache:
    """Records by file path, least recently used dropped beyond `max_entries`. Thread safe:
    the lock guards the dict only and is never held during I/O."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[Signature, AdapterRecord]] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, path: str) -> AdapterRecord | None:
        """The record cached for `path` if the file there is still the one it was read from;
        None if nothing is cached, the file changed or is gone (read it again to know which)."""
        with self._lock:
            entry = self._entries.get(path)
        if entry is None:
            return None
        try:
            current = signature(os.stat(path))
        except OSError:  # gone, or unreadable: the caller's read says which
            current = None
        with self._lock:
            if self._entries.get(path) is not entry:  # another thread stored a newer read
                return None
            if current != entry[0]:
                del self._entries[path]
                return None
            self._entries.move_to_end(path)
        return entry[1]

    def store(self, path: str, sig: Signature, record: AdapterRecord) -> None:
        """Remember `record` as read from the file with `sig` (from fstat of the descriptor it
        was read through, so the signature and the bytes belong to the same file)."""
        with self._lock:
            self._entries[path] = (sig, record)
            self._entries.move_to_end(path)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def drop(self, path: str) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
