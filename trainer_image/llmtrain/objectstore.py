"""The one place the trainer opens object storage (s3://, gs://, az://) and explains its failures.

``filesystem(store, url)`` is the fsspec filesystem for ``url`` with ``spec.storage.objectStore``
applied: for S3 the endpoint (the spec's, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, which the
operator sets in every pod), the region and the addressing style, and a bounded retry of connection
failures. Credentials are never passed here: the SDKs read them from the environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AZURE_STORAGE_*``, ``GOOGLE_APPLICATION_CREDENTIALS``)
that the operator fills from ``storage.objectStore.credentialsSecret``, so they are in no kwargs, no
repr and no cached instance key.

``problem(exc, url, field)`` turns an exception into the one line a user can act on (wrong
credentials, no such bucket, an endpoint that does not answer, nothing at the URL), or None for an
error that is not the user's (a 5xx, a reset connection): the caller raises ``DataError`` for the first
(exit 2, never retried) and lets the second crash (the operator retries the pod). The line names the
spec field and the URL, and never holds a credential: userinfo is stripped from every URL and the
values of credential variables are masked in whatever text the SDK put in its message.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import fsspec

from llmop_contract.api.v1alpha1.workload import AddressingStyle, ObjectStore
from llmop_contract.sources import OBJECT_SCHEMES

CREDENTIALS_FIELD = "storage.objectStore.credentialsSecret"
ENDPOINT_FIELD = "storage.objectStore.endpoint"
# botocore's standard retry mode: attempts with exponential backoff (jittered, capped), so an endpoint
# that is restarting is waited for a few seconds and one that is not there fails within ~20 s.
S3_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0

_ADDRESSING = {AddressingStyle.AUTO: "auto", AddressingStyle.PATH: "path", AddressingStyle.VIRTUAL: "virtual"}
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
# Environment variables that hold credentials (or embed them): their values are masked in messages.
_SECRET_ENV = re.compile(r"(SECRET|KEY|TOKEN|PASSWORD|CONNECTION_STRING|SAS|CREDENTIAL)", re.IGNORECASE)
_MIN_MASKED = 4  # shorter values ("1", "true") would mask ordinary words


def scheme(url: str) -> str:
    """The URL's scheme, lower case ("" for a plain path)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_object_url(url: str) -> bool:
    return scheme(url) in OBJECT_SCHEMES


def s3_endpoint(store: ObjectStore) -> str | None:
    """The S3 endpoint: the spec's, else the one the pod's environment names, else None (AWS)."""
    return (
        store.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )


def _s3_options(store: ObjectStore) -> dict[str, Any]:
    client: dict[str, Any] = {}
    if (endpoint := s3_endpoint(store)) is not None:
        client["endpoint_url"] = endpoint
    region = store.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client["region_name"] = region
    return {
        "client_kwargs": client,
        "config_kwargs": {
            "s3": {"addressing_style": _ADDRESSING[store.addressing_style]},
            "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
        },
    }


