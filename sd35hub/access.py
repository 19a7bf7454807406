"""Can this user read the base model and write the target repo? Answered before anything big happens.

Read access uses ``HfApi.auth_check`` (GET /api/models/{id}/auth-check): one small request that
knows about gated repos, so a user who never accepted the SD3.5 license learns it before a 20 GB
download, with the exact URL to accept it. Write access uses ``whoami`` (token role, fine-grained
permissions, organisation roles) because the target repo usually does not exist yet.

``hub_errors`` translates huggingface_hub exceptions into sd35hub's typed errors; hub.py and the
publishing code use it too. Nothing here downloads a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sd35hub.errors import (
    HubRequestError,
    LicenseNotAcceptedError,
    NotLoggedInError,
    RepoNotFoundError,
    Sd35HubError,
    WritePermissionError,
)

# Fine-grained token permissions that allow pushing commits to a repo.
_WRITE_PERMISSIONS = {"repo.write", "repo.content.write"}


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
) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions raised inside the block into sd35hub errors.

    ``write``: the block writes to ``repo_id``, so a 403 means the token lacks write permission;
    otherwise a 403 means it may not read the repo (e.g. a fine-grained token without access)."""
    try:
        import httpx2 as httpx  # huggingface_hub >= 2.4's HTTP client (an httpx fork)
    except ImportError:  # pragma: no cover - older huggingface_hub 2.x
        import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except Sd35HubError:
        raise
    except GatedRepoError as exc:  # subclass of RepositoryNotFoundError: test it first
        raise LicenseNotAcceptedError(repo_id, hub_endpoint()) from exc
    except RevisionNotFoundError as exc:
        raise RepoNotFoundError(repo_id, repo_type, "The requested revision (branch, tag or commit) does not exist.") from exc
    except RepositoryNotFoundError as exc:
        raise RepoNotFoundError(repo_id, repo_type) from exc
    except LocalTokenNotFoundError as exc:
        raise NotLoggedInError(what) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise NotLoggedInError(what) from exc
        if status == 403:
            if write:
                raise WritePermissionError(repo_id, _redact(_server_message(exc), token)) from exc
            raise RepoNotFoundError(
                repo_id, repo_type, f"Your token is not allowed to read it: {_redact(_server_message(exc), token)}"
            ) from exc
        raise HubRequestError(
            f"The Hub request for {repo_id} failed (HTTP {status}): {_redact(_server_message(exc), token)} "
            "Check https://status.huggingface.co and your network, then run again."
        ) from exc
    except (httpx.TransportError, ConnectionError, TimeoutError) as exc:
        raise HubRequestError(
            f"Could not reach the Hub at {hub_endpoint()} for {repo_id}: {type(exc).__name__}: "
            f"{_redact(str(exc), token)}. Check your network (and HF_ENDPOINT), then run again."
        ) from exc


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
    (missing, private, or revision missing), NotLoggedInError (a token is needed and none works),
    HubRequestError (network).
    """
    from huggingface_hub import HfApi, get_token

    api = HfApi(token=token)
    with hub_errors(repo_id, repo_type=repo_type, token=token, what=f"reading {repo_id}"):
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

    Raises NotLoggedInError (no or invalid token) or WritePermissionError (read-only token,
    fine-grained token without write access to the namespace, or not a writer of the org).
    Call it before training or uploading anything.
    """
    from huggingface_hub import HfApi

    if token is False:
        raise NotLoggedInError(f"publishing to {repo_id}")
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    api = HfApi(token=token)
    with hub_errors(repo_id, token=token, what=f"publishing to {repo_id}", write=True):
        try:
            whoami = api.whoami(token=token)
        except Exception as exc:
            from huggingface_hub.errors import HfHubHTTPError

            if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
                raise NotLoggedInError(f"publishing to {repo_id} (the token was rejected as invalid)") from exc
            raise
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
