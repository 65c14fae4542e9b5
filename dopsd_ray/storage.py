"""A run's files, wherever train.output_dir points: a folder on this node, a mount every node
shares, or an object store (s3://, gs://, anything pyarrow.fs.FileSystem.from_uri takes).
This module is the only one that writes, copies, renames or removes a run's files.

    store = Storage(cfg.run_dir)                  # the run's root (Config.run_dir: a path or a URI)
    store.write("config.yaml", text)              # whole or absent, for every reader on any node
    store.write_with("samples/x.png", lambda p: image.save(p))   # made in a local file, then stored
    store.put_dir(local_dir, "export")            # each file whole, `last` ones after the rest
    store.read_text("mlflow_run_id.txt"), store.exists(name), store.size(name), store.listdir(name)
    store.fetch_dir("tiny_model", cache)          # a copy on this node's disk (local: the folder itself)
    store.local_path(name)                        # a Path on this node (None on an object store)

Whole or absent: on a local disk a file is written to a hidden `.NAME.PID.partial` sibling,
fsynced and renamed into place, so a writer killed half way leaves a partial file nothing reads;
on an object store each file is one upload, and an object exists only once it completed.
S3-compatible servers other than AWS: AWS_ENDPOINT_URL (pyarrow reads it, as the AWS CLI does).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

PARTIAL = ".partial"  # suffix of a local file still being written; never read
_FILESYSTEMS: dict[str, pafs.FileSystem] = {}  # scheme://bucket -> its filesystem (S3 resolves a region once)
CHUNK = 8 << 20
COMPLETE = ".complete"  # in a node-local copy: every file of it is in
DOWNLOADS = 8  # files a fetch_dir downloads at once


def is_uri(path: str | Path) -> bool:
    """An object-store URI (s3://, gs://, ...): not a path on this node."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(root: str | Path, *parts: str) -> str:
    """`root` / parts, a URI or a local path, as a string."""
    if is_uri(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return str(Path(root, *parts))


def write_atomic(path: str | Path, write) -> None:
    """On this node's disk: write(tmp_path) (or the str/bytes given), fsync, rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    if isinstance(write, (str, bytes)):
        data = write
        write = (lambda p: p.write_text(data)) if isinstance(data, str) else (lambda p: p.write_bytes(data))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    scheme, rest = uri.split("://", 1)
    key = f"{scheme}://{rest.split('/', 1)[0]}"  # the filesystem of the bucket; keys are paths in it
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = pafs.FileSystem.from_uri(key)[0]
    return _FILESYSTEMS[key], rest.rstrip("/")


class Storage:
    """One root (a local folder or an object-store prefix) and the files under it, by relative name."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.local = not is_uri(root)
        if self.local:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).absolute())
            self.uri = self.root
        else:
            self.fs, self.root = _filesystem(root)
            self.uri = root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def child(self, *parts: str) -> Storage:
        return Storage(self.path(*parts) if self.local else join(self.uri, *parts))

    def path(self, *parts: str) -> str:
        """The filesystem path of a name (pyarrow's: no scheme)."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def name_uri(self, *parts: str) -> str:
        """A name as users see it: a local path, or the full URI."""
        return join(self.uri, *parts)

    def local_path(self, *parts: str) -> Path | None:
        return Path(self.path(*parts)) if self.local else None

    # -- reading -----------------------------------------------------------------------
    def info(self, name: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(name))

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name) if name else self.root).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self.info(name).type == pafs.FileType.File

    def size(self, name: str) -> int:
        return self.info(name).size

    def listdir(self, name: str = "", folders: bool = False) -> list[str]:
        """The names directly under `name` (files and folders; only folders if `folders`), sorted;
        [] if there is none."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(name) if name else self.root, allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos
                      if not folders or i.type == pafs.FileType.Directory)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open_input(self, name: str):
        """A random-access file (reads of a header, without the rest)."""
        return self.fs.open_input_file(self.path(name))

    def files(self, name: str = "", recursive: bool = True) -> list[pafs.FileInfo]:
        """The files under `name` (with sizes and times), in its subfolders too if `recursive`."""
        base = self.path(name) if name else self.root
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def fetch_dir(self, name: str, destination: str | Path, recursive: bool = True) -> Path:
        """Every file under `name` (not in its subfolders unless `recursive`) in a folder on this
        node: the folder itself when the storage is local, else a copy in `destination`, each
        file whole, several downloading at once."""
        if self.local:
            return Path(self.path(name))
        destination, base = Path(destination), self.path(name) if name else self.root

        def fetch(info):
            write_atomic(destination / posixpath.relpath(info.path, base), lambda tmp: self._download(info.path, tmp))
        with ThreadPoolExecutor(DOWNLOADS) as pool:
            list(pool.map(fetch, self.files(name, recursive)))
        return destination

    def fetch_file(self, name: str, destination: str | Path) -> Path:
        """A copy of file `name` at the local path `destination`, whole or absent."""
        write_atomic(destination, lambda tmp: self._download(self.path(name), tmp))
        return Path(destination)

    def _download(self, path: str, local: Path) -> None:
        with self.fs.open_input_stream(path) as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)

    # -- writing -----------------------------------------------------------------------
    def _upload(self, name: str, write) -> None:
        """write(stream) into object `name`; an upload that fails half way is deleted (closing an
        S3 stream completes the object, whatever happened before)."""
        path = self.path(name)
        stream = self.fs.open_output_stream(path)
        try:
            write(stream)
        except BaseException:
            stream.close()
            self.fs.delete_file(path)
            raise
        stream.close()

    def write(self, name: str, data: str | bytes) -> str:
        """`data` as file `name`, whole or absent; returns where it went."""
        data = data.encode("utf-8") if isinstance(data, str) else data
        if self.local:
            write_atomic(self.path(name), data)
        else:
            self._upload(name, lambda stream: stream.write(data))
        return self.name_uri(name)

    def write_with(self, name: str, write) -> str:
        """write(local_path) makes the file (image.save, save_file, ...); it is stored as `name`."""
        if self.local:
            write_atomic(self.path(name), write)
            return self.name_uri(name)
        with tempfile.TemporaryDirectory(prefix="dopsd-put-") as tmp:
            local = Path(tmp, posixpath.basename(name))
            write(local)
            return self.put_file(local, name)

    def put_file(self, source: str | Path, name: str) -> str:
        """A copy of the local file `source` as `name`, whole or absent."""
        if self.local:
            write_atomic(self.path(name), lambda tmp: shutil.copyfile(source, tmp))
            return self.name_uri(name)

        def copy(stream):
            with open(source, "rb") as src:
                while chunk := src.read(CHUNK):
                    stream.write(chunk)
        self._upload(name, copy)
        return self.name_uri(name)

    def put_dir(self, source: str | Path, name: str, last: tuple[str, ...] = ()) -> str:
        """Every file under the local folder `source` (not partial ones), each whole, those named
        in `last` after all the others (a reader takes the folder as complete once they exist)."""
        source = Path(source)
        files = sorted((p for p in source.rglob("*") if p.is_file() and not p.name.endswith(PARTIAL)),
                       key=lambda p: (p.name in last, last.index(p.name) if p.name in last else 0, str(p)))
        for f in files:
            self.put_file(f, posixpath.join(name, f.relative_to(source).as_posix()))
        return self.name_uri(name)

    def make_dir(self, name: str = "") -> Path | None:
        """The local folder `name`, created (a SQLite file needs one); None on an object store."""
        if not self.local:
            return None
        folder = Path(self.path(name) if name else self.root)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def remove(self, name: str) -> None:
        """A file or a folder with everything in it; nothing if absent."""
        info = self.info(name)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)


