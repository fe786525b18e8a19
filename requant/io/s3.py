"""S3 object storage (AWS S3, MinIO, Ceph, SeaweedFS) through boto3.

Endpoint and credentials come from the standard environment: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``. Reads are
byte-range GETs; uploads are multipart with SHA256 checksums; every call retries with backoff, so a
restarting S3 server delays a run instead of failing it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from requant import settings
from requant.errors import CheckpointError, RequantError, SystemFailure
from requant.io.paths import check_relative

T = TypeVar("T")
MULTIPART_CHUNK = 64 * 1024 * 1024


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise RequantError(f"{uri}: not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if len(bucket) < 3:
        raise RequantError(f"{uri}: bucket names need at least 3 characters")
    return bucket, prefix.strip("/")


# Variables that decide which identity boto3 resolves. boto3's default session resolves credentials once per
# process and keeps them, so a process whose AWS_* variables change (a test switching servers, a long-lived
# worker given new credentials) would go on signing with the old ones: sessions are kept per identity instead.
IDENTITY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
_sessions: dict[tuple, object] = {}
_clients: dict[tuple, object] = {}
_sessions_lock = threading.Lock()
MAX_CONNECTIONS = 32  # one client serves a process's threads: read-ahead, multipart parts, transfers


def client():
    """This process's S3 client for the object store and identity its environment names now. boto3 clients are
    thread-safe and cost ~30 ms of CPU to build, which each layer job paid several times over; one per process
    (and per set of AWS_* variables) is shared instead."""
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), settings)  # a forked child builds its own: connection pools do not cross processes
    cached = _clients.get(key)
    if cached is not None:
        return cached
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    max_pool_connections=MAX_CONNECTIONS)
    identity = tuple(os.environ.get(name) for name in IDENTITY_VARS)
    with _sessions_lock:  # boto3 sessions are not safe to create clients from concurrently
        if key not in _clients:
            session = _sessions.get(identity)
            if session is None:
                session = _sessions[identity] = boto3.session.Session()
            _clients[key] = session.client("s3", config=config, region_name=os.environ.get("AWS_REGION", "us-east-1"))
        return _clients[key]


def client_env() -> dict[str, str]:
    """The object-store settings this process uses, as environment variables for a child process (an engine
    reading s3:// itself): endpoint, region and the credentials boto3 resolved here, whether they came from
    the environment, a profile or a role, so the child reads with exactly the same identity."""
    import boto3

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_ENDPOINT_URL") or k in ("AWS_REGION", "AWS_CA_BUNDLE")}
    credentials = boto3.Session().get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = frozen.access_key, frozen.secret_key
        if frozen.token:
            env["AWS_SESSION_TOKEN"] = frozen.token
    return env


def _retrying(what: str, fn: Callable[[], T]) -> T:
    """Retry connection-level failures (server restarting, network blips) with exponential backoff."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError, ReadTimeoutError

    retry_seconds = settings.S3_RETRY_SECONDS.get()
    delay, deadline = 0.5, time.monotonic() + retry_seconds
    while True:
        try:
            return fn()
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise SystemFailure(f"{what}: no object-store credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                                f"AWS_SECRET_ACCESS_KEY, a profile, or a node role") from exc
        except (BotoConnectionError, ReadTimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise RequantError(f"{what}: object storage unreachable for {retry_seconds:.0f}s ({exc})") from exc
            time.sleep(delay)
            delay = min(delay * 2, 10)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _missing(exc: Exception) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


REFUSED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "AuthorizationHeaderMalformed", "AllAccessDisabled")


def describe_client_error(uri: str, exc: Exception) -> RequantError:
    """One line for an object-store refusal: what was refused, why, and what to check."""
    code = _code(exc)
    if code in REFUSED:
        return SystemFailure(f"{uri}: credentials refused by the object store ({code}); check AWS_ACCESS_KEY_ID / "
                             f"AWS_SECRET_ACCESS_KEY (or the node's role) and the endpoint "
                             f"{os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL') or '(AWS default)'}")
    if code == "NoSuchBucket":
        return SystemFailure(f"{uri}: bucket {uri[5:].split('/', 1)[0]!r} does not exist ({code})")
    message = getattr(exc, "response", {}).get("Error", {}).get("Message") or str(exc)
    return SystemFailure(f"{uri}: object store error {code or type(exc).__name__}: {message}")


class S3Storage:
    """A checkpoint under ``s3://bucket/prefix``: a :class:`requant.io.storage.WritableStorage`."""

    def __init__(self, uri: str):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client = None

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "uri": self.uri, "_client": None}

    @property
    def s3(self):
        if self._client is None:
            self._client = client()
        return self._client

    def key(self, path: str) -> str:
        rel = check_relative(path, self.uri)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, path: str, fn: Callable[[], T]) -> T:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError

        try:
            return _retrying(f"{self.uri}/{path}", fn)
        except S3UploadFailedError as exc:  # the transfer manager wraps the ClientError of the failed part
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise describe_client_error(f"{self.uri}/{path}", cause) from exc
            raise SystemFailure(f"{self.uri}/{path}: upload failed: {exc}") from exc
        except ClientError as exc:
            if _missing(exc):
                raise CheckpointError(f"{self.uri}/{path}", "object is missing") from exc
            raise describe_client_error(f"{self.uri}/{path}", exc) from exc

    # --- read side ---------------------------------------------------------------------------------
    def size(self, path: str) -> int:
        return self._call(path, lambda: self.s3.head_object(Bucket=self.bucket, Key=self.key(path)))["ContentLength"]

    def head(self, path: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return _retrying(f"{self.uri}/{path}", lambda: self.s3.head_object(Bucket=self.bucket, Key=self.key(path)))
        except ClientError as exc:
            if _missing(exc):  # no such object (HEAD has no body: a missing bucket answers 404 too)
                return None
            raise describe_client_error(f"{self.uri}/{path}", exc) from exc

    def check_bucket(self) -> None:
        """Fail with one line when the bucket does not exist or the credentials are refused (readers call
        this when opening a location, as a local directory that does not exist fails at open)."""
        from botocore.exceptions import ClientError

        uri = self.uri
        try:
            _retrying(uri, lambda: self.s3.head_bucket(Bucket=self.bucket))
        except ClientError as exc:
            if _missing(exc) or _code(exc) == "NoSuchBucket":
                raise SystemFailure(f"{uri}: bucket {self.bucket!r} does not exist") from exc
            raise describe_client_error(uri, exc) from exc

    def read_range(self, path: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        body = self._call(path, lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key(path),
                                                           Range=f"bytes={start}-{end - 1}")["Body"].read())
        if len(body) != end - start:
            raise CheckpointError(f"{self.uri}/{path}", f"short read: wanted bytes {start}..{end}, got {len(body)}")
        return body

    def read_bytes(self, path: str) -> bytes:
        return self._call(path, lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key(path))["Body"].read())

    def open_body(self, path: str, start: int = 0):
        """The object from byte ``start`` to its end as a streaming body (``read``, ``close``): one GET, read as it
        goes (:mod:`requant.io.stream`)."""
        return self._call(path, lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key(path),
                                                           Range=f"bytes={start}-")["Body"])

    def exists(self, path: str) -> bool:
        return self.head(path) is not None

    def list_files(self, under: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        start = base + (f"{under.strip('/')}/" if under else "")
        names: list[str] = []

        def scan() -> None:
            names.clear()
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                names.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))

        self._call(under or ".", scan)
        return sorted(names)

    def sha256(self, path: str) -> str:
        def stream() -> str:
            digest = hashlib.sha256()
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key(path))["Body"]
            for chunk in body.iter_chunks(8 << 20):
                digest.update(chunk)
            return digest.hexdigest()

        return self._call(path, stream)

    def recorded_sha256(self, path: str) -> str | None:
        """The sha256 this tool stored as metadata when it uploaded the object (S3 verified the bytes)."""
        head = self.head(path)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def copy_file_to(self, path: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        self._call(path, lambda: self.s3.download_file(self.bucket, self.key(path), str(dst)))

    # --- write side --------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Create the output's bucket if it does not exist (and say clearly when that is not allowed)."""
        from botocore.exceptions import ClientError

        try:
            _retrying(self.uri, lambda: self.s3.head_bucket(Bucket=self.bucket))
            return
        except ClientError as exc:
            if not (_missing(exc) or _code(exc) == "NoSuchBucket"):
                raise describe_client_error(self.uri, exc) from exc
        try:
            _retrying(self.uri, lambda: self.s3.create_bucket(Bucket=self.bucket))
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise SystemFailure(f"{self.uri}: bucket {self.bucket!r} does not exist and could not be created "
                                    f"({_code(exc)})") from exc

    def put_file(self, path: str, local: Path, sha256: str | None = None) -> dict:
        """Multipart upload with per-part SHA256 checksums; the hex sha256 goes into object metadata."""
        from boto3.s3.transfer import TransferConfig

        sha256 = sha256 or _file_sha256(local)
        extra = {"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"}
        transfer = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)
        self._call(path, lambda: self.s3.upload_file(str(local), self.bucket, self.key(path), ExtraArgs=extra, Config=transfer))
        return {"size": local.stat().st_size, "sha256": sha256}

    def open_stream(self, path: str, sha256: str | None = None) -> MultipartStream:
        """An upload fed front to back while the object is produced (see :class:`MultipartStream`); ``sha256``:
        the digest the bytes must have, known in advance (a mirrored file), kept as the object's metadata."""
        return MultipartStream(self, path, sha256=sha256)

    def put_bytes(self, path: str, data: bytes, if_none_match: bool = False) -> bool:
        """Write a small object. With ``if_none_match`` the write only happens if no object exists yet
        (S3 conditional write); returns False when it already existed."""
        from botocore.exceptions import ClientError

        args = {"Bucket": self.bucket, "Key": self.key(path), "Body": data, "ChecksumAlgorithm": "SHA256",
                "Metadata": {"sha256": hashlib.sha256(data).hexdigest()}}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        try:
            _retrying(f"{self.uri}/{path}", lambda: self.s3.put_object(**args))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise describe_client_error(f"{self.uri}/{path}", exc) from exc
        return True

    def delete(self, path: str) -> None:
        self._call(path, lambda: self.s3.delete_object(Bucket=self.bucket, Key=self.key(path)))


