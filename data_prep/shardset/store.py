"""Where shards and sources live: a local folder or an S3 prefix, behind one small interface.

Paths inside a store are relative, '/'-separated ("train/shard-000000.tar") and never leave it: an absolute
path, a `..` segment or a NUL (a name from a crafted manifest, listing or S3 key) is refused (UnsafePath).
Writes are atomic: a file is staged locally and only appears under its final name when complete (os.replace
locally, one whole upload on S3), so a reader or a resumed job never sees half a shard.
"""

from __future__ import annotations

import builtins  # the stores have a method named `list`: annotations inside them say builtins.list
import os
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

from swin_common.errors import UserError

# (path inside the store, byte offset, size or None for "to the end")
ReadRequest = tuple[str, int, "int | None"]


class UnsafePath(UserError, ValueError):
    """A path inside a store that would leave it (absolute, `..`) or cannot be a file name (NUL)."""


class StoreURLError(UserError, ValueError):
    """A store URL that names no store (s3:// without a bucket)."""


def inside(rel: str, where: str) -> str:
    """`rel` when it is a relative path that stays inside the store `where`; else UnsafePath naming both."""
    if "\0" in rel or rel[:1] == "/" or (".." in rel and ".." in rel.split("/")):  # cheap for 14M listed files
        raise UnsafePath(
            f"{rel!r} is not a path inside {where}: absolute paths, '..' segments and NUL characters are refused"
        )
    return rel


def open_store(url: str) -> LocalStore | S3Store:
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise StoreURLError(f"S3 URL needs a bucket: {url!r}")
        return S3Store(bucket, prefix.strip("/"))
    return LocalStore(url)


class LocalStore:
    seekable = True

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / inside(rel, self.url) if rel else self.root

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Yields (relative path, size) of every file under prefix, in no particular order."""
        base = self._path(prefix)
        if not base.exists():
            return
        # scandir, not os.walk + relpath: this lists 14M files, and relative paths are built as strings
        folders = [(str(base), prefix.strip("/") + "/" if prefix.strip("/") else "")]
        while folders:
            folder, rel = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue  # removed since its parent was read
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    folders.append((entry.path, rel + entry.name + "/"))
                    continue
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    continue  # another task's file being written; it appears under its name when complete
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue  # renamed or removed since the directory was read
                yield rel + entry.name, size

    def list_names(self, names: builtins.list[str]) -> Iterator[tuple[str, int]]:
        """(relative path, size) of the files in the folders of `names` (those of `names` that exist, and perhaps a
        few more): one scandir per distinct folder, so the names need not lie under one split folder."""
        for folder in sorted({name.rpartition("/")[0] for name in names}):
            rel = folder + "/" if folder else ""
            try:
                entries = list(os.scandir(self._path(folder)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    continue  # another task's file being written
                try:
                    if entry.is_file(follow_symlinks=True):
                        yield rel + entry.name, entry.stat().st_size
                except FileNotFoundError:
                    continue  # removed since the directory was read

    def list_dir(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """Top-level (subfolders, files) of the store, sorted."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder does not exist: {self.root}")
        dirs: builtins.list[str] = []
        files: builtins.list[str] = []
        for entry in os.scandir(self.root):
            (dirs if entry.is_dir() else files).append(entry.name)
        return sorted(dirs), sorted(files)

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def read(self, rel: str, offset: int = 0, size: int | None = None) -> bytes:
        with open(self._path(rel), "rb") as f:
            if offset:
                f.seek(offset)
            return f.read() if size is None else f.read(size)

    def open_read(self, rel: str) -> BinaryIO:
        return open(self._path(rel), "rb")

    def read_many(self, requests: Iterable[ReadRequest], depth: int = 128) -> Iterator[bytes | OSError]:
        """Each request's bytes (or its OSError), in order, read ahead by the kernel.

        Reads in order, telling the kernel `depth` requests ahead (posix_fadvise WILLNEED) so the disk works
        while the caller decodes; no threads, so no fight for the GIL. A failed read yields its OSError."""
        window: deque = deque()
        pending = iter(requests)

        root = str(self.root) + "/"  # plain strings: pathlib costs more than the read itself here

        def hint(request):
            rel, offset, size = request
            try:
                fd = os.open(root + inside(rel, self.url), os.O_RDONLY)
            except (OSError, UnsafePath) as e:
                return None, request, e
            os.posix_fadvise(fd, offset, size or 0, os.POSIX_FADV_WILLNEED)
            return fd, request, None

        for request in pending:
            window.append(hint(request))
            if len(window) >= depth:
                break
        while window:
            fd, (rel, offset, size), error = window.popleft()
            nxt = next(pending, None)
            if nxt is not None:
                window.append(hint(nxt))
            if error is not None:
                yield error
                continue
            try:
                if size is None:
                    size = os.fstat(fd).st_size - offset
                yield os.pread(fd, size, offset)
            except OSError as e:
                yield e
            finally:
                os.close(fd)

    def local_path(self, rel: str) -> Path:
        return self._path(rel)

    def staging_path(self, rel: str) -> Path:
        """A temporary file beside the final one (same filesystem, so the rename is atomic)."""
        final = self._path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".{final.name}.tmp-{os.getpid()}")

    def commit(self, staged: Path, rel: str) -> None:
        # On disk before it has its name: a machine crash must not leave a named but empty shard.
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, self._path(rel))

    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        staged = self.staging_path(rel)
        staged.write_bytes(data)
        if durable:
            self.commit(staged, rel)
        else:
            os.replace(staged, self._path(rel))

    def remove_stale_staging(self, rel: str) -> None:
        """Deletes temporaries a killed run left for this file."""
        final = self._path(rel)
        if final.parent.is_dir():
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                stale.unlink(missing_ok=True)


