"""Object storage (S3 and S3-compatible servers): URLs, settings from the environment, errors.

One place for everything tvbase needs to know about S3, shared by the two things that talk to
it: stores (:class:`tvbase.repository.S3Location`, through Icechunk's own S3 storage) and
checkpoints read from a bucket (:mod:`tvbase.io.checkpoint`, through s3fs).

Settings come from the variables the AWS tools read, so a shell set up for ``aws s3`` works:

=========================================  ===================================================
``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``  an S3-compatible endpoint (the first wins); default AWS
``AWS_REGION``, ``AWS_DEFAULT_REGION``     the region (the first wins)
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``  static credentials;
                                           without them the SDKs' own chain (profile, instance role)
``AWS_NO_SIGN_REQUEST``                    ``true``: anonymous, unsigned requests (public buckets),
                                           as GDAL and the AWS CLI's ``--no-sign-request``
``AWS_ALLOW_HTTP``                         ``true``: allow a plain ``http://`` endpoint (test servers)
``AWS_MAX_ATTEMPTS``                       tries per request, first included (default: the SDKs')
=========================================  ===================================================

Nothing here imports s3fs or Icechunk at module level: :func:`filesystem` imports s3fs, the
optional dependency of the ``[s3]`` extra, only when a checkpoint on S3 is read or a store's
objects are listed.
"""

import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

from .errors import InvalidInputError, NotFoundError, StorageError, TvbaseError

SCHEME = "s3://"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
# How a refused request or a failed connection shows in Icechunk's and botocore's messages.
_ACCESS_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
                 "TokenRefreshRequired", "AllAccessDisabled", "Forbidden")
_UNREACHABLE = ("dispatch failure", "Connection refused", "Could not connect to the endpoint", "connection closed",
                "Connection reset", "timed out", "timeout", "dns error", "failed to lookup address")


def is_s3_url(text) -> bool:
    """Whether ``text`` (a str or path) is an ``s3://`` URL."""
    return isinstance(text, str) and text.startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/KEY`` -> (bucket, key); the key may be empty.

    Raises
    ------
    InvalidInputError
        If the bucket name is not a valid S3 bucket name.
    """
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise InvalidInputError(
            f"{url!r} does not name a valid S3 bucket ({bucket!r}): expected s3://BUCKET/PREFIX with a bucket "
            "name of 3-63 lowercase letters, digits, '.' and '-'"
        )
    return bucket, key


def _flag(environ, name) -> bool:
    value = environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise InvalidInputError(f"{name}={environ[name]!r} is not a boolean: set it to true or false")
    return value in _TRUE


@dataclass(frozen=True)
class S3Settings:
    """Endpoint, region, credentials and retries for S3, read from the environment by :meth:`from_env`.

    Attributes
    ----------
    endpoint_url : str or None, an S3-compatible server (None: AWS).
    region : str or None
    access_key_id, secret_access_key, session_token : str or None, static credentials; None:
        the credential chain of the SDK (Icechunk's, botocore's).
    anonymous : bool, unsigned requests.
    allow_http : bool, a plain-http endpoint is allowed.
    max_attempts : int or None, tries per request (None: the SDKs' default).
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False
    allow_http: bool = False
    max_attempts: int | None = None

    @classmethod
    def from_env(cls, environ=None):
        """The settings the variables of ``environ`` (default ``os.environ``) give; see the module's table.

        Raises
        ------
        InvalidInputError
            If a variable has a value that cannot be right (a flag that is not a boolean, an
            endpoint that is not a URL, plain http without ``AWS_ALLOW_HTTP``, half a key pair).
        """
        env = os.environ if environ is None else environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        allow_http = _flag(env, "AWS_ALLOW_HTTP")
        if endpoint is not None:
            if not re.match(r"https?://[^/\s]+", endpoint):
                raise InvalidInputError(f"S3 endpoint {endpoint!r} is not a URL: expected http(s)://HOST[:PORT]")
            if endpoint.startswith("http://") and not allow_http:
                raise InvalidInputError(
                    f"S3 endpoint {endpoint!r} is plain http: set AWS_ALLOW_HTTP=true to allow it (test servers), "
                    "or use https"
                )
        key, secret = env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None
        if (key is None) != (secret is None):
            missing = "AWS_SECRET_ACCESS_KEY" if secret is None else "AWS_ACCESS_KEY_ID"
            raise InvalidInputError(f"{missing} is not set while its pair is: set both, or neither")
        attempts = env.get("AWS_MAX_ATTEMPTS") or None
        if attempts is not None:
            if not attempts.isdigit() or int(attempts) < 1:
                raise InvalidInputError(f"AWS_MAX_ATTEMPTS={attempts!r} is not a positive integer")
            attempts = int(attempts)
        return cls(
            endpoint_url=endpoint.rstrip("/") if endpoint else None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key_id=key,
            secret_access_key=secret,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            anonymous=_flag(env, "AWS_NO_SIGN_REQUEST"),
            allow_http=allow_http,
            max_attempts=attempts,
        )

    @property
    def endpoint(self) -> str:
        """The endpoint as messages name it."""
        return self.endpoint_url or "AWS S3"

    def check_reachable(self, what: str) -> None:
        """Fail at once when nothing answers at a custom endpoint (a wrong port, a server not
        started): Icechunk retries a refused connection for tens of seconds before it says so.
        One TCP connection, only when ``AWS_ENDPOINT_URL`` is set.

        Raises
        ------
        StorageError
            If no connection can be opened to the endpoint.
        """
        if self.endpoint_url is None:
            return
        parsed = urlparse(self.endpoint_url)
        try:
            socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout=5).close()
        except OSError as error:
            raise _unreachable(self.endpoint, what, error.strerror or type(error).__name__) from None

    def icechunk_storage(self, bucket: str, prefix: str):
        """Icechunk's S3 storage for the repository at ``s3://bucket/prefix``."""
        import icechunk

        if self.anonymous:
            credentials = {"anonymous": True}
        elif self.access_key_id:
            credentials = {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key,
                           "session_token": self.session_token}
        else:
            credentials = {"from_env": True}  # Icechunk's chain: profile, web identity, instance role
        return icechunk.s3_storage(
            bucket=bucket, prefix=prefix or None, region=self.region, endpoint_url=self.endpoint_url,
            allow_http=self.allow_http, force_path_style=self.endpoint_url is not None,  # S3-compatible servers
            **credentials,
        )

    def icechunk_config(self):
        """The Icechunk repository configuration: retries from ``AWS_MAX_ATTEMPTS``, else None (defaults)."""
        if self.max_attempts is None:
            return None
        import icechunk

        config = icechunk.RepositoryConfig.default()
        config.storage = icechunk.StorageSettings(retries=icechunk.StorageRetriesSettings(max_tries=self.max_attempts))
        return config

    def filesystem(self):
        """A fresh s3fs file system with these settings (no instance or listing cache: sizes and
        listings are read now, not remembered from an earlier call).

        Raises
        ------
        InvalidInputError
            If s3fs is not installed.
        """
        try:
            import s3fs
        except ImportError:
            raise InvalidInputError(
                "reading checkpoints from S3 and listing a store's objects need s3fs: pip install 'tvbase[s3]'"
            ) from None
        config = {"retries": {"max_attempts": self.max_attempts, "mode": "standard"}} if self.max_attempts else {}
        return s3fs.S3FileSystem(
            anon=self.anonymous, key=self.access_key_id, secret=self.secret_access_key, token=self.session_token,
            endpoint_url=self.endpoint_url, client_kwargs={"region_name": self.region} if self.region else {},
            config_kwargs=config, skip_instance_cache=True, use_listings_cache=False,
        )