def local_copy(path: str | Path, recursive: bool = True) -> str:
    """A folder on an object store (a model, an export, a context cache) copied into this node's
    cache, where every process of the node finds it; a local path as it is. The copy is named
    after the folder's listing (every file's name, size and time), so a folder whose files were
    replaced gets a new copy; the node's processes make it once, one at a time (a file lock).
    `recursive=False`: the files directly in it (an export folder, without its step_N folders)."""
    if not is_uri(path):
        return str(path)
    store = Storage(path)
    files = store.files(recursive=recursive)
    if not files:
        raise FileNotFoundError(f"{path} does not exist, or holds no files")
    listing = hashlib.sha256(repr([(i.path, i.size, i.mtime_ns) for i in files]).encode()).hexdigest()[:16]
    folder = node_cache("copies", f"{store.uri.split('://', 1)[1].strip('/').replace('/', '_')}@{listing}")
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:  # one process of the node copies
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / COMPLETE).exists():
            store.fetch_dir("", folder, recursive)
            write_atomic(folder / COMPLETE, "")
    return str(folder)


def node_cache(*parts: str) -> Path:
    """A folder on this node's own disk for copies of stored files (models, checkpoints)."""
    folder = Path(os.environ.get("DOPSD_CACHE", Path(tempfile.gettempdir()) / "dopsd-cache")).joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
