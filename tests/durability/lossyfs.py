#!/usr/bin/env python3
"""A FUSE file system that loses what was not synced when the power is cut.

    lossyfs.py BACKING MOUNTPOINT CONTROL_DIR

It passes every operation through to the BACKING directory, and keeps, for every file
written since its last fsync/fdatasync, what the file looked like at that sync (its size
and the bytes overwritten since). A power cut puts every such file back as it was at its
last sync, the way a machine that loses power loses the page cache. Data that was synced
survives; data that was only written does not. Creating, renaming and removing files take
effect at once (the gateway's durability rests on synced data, and RocksDB syncs its
directories too).

Commands are files dropped into CONTROL_DIR (polled every 50 ms; each is removed and
answered by a `<name>.done` file holding a one-line JSON report):
  - `cut`: the power cut. Report: files rolled back, bytes dropped, and how many
    `*.partial` files were renamed into place since the start (a hand-off folder on this
    file system, which has no O_TMPFILE, uses that fallback).
  - `lie`: from now on fsync and fdatasync return success without syncing anything, like a
    disk that acknowledges a flush it never did (or a gateway built to skip its syncs).
    The sabotage mode of the durability check.
  - `honest`: sync again.
The process that wrote the files must be dead before a `cut` (kill -9 it first): open file
handles of a dead process do not exist on a machine that lost power either.

Prints `lossyfs: mounted` once the mount answers. Run it as root; unmount with
`fusermount -u MOUNTPOINT` (or stop it with SIGTERM).
"""

import errno
import json
import os
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations

LOCK = threading.RLock()


class Unsynced:
    """A file's state at its last sync: its size, and the bytes overwritten since."""

    def __init__(self, size):
        self.size = size
        self.undo = []  # (offset, old bytes), applied in reverse order

    def note_overwrite(self, fd, offset, length):
        end = min(offset + length, self.size)
        if offset < end:
            self.undo.append((offset, os.pread(fd, end - offset, offset)))


class LossyFS(Operations):
    def __init__(self, backing):
        self.root = os.path.realpath(backing)
        self.unsynced = {}  # path -> Unsynced
        self.lying = False
        self.partial_renames = 0

    # ------------------------------------------------------------ helpers

    def _full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _state(self, path, fd):
        st = self.unsynced.get(path)
        if st is None:
            st = Unsynced(os.fstat(fd).st_size)
            self.unsynced[path] = st
        return st

    def cut(self):
        with LOCK:
            files, dropped = 0, 0
            for path, st in self.unsynced.items():
                full = self._full(path)
                try:
                    fd = os.open(full, os.O_WRONLY)
                except FileNotFoundError:
                    continue
                try:
                    now = os.fstat(fd).st_size
                    dropped += max(0, now - st.size) + sum(len(b) for _, b in st.undo)
                    os.ftruncate(fd, st.size)
                    for off, old in reversed(st.undo):
                        os.pwrite(fd, old, off)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                files += 1
            self.unsynced.clear()
            return {"files": files, "bytes_dropped": dropped, "partial_renames": self.partial_renames}

    # ---------------------------------------------------------- metadata

    def access(self, path, mode):
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        return os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        return os.chown(self._full(path), uid, gid)

    def getattr(self, path, fh=None):
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def readlink(self, path):
        return os.readlink(self._full(path))

    def mknod(self, path, mode, dev):
        return os.mknod(self._full(path), mode, dev)

    def rmdir(self, path):
        return os.rmdir(self._full(path))

    def mkdir(self, path, mode):
        return os.mkdir(self._full(path), mode)

    def statfs(self, path):
        s = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(s, k) for k in keys}

    def unlink(self, path):
        with LOCK:
            os.unlink(self._full(path))
            self.unsynced.pop(path, None)

    def symlink(self, name, target):
        return os.symlink(target, self._full(name))

    def rename(self, old, new):
        with LOCK:
            os.rename(self._full(old), self._full(new))
            if old.endswith(".partial"):
                self.partial_renames += 1
            st = self.unsynced.pop(old, None)
            self.unsynced.pop(new, None)
            if st is not None:
                self.unsynced[new] = st

    def link(self, target, name):
        return os.link(self._full(name), self._full(target))

    def utimens(self, path, times=None):
        return os.utime(self._full(path), times)

    # -------------------------------------------------------------- files

    def open(self, path, flags):
        with LOCK:
            if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                fd = os.open(self._full(path), os.O_RDWR)
                try:
                    st = self._state(path, fd)
                    st.note_overwrite(fd, 0, st.size)
                finally:
                    os.close(fd)
            return os.open(self._full(path), flags & ~os.O_APPEND)

    def create(self, path, mode, fi=None):
        with LOCK:
            fd = os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
            # Created now, synced never: its contents are lost in a cut.
            self.unsynced[path] = Unsynced(0)
            return fd

    def read(self, path, length, offset, fh):
        return os.pread(fh, length, offset)

    def write(self, path, buf, offset, fh):
        with LOCK:
            self._state(path, fh).note_overwrite(fh, offset, len(buf))
            return os.pwrite(fh, buf, offset)

    def truncate(self, path, length, fh=None):
        with LOCK:
            fd = fh if fh is not None else os.open(self._full(path), os.O_RDWR)
            try:
                st = self._state(path, fd)
                st.note_overwrite(fd, length, max(0, st.size - length))
                os.ftruncate(fd, length)
            finally:
                if fh is None:
                    os.close(fd)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        return os.close(fh)

    def fsync(self, path, datasync, fh):
        with LOCK:
            if self.lying:
                return 0
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
            self.unsynced.pop(path, None)
            return 0

    def fsyncdir(self, path, datasync, fh):
        return 0


def control(fs, ctl):
    while True:
        for name in sorted(os.listdir(ctl)):
            if name.endswith(".done"):
                continue
            os.unlink(os.path.join(ctl, name))
            if name == "cut":
                report = fs.cut()
            elif name in ("lie", "honest"):
                with LOCK:
                    fs.lying = name == "lie"
                report = {"lying": fs.lying}
            else:
                report = {"error": "unknown command"}
            tmp = os.path.join(ctl, "." + name)
            with open(tmp, "w") as f:
                f.write(json.dumps(report) + "\n")
            os.rename(tmp, os.path.join(ctl, name + ".done"))
            print("lossyfs:", name, json.dumps(report), flush=True)
        time.sleep(0.05)


def announce(mountpoint):
    while not os.path.ismount(mountpoint):
        time.sleep(0.05)
    print("lossyfs: mounted", flush=True)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    backing, mountpoint, ctl = sys.argv[1:]
    os.makedirs(ctl, exist_ok=True)
    fs = LossyFS(backing)
    threading.Thread(target=control, args=(fs, ctl), daemon=True).start()
    threading.Thread(target=announce, args=(mountpoint,), daemon=True).start()
    FUSE(fs, mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