def storage_error(error: BaseException, what: str) -> Exception | None:
    """The tvbase error for a failure of object storage, or None when ``error`` is not one.

    Icechunk raises ``IcechunkError`` for everything and s3fs/botocore their own types; what
    happened is only in the text, so that is what is read: a missing bucket is a NotFoundError,
    refused credentials and unreachable endpoints are StorageErrors, each with what to check.

    Parameters
    ----------
    error : the exception raised by Icechunk, s3fs or botocore.
    what : how the message names the store or object, e.g. ``"s3://bucket/prefix"``.
    """
    text = f"{type(error).__name__}: {error}"
    endpoint = S3Settings.from_env().endpoint if _settings_ok() else "the S3 endpoint"
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        bucket = split_url(what)[0] if is_s3_url(what) else what
        return NotFoundError(f"bucket {bucket!r} does not exist at {endpoint} (for {what}): create it, or check the "
                             "bucket name and AWS_ENDPOINT_URL")
    code = next((c for c in _ACCESS_CODES if c in text), None)
    if code is not None or isinstance(error, PermissionError):
        return StorageError(
            f"{endpoint} refused access to {what} ({code or 'forbidden'}): check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or set AWS_NO_SIGN_REQUEST=true for a public bucket)"
        )
    reason = next((r for r in _UNREACHABLE if r.lower() in text.lower()), None)
    return None if reason is None else _unreachable(endpoint, what, reason)


def _unreachable(endpoint, what, reason):
    return StorageError(
        f"cannot reach {endpoint} for {what} ({reason}): check AWS_ENDPOINT_URL and that the server is up; "
        "nothing is committed until a write reports its version, so run the command again"
    )


@contextmanager
def storage_errors(what):
    """Turn a storage failure raised inside the block (a missing bucket, refused credentials,
    an unreachable endpoint: see :func:`tvbase.s3.storage_error`) into tvbase's error naming
    ``what``; any other exception passes unchanged."""
    try:
        yield
    except TvbaseError:  # already says what is wrong
        raise
    except Exception as e:
        mapped = storage_error(e, str(what))
        if mapped is None:
            raise
        raise mapped from None


def _settings_ok() -> bool:
    try:
        S3Settings.from_env()
    except InvalidInputError:
        return False
    return True
