"""`ddpm-seg download`: fetch datasets and checkpoints by name, with resume and checksum verification.

Every download script in the repository calls this one downloader. The named resources live in
downloads.json beside this file: name -> {"urls": [primary, alternatives...], "dest": path relative to
--root, "sha256": hex or null, "extract_to": folder (archives only), "model_flags": guided-diffusion flags
(checkpoints whose architecture is not the default; written beside the checkpoint as model_flags.json, which
train-interpreter and sweep read)}.

A transfer goes to <dest>.part and resumes from there with an HTTP Range request; only a complete,
size-checked (and, where a sum is recorded, sha256-checked) file is renamed onto <dest>. Archives are
extracted into a temporary folder beside their target, moved into place, then deleted; a
.<archive>.sha256 marker in the target records that the extraction finished.
"""

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from guided_diffusion.checkpoint import model_flags_path

from ..files import atomic_path, atomic_write_json

from ..progress import progress_bar

TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "downloads.json")
BASE_URL_ENV = "DDPM_SEG_DOWNLOAD_BASE_URL"
CHUNK = 1 << 20
TIMEOUT_S = 60  # per socket operation, not for the whole transfer


class DownloadError(RuntimeError):
    """A source could not deliver the file (network, HTTP status, transfer cut short)."""


class SourceUnavailable(DownloadError):
    """The source failed before sending any bytes, so the next source may be tried."""


def load_table(path: str = TABLE_PATH) -> dict:
    with open(path) as f:
        table = json.load(f)
    for name, entry in table.items():
        if not entry.get("urls") or not entry.get("dest"):
            raise ValueError(f"{path}: entry {name!r} needs a non-empty 'urls' list and a 'dest' path")
    return table


def rebase(url: str, base_url: str | None) -> str:
    """Point `url` at a mirror (or a test server) that keeps the original path and query."""
    if not base_url:
        return url
    parts = urllib.parse.urlsplit(url)
    return base_url.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int):
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            raise  # Range Not Satisfiable: the caller starts over from byte 0
        raise SourceUnavailable(f"{url} answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SourceUnavailable(f"cannot reach {url} ({reason}); check the network connection, "
                                f"or point --base-url / ${BASE_URL_ENV} at a mirror") from e


def _download_to_part(url: str, part: str) -> None:
    """Append the rest of `url` to `part` (resuming from its current size) and check the final size."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError:
        # 416: the server cannot continue from our offset (the part is already whole, or the file changed).
        os.remove(part)
        offset, response = 0, _open(url, 0)
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range and is sending the whole file: start over
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise DownloadError(f"{url} resumed at the wrong offset (Content-Range "
                                f"{response.headers.get('Content-Range')!r}, expected bytes {offset}-); "
                                f"delete {part} to download from the start")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = progress_bar(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=os.path.basename(part)[: -len(".part")])
        with open(part, "ab" if offset else "wb") as f, bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout: what arrived stays in the part
                    raise DownloadError(f"transfer from {url} broke off ({e}); run the same command again to resume") from e
                if not chunk:
                    break
                f.write(chunk)  # a full disk is the disk's error, not the transfer's (the CLI names the path)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size != total:
        raise DownloadError(f"transfer from {url} stopped at {size} of {total} bytes; "
                            f"run the same command again to resume from {part}")


def check_sha256(path: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected.lower():
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


@contextlib.contextmanager
def new_folders_removed_on_failure(folder: str):
    """Create `folder` (and missing parents); if the body fails, remove those it created that are still empty,
    so a failed download leaves no empty folder tree behind."""
    created, path = [], os.path.abspath(folder)
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only succeeds on an empty folder
        raise


def download(urls, dest: str, sha256: str | None = None) -> str:
    """Download the first source that answers into `dest` atomically; returns the file's sha256."""
    with new_folders_removed_on_failure(os.path.dirname(os.path.abspath(dest))):
        return _download(urls, dest, sha256)


def _download(urls, dest: str, sha256: str | None) -> str:
    part = dest + ".part"
    failures = []
    for url in urls:
        try:
            print(f"downloading {url} -> {dest}", file=sys.stderr)
            _download_to_part(url, part)
            break
        except SourceUnavailable as e:
            failures.append(str(e))
    else:
        raise DownloadError(f"could not download {dest} from any source:\n  " + "\n  ".join(failures))
    actual = sha256_file(part)
    try:
        check_sha256(part, actual, sha256)
    except ValueError:
        os.remove(part)  # resuming a corrupt file would only reproduce the mismatch
        raise
    os.replace(part, dest)
    return actual


def _safe_member_path(root: str, member: tarfile.TarInfo, archive: str) -> str:
    name = os.path.normpath(member.name)
    if os.path.isabs(name) or name == ".." or name.startswith(".." + os.sep):
        raise ValueError(f"{archive}: member {member.name!r} would be written outside the extraction folder")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"{archive}: member {member.name!r} is a link or special file; "
                         "only files and folders are extracted")
    return os.path.join(root, name)


