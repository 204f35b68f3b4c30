"""Files written so that nothing is left half-written or stale: atomic writes, write errors as one line,
JSON read strictly, settings files that refuse other settings, and folder locks."""

import codecs
import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile

import numpy as np
import torch

WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "no write permission",
    errno.EPERM: "no write permission",
}


class WriteError(OSError):
    """An output that cannot be written (no space, read-only, no permission); str() is one line for the user."""

    def __str__(self):
        return self.args[0]


def free_bytes(path: str):
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def write_error(e: OSError, path: str = None) -> WriteError:
    """One line naming the path and what is missing, for an OSError whose errno is in WRITE_ERRNOS."""
    path = path or e.filename or "output"
    what = WRITE_ERRNOS[e.errno]
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        free = f" ({format_bytes(free)} free)" if free is not None else ""
        return WriteError(f"cannot write {path}: {what}{free}; free some space or choose another output folder")
    if e.errno == errno.EROFS:
        return WriteError(f"cannot write {path}: {what}; choose another output folder")
    return WriteError(f"cannot write {path}: {what}; choose another output folder or fix its permissions")


def append_line(path: str, line: str) -> None:
    """Append one line to a log or journal. A write that fails (disk full, ...) names the file: the error of a
    failed write() carries no file name, and the user has to learn which log filled the disk."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(e, path) from None
        raise


def check_writable(folder: str) -> None:
    """Prove, before long work starts, that a file can be created in `folder` (or, while it does not exist yet,
    in its nearest existing parent, where it will be created); nothing is left behind."""
    probe_dir = os.path.abspath(folder)
    while not os.path.isdir(probe_dir) and os.path.dirname(probe_dir) != probe_dir:
        if os.path.lexists(probe_dir):
            raise WriteError(f"cannot write in {folder}: {probe_dir} is an existing file, not a folder; "
                             "choose another output folder")
        probe_dir = os.path.dirname(probe_dir)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(e, folder) from None
        raise


class _Writer:
    """A file object seen only through write(): torch.save and np.save then write through Python, which
    raises a real OSError (errno ENOSPC...) instead of torch's `[enforce fail at inline_container.cc]`
    or numpy's errno-less short-write error; the first OSError is kept to be re-raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed.

    Readers therefore never see a half-written file, and an interrupted run leaves nothing behind.
    A failure for want of space or permission becomes a WriteError naming `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        yield tmp
        # mkstemp makes the file owner-only; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno in WRITE_ERRNOS:
            raise write_error(e, path) from None
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """open() of a temporary file that becomes `path` once closed without error (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def _write_through(save, f) -> None:
    writer = _Writer(f)
    try:
        save(writer)
    except (RuntimeError, OSError):
        if writer.error is not None:
            raise writer.error from None
        raise


def atomic_torch_save(obj, path: str) -> None:
    with atomic_open(path) as f:
        _write_through(lambda w: torch.save(obj, w), f)


def atomic_torch_save_set(items) -> None:
    """torch.save each (obj, path) of `items` as one set: all go to temporary files first, then they are renamed
    in reverse order, so the first path appears only once the others are in place (and not at all if any
    write fails). A reader that sees the first file can rely on the rest of the set."""
    with contextlib.ExitStack() as stack:
        for obj, path in items:
            f = stack.enter_context(atomic_open(path))
            _write_through(lambda w: torch.save(obj, w), f)


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        _write_through(lambda w: np.save(w, array), f)


def read_text(path: str) -> str:
    """A text file as str: UTF-8, with or without a byte-order mark (editors on Windows add one), or UTF-16/32
    marked by theirs; any other encoding is an error naming the file."""
    with open(path, "rb") as f:
        data = f.read()
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            break
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not {encoding.upper()} text (byte {data[e.start:e.start + 1]!r} at offset {e.start}); "
                         "save it as UTF-8") from None


class DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs):
    """object_pairs_hook: a key given twice is an error (json keeps the last silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(f"key {key!r} is given twice (which one was meant?)")
        obj[key] = value
    return obj


def read_json_object(path: str, what: str) -> dict:
    """A JSON file that must hold an object; bad JSON, a key given twice or another type is an error naming
    the file."""
    try:
        obj = json.loads(read_text(path), object_pairs_hook=_refuse_duplicate_keys)
    except DuplicateKeyError as e:
        raise ValueError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object of {what}, found {type(obj).__name__}")
    return obj


def atomic_write_json(path: str, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_settings(path: str, settings: dict, write: bool) -> None:
    """Refuse to resume work saved with other settings (listed in the JSON file `path`); write the file
    (rank 0) when there is none yet."""
    if os.path.isfile(path):
        saved = read_json_object(path, "settings")
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"{path}: the files beside it were made with other settings "
                             f"({ {k: saved.get(k) for k in differ} } vs now { {k: settings.get(k) for k in differ} }); "
                             "use another output folder or delete that one")
    elif write:
        atomic_write_json(path, settings)


LOCK_NAME = "lock"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextlib.contextmanager
def folder_lock(folder: str, command: str):
    """Hold <folder>/lock (holding this process's pid and host) while this run of `command` works in `folder`;
    a second run into the same folder is refused at once. A lock whose process is gone (killed, crashed) is
    taken over."""
    path = os.path.join(folder, LOCK_NAME)
    host = socket.gethostname()
    # The lock appears with its content (a hard link of a written file), so a reader never sees it empty.
    mine = f"{path}.{os.getpid()}.tmp"
    with open(mine, "w") as f:
        f.write(f"{os.getpid()} {host}\n")
    try:
        while True:
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                try:
                    with open(path) as f:
                        owner, owner_host = f.read().split()
                    owner = int(owner)
                except FileNotFoundError:
                    continue  # released just now: try again
                except ValueError:
                    raise ValueError(f"{path}: a lock file that names no owner process; delete it if no other "
                                     f"{command} run works in this folder") from None
                if owner_host == host and not _owner_alive(owner):
                    print(f"{path}: removing the stale lock of process {owner}, which no longer runs", file=sys.stderr)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                    continue
                raise ValueError(f"{folder} is in use by another {command} run (process {owner} on "
                                 f"{owner_host}, lock {path}); wait for it to finish, or delete the lock if that "
                                 "process is gone") from None
    finally:
        os.remove(mine)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
