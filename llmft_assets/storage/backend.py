"""One storage API over a local folder or an S3 prefix (any S3-compatible endpoint).

Keys are `/`-separated paths relative to the storage root. Single-object writes are atomic on both
backends (a local write goes to a temporary file then `os.replace`; an S3 PUT is atomic), which is what
the publish protocol in `publish.py` builds on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from llmft_assets import settings


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the cause."""


class ObjectNotFound(StorageError):
    pass


class StorageBackend(ABC):
    root_uri: str

    def uri(self, key: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{key.lstrip('/')}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_file(self, key: str, local_path: Path) -> None: ...

    def move_file(self, key: str, local_path: Path) -> None:
        """`put_file` for a file the caller is done with: a backend that can takes the file itself
        instead of a copy (the local folder renames it into place). `local_path` may be gone afterwards."""
        self.put_file(key, local_path)

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def download_file(self, key: str, local_path: Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix` (recursively), sorted."""

    def list(self, prefix: str) -> list[str]:
        return list(self.iter_keys(prefix))

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """The file itself when the backend is a local folder, so readers can skip a copy."""
        return None


class LocalBackend(StorageBackend):
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if self.root != path and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the storage root {self.root}")
        return path

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def _atomic_write(self, key: str, writer) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda handle: handle.write(data))

    def put_file(self, key: str, local_path: Path) -> None:
        def copy(handle) -> None:
            with open(local_path, "rb") as source:
                shutil.copyfileobj(source, handle, length=8 * 1024 * 1024)

        self._atomic_write(key, copy)

    def move_file(self, key: str, local_path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local_path, "rb") as handle:
            os.fsync(handle.fileno())  # durable before it becomes visible, as `_atomic_write` makes copies
        try:
            os.replace(local_path, target)  # atomic: readers see no file or the whole file
        except OSError:  # another file system (EXDEV) or a read-only source: copy instead
            self.put_file(key, local_path)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path} does not exist") from exc

    def download_file(self, key: str, local_path: Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"{path} does not exist")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, local_path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def iter_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix
            return
        if not base.is_dir():
            return
        for path in sorted(p for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
            yield path.relative_to(self.root).as_posix()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _is_transient(exc: BaseException) -> bool:
    """Connection trouble and throttling are worth retrying; missing keys and auth errors are not."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, S3UploadFailedError):
        # upload_file re-raises a ClientError (503 SlowDown, 500...) as S3UploadFailedError; judge the cause.
        return exc.__context__ is not None and _is_transient(exc.__context__)
    # ConnectionError: endpoint unreachable; HTTPClientError: connection reset mid-request, read timeout.
    if isinstance(exc, ConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"} or status >= 500
    return False


_s3_retry = retry(
    retry=retry_if_exception(_is_transient),
    # LLMFT_S3_ATTEMPTS, read at each call's first retry decision (not at import).
    stop=lambda state: stop_after_attempt(settings.get().s3_attempts)(state),
    wait=wait_exponential(multiplier=0.5, max=8),
    reraise=True,
)


class S3Backend(StorageBackend):
    """An `s3://bucket/prefix` root through a boto3 client (from dagster-aws's S3Resource in Dagster)."""

    def __init__(self, root_uri: str, client: Any):
        if not root_uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {root_uri!r}")
        bucket, _, prefix = root_uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {root_uri!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.root_uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, key: str, exc: Exception) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in {
            "NoSuchKey",
            "404",
            "NotFound",
        }:
            return ObjectNotFound(f"{self.uri(key)} does not exist")
        return StorageError(f"S3 operation on {self.uri(key)} failed: {exc}")

    @_s3_retry
    def _put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._put_bytes(key, data)
        except Exception as exc:
            raise self._wrap(key, exc) from exc

    @_s3_retry
    def _put_file(self, key: str, local_path: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        # upload_file switches to multipart above the threshold; a multipart object only becomes
        # visible when completed, so readers never see part of it.
        config = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)
        self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=config)

    def put_file(self, key: str, local_path: Path) -> None:
        try:
            self._put_file(key, local_path)
        except Exception as exc:
            raise self._wrap(key, exc) from exc

    @_s3_retry
    def _get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._get_bytes(key)
        except Exception as exc:
            raise self._wrap(key, exc) from exc

    @_s3_retry
    def _download(self, key: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.part")
        self.client.download_file(self.bucket, self._key(key), str(tmp))
        os.replace(tmp, local_path)

    def download_file(self, key: str, local_path: Path) -> None:
        try:
            self._download(key, local_path)
        except Exception as exc:
            raise self._wrap(key, exc) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._head(key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise self._wrap(key, exc) from exc
        except Exception as exc:
            raise self._wrap(key, exc) from exc

    @_s3_retry
    def _head(self, key: str) -> None:
        self.client.head_object(Bucket=self.bucket, Key=self._key(key))

    def iter_keys(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix)
        strip = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._wrap(prefix, exc) from exc
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._wrap(key, exc) from exc


def make_s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the standard environment (AWS_ENDPOINT_URL, AWS_* credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"),
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
    )


def open_storage(root_uri: str, *, s3_client: Any | None = None) -> StorageBackend:
    """The backend for a storage root: `s3://bucket/prefix` or a local path."""
    if root_uri.startswith("s3://"):
        return S3Backend(root_uri, s3_client if s3_client is not None else make_s3_client())
    if "://" in root_uri and not root_uri.startswith("file://"):
        raise ValueError(f"unsupported storage root {root_uri!r}: use a local path or s3://bucket/prefix")
    return LocalBackend(root_uri.removeprefix("file://"))
