"""One node's disk: files whose writes are lost in a crash unless fsynced.

The model has names (a directory) pointing at inodes (contents), each with a visible state and a
durable state:

- ``write`` (create or truncate-and-write) and ``append`` change what ``read`` returns at once;
  the new content becomes durable on ``fsync(name)``.
- Creating a name, ``replace(tmp, name)`` (atomic rename) and ``remove`` change the directory at
  once; directory changes become durable on ``fsync_dir()`` or on any ``fsync`` (as with a
  journalling file system, a commit carries every earlier metadata change).
- ``crash(rng)`` keeps the durable state only. With an ``rng``, unsynced directory changes
  survive as a random prefix of them, in order (a journal replays a prefix), and a file whose
  only unsynced change is appends keeps its durable content plus a random prefix of the appended
  bytes (a torn write). Without an ``rng`` every unsynced change is lost.

So ``write(tmp) fsync(tmp) replace(tmp, name) fsync_dir()`` is safe; skipping the fsync of
``tmp`` can leave ``name`` empty after a crash, as on a real file system.

Not modelled: partial overwrites, sector-level corruption, running out of space, I/O errors.
"""

from __future__ import annotations

import random


class SimDisk:
    def __init__(self) -> None:
        self._names: dict[str, int] = {}  # visible directory
        self._dnames: dict[str, int] = {}  # durable directory
        # unsynced directory changes, in order: (name removed, name added, its inode)
        self._dir_log: list[tuple[str | None, str | None, int]] = []
        self._data: dict[int, bytes] = {}  # visible contents
        self._ddata: dict[int, bytes] = {}  # durable contents
        self._dirty: dict[int, str] = {}  # unsynced content: "append" (appends only) or "write"
        self._next_inode = 1
        self.crashes = 0

    # --- reading ------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        try:
            return self._data[self._names[name]]
        except KeyError:
            raise FileNotFoundError(name) from None

    def exists(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    # --- writing ------------------------------------------------------------------------

    def _inode(self, name: str) -> int:
        inode = self._names.get(name)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._names[name] = inode
            self._data[inode] = b""
            self._dir_log.append((None, name, inode))
        return inode

    def write(self, name: str, data: bytes) -> None:
        """Create or truncate ``name`` and write ``data`` (not durable until fsync)."""
        inode = self._inode(name)
        data = bytes(data)
        self._data[inode] = data
        if data == self._ddata.get(inode, b""):
            self._dirty.pop(inode, None)
        else:
            self._dirty[inode] = "write"

    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to ``name`` (created if missing; not durable until fsync)."""
        inode = self._inode(name)
        if data:
            self._data[inode] += bytes(data)
            self._dirty.setdefault(inode, "append")

    def fsync(self, name: str) -> None:
        """Make ``name``'s content durable, and every directory change so far."""
        try:
            inode = self._names[name]
        except KeyError:
            raise FileNotFoundError(name) from None
        self._ddata[inode] = self._data[inode]
        self._dirty.pop(inode, None)
        self.fsync_dir()

    def fsync_dir(self) -> None:
        self._dnames = dict(self._names)
        self._dir_log.clear()

    def replace(self, tmp: str, name: str) -> None:
        """Atomically rename ``tmp`` over ``name`` (durable after fsync_dir)."""
        try:
            inode = self._names.pop(tmp)
        except KeyError:
            raise FileNotFoundError(tmp) from None
        self._names[name] = inode
        self._dir_log.append((tmp, name, inode))

    def remove(self, name: str) -> None:
        inode = self._names.pop(name, None)
        if inode is None:
            raise FileNotFoundError(name)
        self._dir_log.append((name, None, inode))

    # --- crashing -----------------------------------------------------------------------

    def crash(self, rng: random.Random | None = None) -> None:
        """Lose what was not durable (see the module docstring)."""
        self.crashes += 1
        names = dict(self._dnames)
        keep = rng.randint(0, len(self._dir_log)) if rng is not None else 0
        for gone, added, inode in self._dir_log[:keep]:
            if gone is not None:
                names.pop(gone, None)
            if added is not None:
                names[added] = inode
        data: dict[int, bytes] = {}
        for inode in sorted(set(names.values())):
            durable = self._ddata.get(inode, b"")
            if rng is not None and self._dirty.get(inode) == "append":
                visible = self._data[inode]
                tail = len(visible) - len(durable)
                durable = visible[: len(durable) + rng.randint(0, tail)]
            data[inode] = durable
        self._names = names
        self._dnames = dict(names)
        self._dir_log.clear()
        self._data = data
        self._ddata = dict(data)
        self._dirty.clear()
