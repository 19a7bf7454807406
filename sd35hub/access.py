"""Can this user read the base model and write the target repo? Answered before anything big happens.

Read access uses ``HfApi.auth_check`` (GET /api/models/{id}/auth-check): one small request that
knows about gated repos, so a user who never accepted the SD3.5 license learns it before a 20 GB
download, with the exact URL to accept it. Write access uses ``whoami`` (token role, fine-grained
permissions, organisation roles) because the target repo usually does not exist yet.

``hub_errors`` translates huggingface_hub exceptions into sd35hub's typed errors; sd35hub.hub and the
publishing code use it too. Nothing here downloads a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sd35hub.errors import (
    HubConnectionError,
    HubRequestError,
    HubTimeoutError,
    InvalidTokenError,
    LicenseNotAcceptedError,
    NotLoggedInError,
    RepoNotFoundError,
    RevisionNotFoundError,
    Sd35HubError,
    WritePermissionError,
)

# Fine-grained token permissions that allow pushing commits to a repo.
_WRITE_PERMISSIONS = {"repo.write", "repo.content.write"}

# Read checks that passed inside the current checks_once() block; None outside one. A ContextVar, so each
# thread / task (each Space visitor) has its own: nothing is shared between users.
_PASSED: ContextVar[set[tuple[str, str | None, str, str]] | None] = ContextVar("sd35hub_access_passed", default=None)


@contextmanager
def checks_once() -> Iterator[None]:
    """Inside the block, a read check that passed (same repo, revision, type and token) is not asked again:
    a run checks its base once, although its own access check, the config fetch and every component
    download each ask before they touch the Hub. Nested blocks share the outermost one."""
    if _PASSED.get() is not None:
        yield
        return
    reset = _PASSED.set(set())
    try:
        yield
    finally:
        _PASSED.reset(reset)


def _check_key(repo_id: str, revision: str | None, repo_type: str, token: str | bool | None) -> tuple[str, str | None, str, str]:
    import hashlib

    who = hashlib.sha256(token.encode()).hexdigest() if isinstance(token, str) else repr(token)  # never the token
    return (repo_id, revision, repo_type, who)


def hub_endpoint() -> str:
    """The Hub base URL huggingface_hub uses (HF_ENDPOINT, read at import time)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _redact(text: str, token: str | bool | None) -> str:
    """Never let a token reach a message (servers sometimes echo headers back)."""
    from sd35hub.redact import redact_text

    return redact_text(text, [token] if isinstance(token, str) else None)


