"""Atomic file writes: a crash never leaves a half-written file under the final name.

A write goes to a temporary file beside the target, is fsynced, renamed over
the target, and the directory is fsynced. Temporary files are named
``.{name}.prunekit-tmp-{pid}-{random}`` and, while written, hold an exclusive
``flock``, which the kernel releases when the writer exits or is killed. A
process killed mid-write (``kill -9``, power loss) leaves its temporary file
behind; the next write to the same path removes every such leftover that is
provably abandoned (:func:`remove_stale_temps`): nobody holds its lock, and its
writer is not a live process of this host (or, for a live pid, the file is over
a minute old: a pid reused by an unrelated process, or a writer in another pid
namespace, would have locked a file it created within microseconds). A
concurrent writer's temporary file is locked, so it is never touched. Where
``fcntl`` is missing (Windows), nothing is ever removed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no cleanup
    fcntl = None  # type: ignore[assignment]

TEMP_MARK = ".prunekit-tmp-"
_GRACE_S = 60.0  # a live pid's unlocked temp file younger than this may be one being created right now
_NAME_ROOM = 200  # bytes of the target's name kept in a temp name (file names are limited to 255 bytes)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    Temporary files that killed writers left for ``path`` are removed first
    (see the module docstring).

    Example:
        >>> with atomic_open("out.bin") as f:  # doctest: +SKIP
        ...     f.write(b"data")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = _create_temp(target)
    try:
        f = os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            # Created 0600; give the result the permissions open() would.
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, target)  # while the lock is held: a cleaner never sees this file unlocked
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def temp_prefix(target: Path) -> str:
    """The start of every temporary file name :func:`atomic_open` uses for ``target``.

    Example:
        >>> temp_prefix(Path("runs/model.pkt"))
        '.model.pkt.prunekit-tmp-'
    """
    name = target.name
    while len(name.encode("utf-8", "surrogateescape")) > _NAME_ROOM:
        name = name[:-1]
    return f".{name}{TEMP_MARK}"


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new temporary file beside ``target``, opened for writing and locked; ``(fd, path)``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = target.parent / f"{temp_prefix(target)}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks: the file is still ours; cleanup will leave it alone
                pass
        return fd, tmp
    raise FileExistsError(f"atomic_open: could not create a temporary file beside {target}")


_TEMP_TAIL = re.compile(r"(\d+)-[0-9a-f]{12}")


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left for ``target``; return them.

    A file qualifies when its name is one :func:`atomic_open` makes for this
    target, no process holds its lock, and either its writer's pid is not
    alive here or it is older than a minute. Errors (a file that vanished, a
    directory we may not list) are ignored: cleanup never fails a write.

    Example:
        >>> remove_stale_temps("out/model.pkt")  # doctest: +SKIP
        [PosixPath('out/.model.pkt.prunekit-tmp-4242-1f2e3d4c5b6a')]
    """
    target = Path(target)
    if fcntl is None:
        return []
    prefix, removed = temp_prefix(target), []
    try:
        names = [n for n in os.listdir(target.parent or ".") if n.startswith(prefix)]
    except OSError:
        return []
    for name in names:
        match = _TEMP_TAIL.fullmatch(name[len(prefix):])
        if match and _abandoned(target.parent / name, int(match.group(1))):
            removed.append(target.parent / name)
    return removed


def _abandoned(path: Path, pid: int) -> bool:
    """Remove ``path`` if nobody writes it any more (see :func:`remove_stale_temps`); whether it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a live writer (or no locks here at all: then leave it)
            return False
        if _pid_alive(pid) and time.time() - os.fstat(fd).st_mtime < _GRACE_S:
            return False
        os.unlink(path)  # still holding the lock: no writer can have started on it meanwhile
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but is not ours, or cannot be asked: assume alive
    return True


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
