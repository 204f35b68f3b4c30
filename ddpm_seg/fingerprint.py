"""What results depend on, as content hashes: a checkpoint file or folder, an input file, loaded images and
labels. Run folders, feature stores, predict journals and generate-dataset indexes record these, so that
nothing is resumed or reused from inputs other than the ones that made it (a file replaced under the same
name has another hash)."""

import hashlib
import os

import numpy as np

CHUNK = 1 << 22  # bytes read at a time while hashing a file
_file_hashes = {}  # (real path, size, mtime_ns) -> sha256: a checkpoint is hashed once per process


def file_stamp(path: str) -> tuple:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (about 1 s per GB)."""
    stamp = file_stamp(path)
    if stamp not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                digest.update(block)
        _file_hashes[stamp] = digest.hexdigest()
    return _file_hashes[stamp]


def files_sha256(paths) -> str:
    """One sha256 of several files' contents, in order (e.g. an ensemble's members)."""
    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()


def path_sha256(path):
    """sha256 of a checkpoint: a file's bytes, or a folder's (e.g. a diffusers pipeline) files with their
    relative paths; None for no checkpoint or a name that is no path here (a hub id: its name is the identity)."""
    if path is None:
        return None
    if os.path.isfile(path):
        return file_sha256(path)
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(f"{os.path.relpath(full, path)}\0{file_sha256(full)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def data_sha256(items) -> str:
    """sha256 of labelled images as loaded (resized pixels and labels, in order): what training sees."""
    digest = hashlib.sha256()
    for item in items:
        for array in (item.image, item.label):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def short(sha) -> str:
    """A hash as shown in messages."""
    return sha[:12] if sha else "none"