@contextmanager
def hub_errors(
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | bool | None = None,
    what: str = "this action",
    write: bool = False,
    revision: str | None = None,
) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions raised inside the block into sd35hub errors.

    ``write``: the block writes to ``repo_id``, so a 403 means the token lacks write permission;
    otherwise a 403 means it may not read the repo (e.g. a fine-grained token without access).
    Also installs sd35hub's timeouts and retries on huggingface_hub's client (sd35hub.hubhttp)."""
    from sd35hub import hubhttp

    hubhttp.install()
    try:
        yield
    except Sd35HubError:
        raise
    except Exception as exc:
        error = translate_hub_error(exc, repo_id, repo_type=repo_type, token=token, what=what, write=write,
                                    revision=revision)
        if error is None:
            raise
        raise error from exc


def translate_hub_error(
    exc: BaseException,
    repo_id: str,
    *,
    repo_type: str = "model",
    token: str | bool | None = None,
    what: str = "this action",
    write: bool = False,
    revision: str | None = None,
) -> Sd35HubError | None:
    """The sd35hub error for a huggingface_hub / httpx2 / datasets exception; None if it is not one."""
    from sd35hub.hubhttp import httpx_module

    httpx2 = httpx_module()
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.errors import RevisionNotFoundError as HfRevisionNotFoundError

    again = dict(repo_type=repo_type, token=token, what=what, write=write, revision=revision)
    if isinstance(exc, LocalEntryNotFoundError):
        # hf_hub_download could not reach the file and has no cached copy: say why (the cause), not "internal"
        cause = exc.__cause__ or exc.__context__
        translated = translate_hub_error(cause, repo_id, **again) if cause is not None else None  # type: ignore[arg-type]
        return translated or HubConnectionError(
            f"Could not download from {repo_id} while {what}, and there is no copy in the local cache: "
            f"{_redact(str(exc).splitlines()[0], token)} Check your network (and HF_ENDPOINT), then run again.")
    if isinstance(exc, GatedRepoError):  # subclass of RepositoryNotFoundError: test it first
        if _rejected_token(exc):
            return InvalidTokenError(what)
        return LicenseNotAcceptedError(repo_id, hub_endpoint())
    if isinstance(exc, HfRevisionNotFoundError):
        return RevisionNotFoundError(repo_id, revision, repo_type)
    if isinstance(exc, RepositoryNotFoundError):
        return RepoNotFoundError(repo_id, repo_type)
    if isinstance(exc, LocalTokenNotFoundError):
        return NotLoggedInError(what)
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        status = response.status_code if response is not None else None
        if status == 401:
            return InvalidTokenError(what) if _sent_token(exc) else NotLoggedInError(what)
        message = _redact(_server_message(exc), token)
        if status == 403:
            if write:
                return WritePermissionError(repo_id, message)
            return RepoNotFoundError(repo_id, repo_type, f"Your token is not allowed to read it: {message}")
        request = _describe_request(exc)
        if status == 429:
            asked = _retry_after(response)
            wait = f" It asks to wait {asked:.0f} s." if asked is not None else ""
            return HubRequestError(
                f"The Hub is rate-limiting sd35hub ({request} answered HTTP 429 after retries) while {what}.{wait} "
                "Wait a few minutes, then run again.")
        return HubRequestError(
            f"The Hub request {request} for {repo_id} failed (HTTP {status}) while {what}: {message} "
            "Check https://status.huggingface.co and your network, then run again.")
    if isinstance(exc, httpx2.TimeoutException):
        limit = _timeout_of(exc)
        return HubTimeoutError(
            f"The Hub did not answer {_describe_request(exc)} within {limit} ({_attempts(exc)}) while {what}. "
            "Check your network and https://status.huggingface.co; on a slow connection raise "
            "HF_HUB_DOWNLOAD_TIMEOUT (seconds), then run again.")
    if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
        root = _transport_cause(exc)
        if root is not None and root is not exc:
            if isinstance(root, httpx2.TimeoutException):
                return translate_hub_error(root, repo_id, **again)  # type: ignore[arg-type]
            exc = root
        where = f" ({_describe_request(exc)}, {_attempts(exc)})" if _request_of(exc) is not None else ""
        return HubConnectionError(
            f"Could not reach the Hub at {hub_endpoint()} for {repo_id} while {what}{where}: "
            f"{type(exc).__name__}: {_redact(str(exc), token)}. Check your network (and HF_ENDPOINT), then run again.")
    if isinstance(exc, OSError) and str(exc).startswith("Consistency check failed"):
        return HubConnectionError(
            f"A download from {repo_id} was cut short again and again while {what}: {str(exc).splitlines()[0]} "
            "Check your network, then run again (the finished files stay in the cache).")
    return None


def _retry_after(response: Any) -> float | None:
    from sd35hub.hubhttp import retry_after_s

    return retry_after_s(response.headers) if response is not None else None


def _transport_cause(exc: BaseException) -> BaseException | None:
    """The httpx2 error under a wrapper (datasets' ConnectionError, huggingface_hub's LocalEntryNotFoundError)."""
    from sd35hub.hubhttp import httpx_module

    httpx2 = httpx_module()

    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, httpx2.TransportError):
            return current
        current, seen = current.__cause__ or current.__context__, seen + 1
    return None


def _request_of(exc: BaseException) -> Any:
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "request", None) is not None:
        return response.request
    try:
        return exc.request  # type: ignore[attr-defined]  # httpx2 errors; raises RuntimeError when unset
    except (AttributeError, RuntimeError):
        return None


def _describe_request(exc: BaseException) -> str:
    """"GET http://host/api/models/x/auth-check" (no query string: it can carry search terms)."""
    request = _request_of(exc)
    if request is None:
        return "a request"
    url = request.url
    return f"{request.method} {url.scheme}://{url.netloc.decode() if isinstance(url.netloc, bytes) else url.netloc}{url.path}"


def _timeout_of(exc: BaseException) -> str:
    from sd35hub.hubhttp import httpx_module

    httpx2 = httpx_module()

    request = _request_of(exc)
    timeouts = (request.extensions.get("timeout") or {}) if request is not None else {}
    key = "connect" if isinstance(exc, httpx2.ConnectTimeout) else "write" if isinstance(exc, httpx2.WriteTimeout) else "read"
    value = timeouts.get(key)
    if getattr(exc, "sd35hub_repeat", False) and key == "read":  # a repeat of huggingface_hub's backoff
        from sd35hub import hubhttp

        return f"{hubhttp.read_timeout():g} s, then {value:g} s on each repeat"
    return f"{value:g} s" if isinstance(value, (int, float)) else "its timeout"


def _attempts(exc: BaseException) -> str:
    attempts = getattr(exc, "sd35hub_attempts", 1)
    if attempts is None:
        return "after huggingface_hub's retries"
    return f"{attempts} attempt{'s' if attempts != 1 else ''}"


def _sent_token(exc: BaseException) -> bool:
    request = _request_of(exc)
    return request is not None and "authorization" in request.headers


def _rejected_token(exc: BaseException) -> bool:
    """A 401 gated answer to a request that carried a token: is the token itself invalid? Asks whoami."""
    response = getattr(exc, "response", None)
    request = _request_of(exc)
    if response is None or response.status_code != 401 or request is None:
        return False
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        return False
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().whoami(token=header[7:].strip())
    except HfHubHTTPError as err:
        return err.response is not None and err.response.status_code == 401
    except Exception:  # network trouble: no verdict, keep the gated answer
        return False
    return False


def _server_message(exc: Any) -> str:
    message = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    return message.strip()


def check_read_access(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    repo_type: str = "model",
) -> None:
    """Raise unless the token can read ``repo_id`` (license accepted for gated repos). Downloads nothing.

    Raises LicenseNotAcceptedError (message holds ``{endpoint}/{repo_id}``), RepoNotFoundError
    (missing or private), RevisionNotFoundError (no such branch/tag/commit), NotLoggedInError (a token
    is needed and none was given), InvalidTokenError (the Hub rejected the token), HubRequestError /
    HubConnectionError / HubTimeoutError (the Hub failed or did not answer, after retries).
    """
    from huggingface_hub import HfApi, get_token

    passed = _PASSED.get()
    key = _check_key(repo_id, revision, repo_type, token)
    if passed is not None and key in passed:
        return
    api = HfApi(token=token)
    with hub_errors(repo_id, repo_type=repo_type, token=token, what=f"reading {repo_id}", revision=revision):
        try:
            api.auth_check(repo_id, repo_type=repo_type, token=token)
        except Exception as exc:
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

            # A gated or private repo seen without any token: the fix is to log in, not to accept.
            anonymous = token is False or (not isinstance(token, str) and get_token() is None)
            if isinstance(exc, RepositoryNotFoundError) and anonymous:
                if isinstance(exc, GatedRepoError):
                    raise NotLoggedInError(f"reading the gated model {repo_id}") from exc
                raise RepoNotFoundError(
                    repo_id, repo_type, "You are not logged in: if it is private, set HF_TOKEN or run `hf auth login`."
                ) from exc
            raise
        if revision is not None:
            # auth-check knows nothing about revisions; repo_info at the revision is still metadata only.
            api.repo_info(repo_id, repo_type=repo_type, revision=revision, token=token)
    if passed is not None:
        passed.add(key)


def _token_namespaces(whoami: dict[str, Any]) -> tuple[str | None, set[str], set[str]]:
    """(token role, namespaces writable, namespaces where the user is only a reader)."""
    auth = (whoami.get("auth") or {}).get("accessToken") or {}
    role = auth.get("role")
    user = whoami.get("name")
    writable: set[str] = set()
    read_only: set[str] = set()
    if role == "fineGrained":
        fine = auth.get("fineGrained") or {}
        for scope in fine.get("scoped") or []:
            entity = (scope.get("entity") or {}).get("name")
            if entity and _WRITE_PERMISSIONS & set(scope.get("permissions") or []):
                writable.add(entity)
        return role, writable, read_only
    if role in (None, "write", "admin"):  # None: an old server that does not report roles
        if user:
            writable.add(user)
        for org in whoami.get("orgs") or []:
            org_role = org.get("roleInOrg")
            if org_role in ("read", "contributor"):
                read_only.add(org["name"])
            elif org.get("name"):
                writable.add(org["name"])
    return role, writable, read_only


def check_write_access(repo_id: str, *, token: str | bool | None = None) -> str:
    """Return the username if the token can create/push to ``repo_id``'s namespace, else raise.

    Raises NotLoggedInError (no token; InvalidTokenError: rejected) or WritePermissionError (read-only token,
    fine-grained token without write access to the namespace, or not a writer of the org).
    Call it before training or uploading anything.
    """
    from huggingface_hub import HfApi

    if token is False:
        raise NotLoggedInError(f"publishing to {repo_id}")
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    api = HfApi(token=token)
    with hub_errors(repo_id, token=token, what=f"publishing to {repo_id}", write=True):
        whoami = api.whoami(token=token)  # a 401 with a token sent: InvalidTokenError (hub_errors)
    user = whoami.get("name") or ""
    namespace = namespace or user
    role, writable, read_only = _token_namespaces(whoami)
    if namespace in writable:
        return user
    if role == "read":
        detail = "It is a read-only token."
    elif role == "fineGrained":
        detail = f"It is a fine-grained token without 'write' permission on {namespace!r}."
    elif namespace in read_only:
        detail = f"You are only a {_org_role(whoami, namespace)} of the organisation {namespace!r}."
    else:
        detail = f"The token belongs to {user!r}, who is not a member of {namespace!r}."
    raise WritePermissionError(repo_id, detail)


def _org_role(whoami: dict[str, Any], org_name: str) -> str:
    for org in whoami.get("orgs") or []:
        if org.get("name") == org_name:
            return str(org.get("roleInOrg") or "member")
    return "member"