def filesystem(store: ObjectStore, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it (bucket/key for object stores).

    Plain paths and file:// get the local filesystem. Every call builds a fresh instance without
    listing caches: a long-running process (the checkpoint uploader) must see objects written since,
    and a cached instance would keep credentials the environment no longer has.
    """
    options: dict[str, Any] = {"skip_instance_cache": True}
    kind = scheme(url)
    if kind == "s3":
        options |= _s3_options(store) | {"use_listings_cache": False}
    elif kind in ("gs", "gcs"):
        # gcsfs reads GOOGLE_APPLICATION_CREDENTIALS (or the metadata server) and STORAGE_EMULATOR_HOST.
        options |= {"use_listings_cache": False}
    elif kind in ("az", "abfs"):
        # adlfs reads AZURE_STORAGE_ACCOUNT_NAME / _KEY / _CONNECTION_STRING / _SAS_TOKEN itself.
        options |= {"use_listings_cache": False}
    else:
        options = {}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, str(path)


# --- what went wrong, in words ------------------------------------------------------------------


def safe_url(url: str) -> str:
    """``url`` without userinfo (s3://KEY:SECRET@bucket/... -> s3://bucket/...)."""
    return _USERINFO.sub("", url)


def redact(text: str) -> str:
    """``text`` with URL userinfo removed and the value of every credential variable masked."""
    text = _USERINFO.sub("", text)
    for name, value in os.environ.items():
        if len(value) >= _MIN_MASKED and _SECRET_ENV.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (s3fs re-raises botocore's as OSError)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _code(exc: BaseException) -> str:
    """The service's error code (botocore ClientError, azure, gcsfs HttpError), or ""."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    for attr in ("error_code", "code", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bucket(url: str) -> str:
    return urlsplit(safe_url(url)).netloc or "?"


_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
    "AuthorizationFailure",
    "AuthenticationFailed",
    "AuthorizationPermissionMismatch",
    "InvalidAuthenticationInfo",
    "401",
    "403",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_DENIED_TYPES = {"ClientAuthenticationError", "RefreshError", "GoogleAuthError"}
_NO_BUCKET_CODES = {"NoSuchBucket", "ContainerNotFound", "ContainerBeingDeleted"}
_UNREACHABLE_TYPES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ProxyConnectionError",
    "ClientConnectorError",  # aiohttp (gcsfs)
    "ServerTimeoutError",
    "ServiceRequestError",  # azure-core: the request never got an answer
    "ConnectionRefusedError",
    "gaierror",
}
_BAD_NAME_CODES = {"InvalidBucketName", "InvalidResourceName", "InvalidUri"}


def _denied_detail(chain: list[BaseException]) -> str | None:
    for e in chain:
        names = _names(e)
        if names & _NO_CREDENTIALS:
            return "no credentials"
        if names & _DENIED_TYPES:
            return _code(e) or type(e).__name__
        if _first_line(e).lower().startswith("forbidden"):  # gcsfs: OSError("Forbidden: PATH ...")
            return "403 Forbidden"
        code = _code(e)
        if code in _DENIED_CODES:
            return {"403": "403 Forbidden", "401": "401 Unauthorized"}.get(code, code)
    if any(isinstance(e, PermissionError) for e in chain):
        return "permission denied"
    return None


_HOST = re.compile(r"https?://[^/\s\"'?]+|(?<=cannot connect to host )[^\s]+")


def _unreachable(url: str, where: str, why: str, text: str) -> str:
    # The endpoint the SDK tried (botocore's and aiohttp's messages name it), so a wrong one is seen
    # at once. storage.objectStore.endpoint is S3's; GCS and Azure endpoints come from their own
    # variables (STORAGE_EMULATOR_HOST, the connection string) or are the public services.
    tried = _HOST.search(text)
    at = f" at {tried.group(0)}" if tried else ""
    hint = f"check {ENDPOINT_FIELD}" if scheme(url) == "s3" else "check the pod's network access to it"
    return f"cannot reach the object store{at} for {where} ({why}, after retries): {hint}"


def _describe(exc: BaseException, url: str) -> str | None:
    chain = _chain(exc)
    where = safe_url(url)
    if not is_object_url(url):
        # A path (the job's volume or a mounted one): the filesystem's own errors.
        for e in chain:
            if isinstance(e, FileNotFoundError):
                return f"{where} does not exist"
            if isinstance(e, PermissionError):
                return f"{where} cannot be read (permission denied)"
            if isinstance(e, NotADirectoryError | IsADirectoryError):
                return f"{where}: {e.strerror or _first_line(e)}"
        return None
    if _USERINFO.search(url):
        return f"{where}: credentials do not go in the URL; put them in {CREDENTIALS_FIELD}"
    codes = {_code(e) for e in chain}
    text = " ".join(_first_line(e) for e in chain).lower()
    if codes & _NO_BUCKET_CODES or "bucket does not exist" in text or "container does not exist" in text:
        kind = "container" if scheme(url) in ("az", "abfs") else "bucket"
        return f"{kind} {_bucket(url)!r} of {where} does not exist"
    if (detail := _denied_detail(chain)) is not None:
        if detail == "no credentials":
            return f"no credentials to read {where}: set {CREDENTIALS_FIELD}"
        return f"access denied to {where} ({detail}): check {CREDENTIALS_FIELD}"
    for e in chain:
        if _names(e) & _UNREACHABLE_TYPES or (
            isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
        ):
            return _unreachable(url, where, type(e).__name__, text)
        if isinstance(e, socket.timeout | TimeoutError) and "connect" in _first_line(e).lower():
            return _unreachable(url, where, "connect timeout", text)
    if (
        codes & _BAD_NAME_CODES
        or ("ParamValidationError" in set().union(*map(_names, chain)) and "bucket name" in text)
        or any(
            isinstance(e, OSError) and e.errno == errno.EINVAL and "bucket" in _first_line(e).lower()
            for e in chain
        )
    ):
        return f"{where}: bucket name {_bucket(url)!r} is not valid"
    if any(
        isinstance(e, FileNotFoundError) or _code(e) in ("NoSuchKey", "404", "BlobNotFound") for e in chain
    ):
        return f"{where} does not exist"
    return None


def describe(exc: BaseException, url: str) -> str | None:
    """``problem`` without the field: for ``DataError(field, describe(...))``."""
    described = _describe(exc, url)
    return None if described is None else redact(described)


def problem(exc: BaseException, url: str, field: str) -> str | None:
    """The user-fixable problem behind ``exc`` as one line naming ``field`` and ``url``, else None.

    None means transient or unknown (a 5xx, a dropped connection mid-read): not the user's to fix, so
    the caller lets it crash and the operator retries. An unreachable endpoint is the user's (after
    the filesystem's bounded retries): a wrong endpoint does not start answering on a retry.
    """
    described = _describe(exc, url)
    return None if described is None else redact(f"{field}: {described}")