def extract_tar(archive: str, into: str) -> list:
    """Extract `archive` into folder `into`, refusing members that escape it; returns the top-level names.

    Members go to a temporary folder first and are moved into place only when all of them arrived,
    so a broken archive leaves `into` untouched."""
    os.makedirs(into, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=into)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                path = _safe_member_path(tmp, member, archive)
                if member.isdir():
                    os.makedirs(path, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with tar.extractfile(member) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        names = sorted(os.listdir(tmp))
        clashes = [n for n in names if os.path.lexists(os.path.join(into, n))]
        if clashes:
            raise FileExistsError(f"{archive}: {', '.join(os.path.join(into, n) for n in clashes)} already exist; "
                                  "move them away to extract again")
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(into, n))
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _marker(entry: dict, root: str) -> str:
    return os.path.join(root, entry["extract_to"], "." + os.path.basename(entry["dest"]) + ".sha256")


def fetch(name: str, table: dict, root: str = ".", base_url: str | None = None) -> str:
    """Make resource `name` present under `root` (download, verify, extract); returns its sha256."""
    if name not in table:
        raise ValueError(f"unknown download {name!r}; valid names: {', '.join(table)}")
    entry = table[name]
    dest = os.path.join(root, entry["dest"])
    extract_to = os.path.join(root, entry["extract_to"]) if entry.get("extract_to") else None
    if extract_to and os.path.exists(_marker(entry, root)):
        print(f"{name}: already extracted into {extract_to}", file=sys.stderr)
        with open(_marker(entry, root)) as f:
            return f.read().split()[0]
    if os.path.exists(dest):
        sha = sha256_file(dest)
        check_sha256(dest, sha, entry.get("sha256"))
        print(f"{name}: already present at {dest}", file=sys.stderr)
    else:
        sha = download([rebase(u, base_url) for u in entry["urls"]], dest, entry.get("sha256"))
    if entry.get("model_flags") and not os.path.exists(model_flags_path(dest)):
        atomic_write_json(model_flags_path(dest), entry["model_flags"])
    if extract_to:
        with new_folders_removed_on_failure(extract_to):
            extract_tar(dest, extract_to)
        with atomic_path(_marker(entry, root)) as tmp, open(tmp, "w") as f:
            f.write(f"{sha}  {os.path.basename(dest)}\n")
        os.remove(dest)  # the extracted files are what is used; the marker keeps its checksum
    print(f"{name}: done ({dest if not extract_to else extract_to}, sha256 {sha})", file=sys.stderr)
    return sha


def record_sha256(table_path: str, name: str, sha256: str) -> None:
    """Store the sha256 of a verified download in the table so later downloads are checked against it."""
    table = load_table(table_path)
    table[name]["sha256"] = sha256
    atomic_write_json(table_path, table)


def main(argv):
    parser = argparse.ArgumentParser(prog="ddpm-seg download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="resources to fetch, e.g. datasets ddpm/lsun_bedroom (see --list)")
    parser.add_argument("--list", action="store_true", help="list the known resources and exit")
    parser.add_argument("--root", default=".", help="folder the destinations are relative to (default: .)")
    parser.add_argument("--record", action="store_true",
                        help="after a verified download, write its sha256 into the table file")
    parser.add_argument("--base-url", default=os.environ.get(BASE_URL_ENV),
                        help=f"fetch from this mirror instead, keeping each URL's path (env ${BASE_URL_ENV})")
    parser.add_argument("--table", default=TABLE_PATH, help="the JSON table of resources (default: the packaged one)")
    args = parser.parse_args(argv)
    table = load_table(args.table)
    if args.list:
        for name, entry in table.items():
            sums = "sha256 recorded" if entry.get("sha256") else "no sha256 yet"
            print(f"{name:28s} -> {entry.get('extract_to') or entry['dest']}  ({sums})")
        return 0
    if not args.names:
        parser.error(f"name at least one resource; valid names: {', '.join(table)}")
    unknown = [name for name in args.names if name not in table]
    if unknown:  # bad input: exit code 2 through the CLI, before anything is fetched
        raise ValueError(f"unknown download(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(table)}")
    try:
        for name in args.names:
            sha = fetch(name, table, args.root, args.base_url)
            if args.record and table[name].get("sha256") != sha:
                record_sha256(args.table, name, sha)
                print(f"{name}: recorded sha256 {sha} in {args.table}", file=sys.stderr)
    except (DownloadError, ValueError, FileExistsError) as e:  # the network or the files fetched: exit code 1
        print(f"ddpm-seg download: error: {e}", file=sys.stderr)
        return 1
    return 0