class MultipartStream:
    """A multipart upload fed front to back with :meth:`write`: each 64 MiB part is sent (with its SHA256, which
    S3 checks) on a thread while the rest is still being produced, at most ``IN_FLIGHT`` parts at a time, so no
    local copy of the object is ever needed and memory stays at ``IN_FLIGHT + 1`` parts. Nothing is visible
    until :meth:`complete`; :meth:`abort` discards the parts. S3 fixes metadata when an upload starts, before the
    digest is known, so streamed objects carry no sha256 metadata unless the caller knows it in advance (a
    mirrored file, checked before :meth:`complete`): the job's record keeps the digest and the ETag that
    :meth:`complete` returns, which identifies this upload's object on resume."""

    IN_FLIGHT = 4

    def __init__(self, storage: S3Storage, path: str, part_size: int = MULTIPART_CHUNK, sha256: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.storage, self.path, self.part_size = storage, path, part_size
        self.key = storage.key(path)
        metadata = {"Metadata": {"sha256": sha256}} if sha256 else {}
        self.upload_id = storage._call(path, lambda: storage.s3.create_multipart_upload(
            Bucket=storage.bucket, Key=self.key, ChecksumAlgorithm="SHA256", **metadata))["UploadId"]
        self._buffer = bytearray()
        self._parts: list = []  # futures of {"PartNumber", "ETag", "ChecksumSHA256"}
        self._pool = ThreadPoolExecutor(self.IN_FLIGHT, thread_name_prefix="requant-upload")
        self.size = 0

    def write(self, data: memoryview | bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= self.part_size:
            self._send(bytes(self._buffer[: self.part_size]))
            del self._buffer[: self.part_size]

    def _send(self, body: bytes) -> None:
        pending = [f for f in self._parts if not f.done()]
        if len(pending) >= self.IN_FLIGHT:
            pending[0].result()
        for done in (f for f in self._parts if f.done()):
            done.result()  # a failed part fails the stream now, not at the end
        self._parts.append(self._pool.submit(self._upload_part, len(self._parts) + 1, body))

    def _upload_part(self, number: int, body: bytes) -> dict:
        s = self.storage
        response = s._call(self.path, lambda: s.s3.upload_part(Bucket=s.bucket, Key=self.key, UploadId=self.upload_id,
                                                               PartNumber=number, Body=body, ChecksumAlgorithm="SHA256"))
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": response["ChecksumSHA256"]}

    def complete(self) -> str:
        """Send the rest, wait for every part, publish the object; returns its ETag."""
        if self._buffer or not self._parts:
            self._send(bytes(self._buffer))
            self._buffer = bytearray()
        parts = [f.result() for f in self._parts]
        self._pool.shutdown()
        s = self.storage
        response = s._call(self.path, lambda: s.s3.complete_multipart_upload(
            Bucket=s.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": parts}))
        return response["ETag"]

    def abort(self) -> None:
        """Discard the upload (never raises: it runs while another error is on its way out)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        s = self.storage
        try:
            s.s3.abort_multipart_upload(Bucket=s.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception:  # noqa: BLE001 - the object store's lifecycle rules clean up what is left
            pass


def _file_sha256(path: Path) -> str:
    from requant.io.safetensors import sha256_file

    return sha256_file(path)
