"""S3Store: the Store interface on s3://bucket/prefix, for AWS S3 and S3-compatible servers.

Endpoint, region and credentials come only from the standard AWS environment and config
(AWS_ENDPOINT_URL[_S3], AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_REGION, ~/.aws/...), resolved in the
process that uses the store: a pickled store (shipped to a Ray actor) carries no client and no
credentials. Region defaults to us-east-1. A non-AWS endpoint gets path-style addressing.

Two layers of retries: botocore's own ("standard" mode, `client_max_attempts` per call) and ours
around each store operation (`max_attempts`, exponential backoff with full jitter), so a write
survives throttling, 5xx, resets and lost responses. Images use conditional puts
(If-None-Match: *) carrying sha256 metadata; a 412 whose stored sha256 equals ours is our own
earlier write whose response was lost, not a conflict.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from typing import Callable, TypeVar
from urllib.parse import urlsplit

from qwen_worker.errors import StorageError, StoreAccessError, UserError
from qwen_worker.stores.base import PutOutcome, Store, sha256_hex

log = logging.getLogger(__name__)
T = TypeVar("T")

SHA256_META = "sha256"  # user metadata key (sent as x-amz-meta-sha256)
_RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
    "ConditionalRequestConflict", "OperationAborted",  # 409: a concurrent write to the same key
}  # fmt: skip
_WHAT_TO_FIX = {
    "NoSuchBucket": "the bucket does not exist: create it or fix the output URI",
    "AccessDenied": "access denied: the credentials in use may not write there (check the bucket policy "
    "and AWS_PROFILE / AWS_ACCESS_KEY_ID)",
    "InvalidAccessKeyId": "the server does not know this access key: check AWS_ACCESS_KEY_ID or AWS_PROFILE",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY "
    "or AWS_PROFILE",
    "unreachable": "cannot reach the S3 endpoint: check AWS_ENDPOINT_URL and that the server is running",
    "NoCredentials": "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    "ProfileNotFound": "AWS_PROFILE names a profile that is not in the AWS config files",
    "CredentialRetrievalError": "S3 credentials could not be fetched here (a credential process, SSO session or "
    "instance/pod role failed or expired)",
}
_HTTP_STATUS_CODES = {"404": "NoSuchBucket", "403": "AccessDenied"}  # HEAD responses have no error body


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix/' -> ('bucket', 'some/prefix')."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise UserError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    return parts.netloc, parts.path.strip("/")


class _Again(Exception):
    """Internal: the object changed under us between two requests; try the operation again."""


def _error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return type(exc).__name__


def _http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, 5xx, resets, closed connections, timeouts, truncated bodies."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, ClientError):
        status = _http_status(exc)
        return status >= 500 or status in (408, 429) or _error_code(exc) in _RETRYABLE_CODES or (
            status == 409 and _error_code(exc) in ("", "409")
        )
    return isinstance(exc, (_Again, ConnectionError, HTTPClientError, IncompleteReadError))


def _is_unreachable(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    return isinstance(exc, (EndpointConnectionError, ConnectTimeoutError))


_CLIENT_LOCK = threading.Lock()
MAX_POOL_CONNECTIONS = 32  # parallel gets (ledger, input images) and puts (the store pool)


class S3Store(Store):
    def __init__(
        self,
        uri: str,
        *,
        overwrite: bool = False,
        max_attempts: int = 6,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        client_max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        list_page_size: int = 1000,
        endpoint_url: str | None = None,
        region: str | None = None,
    ):
        """`endpoint_url`/`region` override the environment's (the driver passes what it resolved
        to its workers, so they write where it checked; credentials stay in each environment)."""
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url = endpoint_url
        self.region = region
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.overwrite = overwrite
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.client_max_attempts = max(1, client_max_attempts)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.list_page_size = list_page_size
        self.retries = 0  # extra attempts made for transient failures (botocore's and ours)
        self._client = None
        self._attempts = 0  # HTTP attempts seen by the client (counted on botocore's before-send)

    # ---- pickling: Ray ships stores to actors; the client is rebuilt there from its environment
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    # ---- client
    @property
    def client(self):
        if self._client is None:
            with _CLIENT_LOCK:  # threads of one worker or validator share one client (thread-safe once made)
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        config = Config(
            signature_version="s3v4",
            retries={"mode": "standard", "total_max_attempts": self.client_max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        region = self.region or session.region_name or "us-east-1"
        client = session.client("s3", region_name=region, config=config, endpoint_url=self.endpoint_url)
        endpoint = client.meta.endpoint_url
        if not _is_aws_host(urlsplit(endpoint).hostname or ""):  # S3-compatible server: path-style
            path_style = config.merge(Config(s3={"addressing_style": "path"}))
            client = session.client("s3", region_name=region, endpoint_url=endpoint, config=path_style)
        client.meta.events.register("before-send.s3", self._count_attempt)
        return client

    def _count_attempt(self, **_kwargs):
        self._attempts += 1

    @property
    def endpoint(self) -> str:
        """The endpoint in use, without any user:password part (safe for messages)."""
        parts = urlsplit(self.client.meta.endpoint_url)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        if not key:
            raise UserError(f"empty object key under {self.uri}")
        return f"{self.prefix}/{key}" if self.prefix else key

    # ---- retries and error mapping
    def _call(self, operation: str, **params):
        """One boto3 call; botocore's own retries are added to self.retries."""
        before = self._attempts
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **params)
        finally:
            self.retries += max(0, self._attempts - before - 1)

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying transient S3 failures with exponential backoff and full jitter."""
        from botocore.exceptions import BotoCoreError, ClientError

        last: BaseException | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                self.retries += 1
                time.sleep(random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))))
            try:
                return fn()
            except (ClientError, BotoCoreError, _Again) as exc:
                if not _is_transient(exc):
                    error = self._user_error(exc, what)
                    if error is None:  # a programming error (bad parameter ...): surface it as is
                        raise
                    raise error from exc
                last = exc
                log.debug("transient S3 failure on %s (attempt %d): %s", what, attempt + 1, exc)
        raise StorageError(
            f"{what} at {self.uri}: still failing after {self.max_attempts} attempts, "
            f"last error: {_error_code(last)}: {last}"
        ) from last

    def _user_error(self, exc: BaseException, what: str) -> StoreAccessError | None:
        """A one-line StoreAccessError naming the destination and what to fix; never a secret value."""
        from botocore.exceptions import (
            ClientError,
            CredentialRetrievalError,
            NoCredentialsError,
            PartialCredentialsError,
            ProfileNotFound,
        )

        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            code = hint_key = "NoCredentials"
        elif isinstance(exc, CredentialRetrievalError):
            code = hint_key = "CredentialRetrievalError"
        elif isinstance(exc, ProfileNotFound):
            code = hint_key = "ProfileNotFound"
        elif _is_unreachable(exc):
            code, hint_key = type(exc).__name__, "unreachable"
        elif isinstance(exc, ClientError):
            code = _HTTP_STATUS_CODES.get(_error_code(exc), _error_code(exc))
            hint_key = code
        else:
            return None
        hint = _WHAT_TO_FIX.get(hint_key, "the S3 server refused the request")
        endpoint = f" at {self.endpoint}" if self._client is not None else ""
        return StoreAccessError(f"cannot use {self.uri}{endpoint} ({code} on {what}): {hint}")

    # ---- Store interface
    def put_new(self, key, data, *, content_type="application/octet-stream", sha256=None):
        full, ours = self._key(key), sha256 or sha256_hex(data)

        def attempt() -> PutOutcome:
            from botocore.exceptions import ClientError

            try:
                self._put(full, data, content_type, ours, if_none_match=True)
                return PutOutcome.CREATED
            except ClientError as exc:
                if _http_status(exc) != 412:
                    raise
            theirs = self._stored_sha256(full)  # 412: something is there; ours from a lost response?
            if theirs == ours:
                return PutOutcome.ALREADY_STORED
            if theirs is None:  # deleted in between: let the retry loop try the conditional put again
                raise _Again(f"{full} vanished after a 412")
            if not self.overwrite:
                raise self._exists_conflict(key, ours, theirs)
            self._put(full, data, content_type, ours, if_none_match=False)
            return PutOutcome.REPLACED

        return self._retrying(f"PutObject {key}", attempt)

    def _put(self, full: str, data: bytes, content_type: str, sha: str, *, if_none_match: bool) -> None:
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        self._call("put_object", Key=full, Body=data, ContentType=content_type, Metadata={SHA256_META: sha}, **extra)

    def put(self, key, data, *, content_type="application/octet-stream"):
        full, sha = self._key(key), sha256_hex(data)
        self._retrying(f"PutObject {key}", lambda: self._put(full, data, content_type, sha, if_none_match=False))

    def get(self, key):
        full = self._key(key)

        def attempt() -> bytes | None:
            from botocore.exceptions import ClientError

            try:
                return self._call("get_object", Key=full)["Body"].read()
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise

        data = self._retrying(f"GetObject {key}", attempt)
        if data is None:
            raise KeyError(key)
        return data

    def worker_options(self) -> dict:
        """Non-secret settings a worker needs to open this same store: endpoint and region."""
        return {"endpoint_url": self.client.meta.endpoint_url, "region": self.client.meta.region_name}

    def size(self, key: str) -> int:
        """The object's size in bytes; KeyError when there is none."""
        from botocore.exceptions import ClientError

        full = self._key(key)

        def attempt() -> int | None:
            try:
                return self._call("head_object", Key=full)["ContentLength"]
            except ClientError as exc:
                if _http_status(exc) == 404:
                    return None
                raise

        size = self._retrying(f"HeadObject {key}", attempt)
        if size is None:
            raise KeyError(key)
        return size

    def read_range(self, key: str, start: int, stop: int, *, if_match: str | None = None) -> bytes:
        """Bytes [start, stop) of the object (one ranged GET, retried); with `if_match` (an ETag)
        a UserError when the object is no longer that version."""
        from botocore.exceptions import ClientError

        full = self._key(key)
        condition = {"IfMatch": if_match} if if_match else {}

        def attempt() -> bytes:
            try:
                return self._call("get_object", Key=full, Range=f"bytes={start}-{stop - 1}", **condition)["Body"].read()
            except ClientError as exc:
                if if_match and _http_status(exc) == 412:
                    raise UserError(
                        f"{self.uri.rstrip('/')}/{key} changed while this job was reading it (ETag no longer "
                        f"{if_match}): a job reads one version of its manifest; submit the new one as a new job"
                    ) from None
                raise

        return self._retrying(f"GetObject {key}", attempt)

    def head_and_prefix(self, key: str, length: int) -> tuple[str, int, bytes]:
        """(ETag, size in bytes, the first `length` bytes) of an object in one ranged GET; KeyError
        when there is none."""
        from botocore.exceptions import ClientError

        full = self._key(key)

        def attempt():
            try:
                response = self._call("get_object", Key=full, Range=f"bytes=0-{length - 1}")
            except ClientError as exc:
                status = _http_status(exc)
                if status == 404:
                    return None
                if status == 416:  # an empty object has no byte 0
                    return (self._call("head_object", Key=full)["ETag"], 0, b"")
                raise
            total = response.get("ContentRange", "").rpartition("/")[2]
            data = response["Body"].read()
            return response["ETag"], int(total) if total.isdigit() else len(data), data

        found = self._retrying(f"GetObject {key}", attempt)
        if found is None:
            raise KeyError(key)
        return found

    def etag(self, key: str) -> str:
        """The object's ETag; KeyError when there is none."""
        from botocore.exceptions import ClientError

        full = self._key(key)

        def attempt() -> str | None:
            try:
                return self._call("head_object", Key=full)["ETag"]
            except ClientError as exc:
                if _http_status(exc) == 404:
                    return None
                raise

        found = self._retrying(f"HeadObject {key}", attempt)
        if found is None:
            raise KeyError(key)
        return found

    def stored_sha256(self, key):
        full = self._key(key)
        return self._retrying(f"HeadObject {key}", lambda: self._stored_sha256(full))

    def _stored_sha256(self, full: str) -> str | None:
        """One try: the sha256 metadata we wrote, else the hash of the bytes; None when absent."""
        from botocore.exceptions import ClientError

        try:
            head = self._call("head_object", Key=full)
        except ClientError as exc:
            if _http_status(exc) == 404:
                return None
            raise
        sha = head.get("Metadata", {}).get(SHA256_META)
        if sha:
            return sha
        try:  # written by someone else: hash what is there
            return sha256_hex(self._call("get_object", Key=full)["Body"].read())
        except ClientError as exc:
            if _http_status(exc) == 404:
                return None
            raise

    def list_keys(self, prefix):
        """Keys under the folder `prefix` ('' = everything), relative to the store root."""
        root = f"{self.prefix}/" if self.prefix else ""
        folder = prefix.strip("/")
        full_prefix = root + (folder + "/" if folder else "")
        token = None
        while True:
            params = {"Prefix": full_prefix, "MaxKeys": self.list_page_size}
            if token:
                params["ContinuationToken"] = token
            page = self._retrying(f"ListObjectsV2 {prefix or '/'}", lambda: self._call("list_objects_v2", **params))
            for obj in page.get("Contents", []):
                yield obj["Key"][len(root) :]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def check_writable(self, *, read_back: bool = False):
        """Fail early with one clear StoreAccessError if the bucket is missing, the credentials are
        wrong, the endpoint is unreachable, or the server ignores conditional writes (`read_back`:
        also read the probe object back)."""
        try:
            self._retrying("HeadBucket", lambda: self._call("head_bucket"))
        except UserError as exc:
            # A HEAD error has no body: 403 may be a wrong secret or only a missing ListBucket
            # permission. The probe put below names the exact problem, or succeeds.
            if _http_status(exc.__cause__) != 403:
                raise
        except StorageError as exc:
            if not _is_unreachable(exc.__cause__):
                raise
            raise self._user_error(exc.__cause__, "HeadBucket") from exc.__cause__
        name = f".write-check-{uuid.uuid4().hex}"
        probe, what = self._key(name), f"PutObject {name}"
        self._retrying(what, lambda: self._put_probe(probe))  # 200, or 412 after a lost response
        honoured = self._retrying(what, lambda: self._put_probe(probe) == 412)
        read = self._retrying(f"GetObject {name}", lambda: self._call("get_object", Key=probe)["Body"].read()) if read_back else b""
        try:
            self._call("delete_object", Key=probe)
        except Exception as exc:  # write-only credentials: leave the empty probe behind
            log.warning("could not delete the write probe %s: %s", probe, _error_code(exc))
        if not honoured:
            raise StoreAccessError(
                f"the S3 server behind s3://{self.bucket} ignores conditional writes (If-None-Match: *), "
                "which exactly-once output needs: use a server that supports them"
            )
        if read != b"":
            raise StoreAccessError(f"s3://{self.bucket} returned other bytes than were written to {name}")

    def has_credentials(self) -> bool:
        """Whether the standard AWS chain finds credentials in this process's environment."""
        import boto3

        try:
            return boto3.session.Session().get_credentials() is not None
        except Exception:
            return False

    def check_usable(self):
        if not self.has_credentials():
            raise StoreAccessError(
                f"cannot use {self.uri}: no S3 credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, an instance or pod role)"
            )
        self.check_writable(read_back=True)

    def get_versioned(self, key):
        full = self._key(key)

        def attempt():
            from botocore.exceptions import ClientError

            try:
                response = self._call("get_object", Key=full)
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), response["ETag"]

        found = self._retrying(f"GetObject {key}", attempt)
        if found is None:
            raise KeyError(key)
        return found

    def put_versioned(self, key, data, *, expected):
        full, sha = self._key(key), sha256_hex(data)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}

        def attempt() -> str | None:
            from botocore.exceptions import ClientError

            try:
                return self._call("put_object", Key=full, Body=data, Metadata={SHA256_META: sha}, **condition)["ETag"]
            except ClientError as exc:
                if _http_status(exc) not in (412, 404):
                    raise
            try:  # our own write whose response was lost?
                head = self._call("head_object", Key=full)
            except ClientError as exc:
                if _http_status(exc) == 404:
                    return None
                raise
            return head["ETag"] if head.get("Metadata", {}).get(SHA256_META) == sha else None

        return self._retrying(f"PutObject {key}", attempt)

    def delete(self, key):
        full = self._key(key)
        self._retrying(f"DeleteObject {key}", lambda: self._call("delete_object", Key=full))

    def _put_probe(self, probe: str) -> int:
        """Conditional put of an empty object: 200 when written, 412 when something was there."""
        from botocore.exceptions import ClientError

        try:
            self._call("put_object", Key=probe, Body=b"", IfNoneMatch="*")
            return 200
        except ClientError as exc:
            if _http_status(exc) == 412:
                return 412
            raise

    def credentials_expiry(self):
        """When the credentials in use stop working (temporary ones: a role, SSO), else None."""
        credentials = self.client._request_signer._credentials
        expiry = getattr(credentials, "_expiry_time", None)
        return expiry if expiry is not None and getattr(expiry, "tzinfo", None) is not None else None

    def presigned_url(self, key: str, *, expires: int = 7 * 24 * 3600) -> str:
        """A GET URL for `key` valid for `expires` seconds (for reports); needs no network call."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )


def _is_aws_host(host: str) -> bool:
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")