_client_lock = threading.Lock()


def _new_client_lock() -> None:  # a thread of the parent may have held it at the fork
    global _client_lock
    _client_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_client_lock)


class S3Store:
    """An S3 prefix through boto3.

    The endpoint, region and credentials come from the usual AWS environment
    and config files (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for a non-AWS server)."""

    seekable = False

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = None
        self._client_pid = None

    @property
    def client(self):
        # boto3 clients must not cross a fork: make one per process, from its own session (the default session
        # may be in use by another thread, e.g. the loader's read-ahead, at the moment of the fork).
        # Made once under a lock: threads asking at once (read-ahead's downloads) would each make one, at a
        # cost in CPU (docs/performance.md).
        if self._client is None or self._client_pid != os.getpid():
            with _client_lock:
                if self._client is None or self._client_pid != os.getpid():
                    import boto3
                    from botocore.config import Config

                    config = Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32)
                    self._client = boto3.session.Session().client("s3", config=config)
                    self._client_pid = os.getpid()
        return self._client

    def __getstate__(self):
        return {"bucket": self.bucket, "prefix": self.prefix, "url": self.url, "_client": None, "_client_pid": None}

    def _key(self, rel: str) -> str:
        inside(rel, self.url)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        full = self._key(prefix)
        if full and not full.endswith("/"):
            full += "/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][cut:], obj["Size"]

    def list_names(self, names: builtins.list[str], threads: int = 16) -> Iterator[tuple[str, int]]:
        """(relative path, size) of the objects named in `names` (and perhaps a few more), listed in parallel.

        (relative path, size) of the objects whose keys start like `names` (and perhaps a few more): one
        listing per group of about 100 names sharing all but their last two characters before the extension,
        `threads` at a time. For 14,200 shards this is ~140 small LISTs in parallel instead of 29 pages in a row
        (and SeaweedFS, like other stores, answers a page deep into a big folder more slowly)."""
        groups = sorted({name.rsplit(".", 1)[0][:-2] for name in names})
        cut = len(self.prefix) + 1 if self.prefix else 0

        def one(group: str) -> list[tuple[str, int]]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(group)
            ):
                out += [(o["Key"][cut:], o["Size"]) for o in page.get("Contents", [])]
            return out

        with ThreadPoolExecutor(threads) as pool:
            for part in pool.map(one, groups):
                yield from part

    def list_dir(self) -> tuple[builtins.list[str], builtins.list[str]]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        dirs: builtins.list[str] = []
        files: builtins.list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        ):
            dirs += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            files += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        if not dirs and not files:
            raise FileNotFoundError(f"nothing found under {self.url}")
        return sorted(dirs), sorted(files)

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, rel: str) -> int:
        return self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"]

    def read(self, rel: str, offset: int = 0, size: int | None = None) -> bytes:
        kwargs = {}
        if size is not None:
            if size == 0:
                return b""
            kwargs["Range"] = f"bytes={offset}-{offset + size - 1}"
        elif offset:
            kwargs["Range"] = f"bytes={offset}-"
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **kwargs)["Body"].read()

    def open_read(self, rel: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]

    def read_many(
        self, requests: Iterable[ReadRequest], threads: int = 16, ahead: int | None = None
    ) -> Iterator[bytes | Exception]:
        """Each request's bytes (or its error), in order, with `threads` GETs in flight and bounded memory.

        Reads in order with `threads` GETs in flight, hiding each request's round trip; at most `ahead`
        (default 2 x threads) requests are taken from `requests` before the caller has their answers, so memory
        stays bounded however big the shard. A failed read (missing object, denied, ...) yields its exception."""
        from botocore.exceptions import BotoCoreError, ClientError

        def read(request):
            rel, offset, size = request
            try:
                return self.read(rel, offset, size)
            except (OSError, BotoCoreError, ClientError, UnsafePath) as e:
                return e

        ahead = ahead or 2 * threads
        with ThreadPoolExecutor(threads) as pool:
            window: deque = deque()
            for request in requests:
                window.append(pool.submit(read, request))
                if len(window) >= ahead:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def download_to(self, rel: str, fileobj: BinaryIO, size: int | None = None) -> None:
        """Writes the whole object `rel` into an open, seekable file.

        The whole object into an open, seekable file: boto3's transfer manager (parallel ranged GETs written
        at their offsets) for big objects or an unknown size; one streamed GET for one under 64 MiB, which costs
        the reader's CPU about half as much (its threads and futures are overhead for one request: 5.3 against
        9.7 CPU-ms per 4 MiB object, measured against the test S3 server)."""
        if size is None or size >= 64 << 20:
            self.client.download_fileobj(self.bucket, self._key(rel), fileobj)
            return
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
        with closing(body):
            while chunk := body.read(1 << 20):
                fileobj.write(chunk)

    def staging_path(self, rel: str) -> Path:
        fd, path = tempfile.mkstemp(prefix="swin-prep-", suffix="-" + inside(rel, self.url).replace("/", "_"))
        os.close(fd)
        return Path(path)

    def commit(self, staged: Path, rel: str) -> None:
        # The transfer manager does multipart for big shards; the object only exists once the upload completes.
        try:
            self.client.upload_file(str(staged), self.bucket, self._key(rel))
        finally:
            staged.unlink(missing_ok=True)

    def write_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def remove_stale_staging(self, rel: str) -> None:
        pass  # staging is in a local temp dir; S3 never holds a partial object
