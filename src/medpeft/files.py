"""Files written whole or not at all: a reader never sees half a file or half a folder; folders one
process at a time."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

TEMPORARY = ".*.tmp"
"""The names of the temporaries of the writers below: what a process killed mid-write leaves behind."""
LOCK = ".lock"
"""The lock file of a folder (see `locked`): it holds the process id of the lock's holder."""


@contextmanager
def _naming(path: Path):
    """An OSError inside (a full or read-only disk, no permission) names `path`, not a temporary of it."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path` (same filesystem), then rename it over `path`."""
    path = Path(path)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the data are on disk before the name points at them
            os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_directory(path: str | Path, replace: bool = True):
    """Yield a temporary folder beside `path`; on success it becomes `path`, on an error it is removed and
    `path` is left as it was. `replace`: an existing `path` is replaced (its old contents removed); else
    the first folder to get there stays and later ones are dropped (concurrent writers of the same
    content, e.g. the image cache)."""
    path = Path(path)
    with _naming(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for inner in [tmp, *tmp.rglob("*")]:  # mkdtemp and libraries' own temporaries (safetensors) are private
        os.chmod(inner, 0o755 if inner.is_dir() else 0o644)
    if not replace:
        try:
            os.rename(tmp, path)  # fails if another writer's folder is there already
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.is_dir():
                raise
        return
    old = path.with_name(f".{path.name}.old.tmp")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(folder: str | Path) -> None:
    """Remove the temporaries (TEMPORARY) in `folder` and its subfolders that killed writers left behind;
    only while no process writes there (e.g. holding the folder's lock)."""
    folder = Path(folder)
    for path in [*folder.glob(TEMPORARY), *folder.glob(f"*/{TEMPORARY}")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def locked(folder: str | Path, error: type[Exception]):
    """Hold the exclusive lock of `folder` (made if missing) for the block: an ``fcntl.flock`` on its LOCK
    file, into which the holder writes its process id. While another process holds it, raise `error`
    naming the folder and that process. The kernel releases a lock when its process ends, however it ends
    (kill -9 too): a lock file left behind is taken over. At the end the lock file is removed, and the
    folder too if this made it and nothing else is in it."""
    folder = Path(folder)
    made, path = not folder.exists(), folder / LOCK
    while True:  # again when a holder that ended removed the lock file (or the folder) meanwhile
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "(starting)"
            os.close(fd)
            raise error(f"{folder}: in use by process {holder} (it holds {path}); wait for it to end or "
                        f"stop it") from None
        with suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock is released: the next holder makes a new file
        os.close(fd)
        if made:
            with suppress(OSError):
                folder.rmdir()
