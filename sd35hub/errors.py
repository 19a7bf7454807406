"""Every error sd35hub raises on purpose.

Each class carries an ``exit_code`` (what the CLI exits with) and a message that says how to fix
the problem. Only ``sd35hub.frontends.cli`` (and the Space) format them for people; library code raises.

Exit codes (documented in docs/cli.md):
    1  unexpected internal error (a bug: please report it with SD35HUB_DEBUG=1 output)
    2  bad configuration or command-line usage
    3  license of a gated base model not accepted
    4  not logged in to the Hub / token missing
    5  repository (model, dataset, adapter) not found or private
    6  token lacks write permission for the target repository
    7  dataset problem (no usable samples, column not found, unreadable source)
    8  model could not be loaded
    9  adapter incompatible with the base model, unknown format or unsafe file
    10 Hub request failed after retries (network, server error)
    11 out of (GPU) memory
    12 hardware / dependency missing for a requested option
    13 disk full, or a file/folder cannot be written (permission, read-only filesystem)
    14 a Hub job failed, timed out or was cancelled (the message says how to resume)
    130 interrupted (a checkpoint was written when possible)
"""

from __future__ import annotations


class Sd35HubError(Exception):
    """Base class: a problem the user can fix; the message says how."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(Sd35HubError):
    """One or more configuration fields are invalid; ``problems`` lists each one."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = f"Invalid configuration: {self.problems[0]}"
        else:
            text = f"Invalid configuration ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(text)


class PromptSyntaxError(ConfigError):
    """A `<lora:owner/repo:0.8>` tag in a prompt is malformed; the message shows the tag and the fix."""

    def __init__(self, message: str) -> None:
        self.problems = [message]
        Sd35HubError.__init__(self, message)


class LicenseNotAcceptedError(Sd35HubError):
    exit_code = 3

    def __init__(self, repo_id: str, endpoint: str = "https://huggingface.co") -> None:
        self.repo_id = repo_id
        self.url = f"{endpoint.rstrip('/')}/{repo_id}"
        super().__init__(
            f"License not accepted for {repo_id}. Accept it at {self.url} "
            "(log in, read the Stability AI Community License, click 'Agree') and run again."
        )


class NotLoggedInError(Sd35HubError):
    exit_code = 4

    def __init__(self, what: str = "this action") -> None:
        super().__init__(
            f"You are not logged in to the Hugging Face Hub, which {what} needs. "
            "Set HF_TOKEN, or run `hf auth login`, or in Colab add HF_TOKEN under Secrets (the key icon) "
            "and enable notebook access; then run again."
        )


class RepoNotFoundError(Sd35HubError):
    exit_code = 5

    def __init__(self, repo_id: str, repo_type: str = "model", detail: str = "") -> None:
        self.repo_id = repo_id
        super().__init__(
            f"The {repo_type} repository {repo_id!r} does not exist or is private and your token cannot see it. "
            f"Check the spelling, or log in with a token that has access.{(' ' + detail) if detail else ''}"
        )


class RevisionNotFoundError(RepoNotFoundError):
    """The repository exists but has no such branch, tag or commit."""

    def __init__(self, repo_id: str, revision: str | None = None, repo_type: str = "model") -> None:
        self.repo_id = repo_id
        self.revision = revision
        which = f"revision {revision!r}" if revision else "the requested revision"
        Sd35HubError.__init__(
            self,
            f"The {repo_type} repository {repo_id!r} has no {which} (branch, tag or commit). Check the name "
            "(`hf repo-files` or the repo's 'Files' tab lists branches), or leave --revision out for main.",
        )


class WritePermissionError(Sd35HubError):
    exit_code = 6

    def __init__(self, repo_id: str, detail: str = "") -> None:
        self.repo_id = repo_id
        super().__init__(
            f"Your token cannot write to {repo_id}. {detail + ' ' if detail else ''}"
            "Create a token with the 'write' role (or a fine-grained token with write access to this "
            "namespace) at https://huggingface.co/settings/tokens and log in with it."
        )


class DatasetError(Sd35HubError):
    exit_code = 7


class ModelLoadError(Sd35HubError):
    exit_code = 8


class AdapterError(Sd35HubError):
    exit_code = 9


class AdapterIncompatibleError(AdapterError):
    """An adapter was trained for another base architecture than the one it is applied to."""


class UnsafeFileError(AdapterError):
    """A pickled file (.bin/.pt/.ckpt/.pth) was offered: sd35hub only loads safetensors."""


class AdapterSourceError(AdapterError):
    """An adapter source that the safe source policy (sd35hub.hub.sources) refuses: not a Hub id or
    huggingface.co URL, a local path, another file type, or a file the repo does not have. ``source`` is
    the text refused (at most 80 characters), ``reason`` one of SOURCE_REASONS; ``repo_id`` and ``filename``
    are set where the source named them. The message says the fix in the library's terms; a front end may
    word ``reason`` for its own audience."""

    def __init__(
        self, message: str, *, source: str, reason: str, repo_id: str | None = None, filename: str | None = None
    ) -> None:
        super().__init__(message)
        self.source, self.reason, self.repo_id, self.filename = source, reason, repo_id, filename


# AdapterSourceError.reason values
SOURCE_REASONS = (
    "not_hub_url",  # an http(s) URL that is not a Hub model page or file
    "not_repo_id",  # not OWNER/REPO: a local path (./x, /x, ~, ..) or the wrong number of parts
    "invalid_repo_id",  # OWNER/REPO shaped, but not a valid Hub repo id
    "not_safetensors",  # names a file that is not .safetensors
    "no_such_file",  # names a file the repo does not have
)


class AdapterBaseMismatchError(AdapterIncompatibleError):
    """An adapter's card names another base model than the one it is checked against (before any download)."""

    def __init__(self, repo_id: str, declared_base: str, expected_base: str) -> None:
        self.repo_id, self.declared_base, self.expected_base = repo_id, declared_base, expected_base
        super().__init__(
            f"{repo_id} is an adapter for {declared_base} (the base_model of its card), not for {expected_base}. "
            f"Use an adapter made for {expected_base}, or load {repo_id} on {declared_base}."
        )


class AdapterTooLargeError(AdapterError):
    """An adapter file is larger than the size limit it was checked against (``max_bytes``), before it is read."""

    def __init__(self, name: str, size_bytes: int, max_bytes: int) -> None:
        self.name, self.size_bytes, self.max_bytes = name, size_bytes, max_bytes
        super().__init__(
            f"{name} is {format_size(size_bytes)}, over the limit of {format_size(max_bytes)} (max_bytes): this is "
            "probably a full model, not a LoRA adapter. Pick another file or raise the limit."
        )


class HubRequestError(Sd35HubError):
    exit_code = 10


class HubConnectionError(HubRequestError):
    """The Hub could not be reached (refused, dropped connection, DNS) or did not answer in time."""


class HubTimeoutError(HubConnectionError):
    """A Hub request got no answer within its timeout (after its retries); the message names the request."""


class OutOfMemoryError(Sd35HubError):
    exit_code = 11


class MemoryPlanError(OutOfMemoryError):
    """No memory plan fits this card / this machine: raised before any weights download.
    ``phase`` is the first phase that does not fit; ``fixes`` the single settings that would."""

    def __init__(self, message: str, *, phase: str, fixes: list[str]) -> None:
        super().__init__(message)
        self.phase, self.fixes = phase, list(fixes)


class MissingDependencyError(Sd35HubError):
    exit_code = 12

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        how = f"pip install 'sd35hub[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the package {package!r}, which is not installed. Run: {how}")


class HardwareError(Sd35HubError):
    """A requested option needs hardware this machine lacks (e.g. bitsandbytes quantization without CUDA)."""

    exit_code = 12


class JobError(Sd35HubError):
    """A job on Hugging Face Jobs failed, hit its timeout or was cancelled."""

    exit_code = 14


class TrainingInterrupted(Sd35HubError):
    exit_code = 130


class DiskFullError(Sd35HubError):
    """A write failed because the filesystem is full (ENOSPC / quota); says where and about how much was needed."""

    exit_code = 13

    def __init__(self, path: str, needed_bytes: int | None = None, free_bytes: int | None = None) -> None:
        self.path = str(path)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        needed = f", needed ~{_mb(needed_bytes)} MB" if needed_bytes else ""
        free = f" ({_mb(free_bytes)} MB free)" if free_bytes is not None else ""
        super().__init__(
            f"No space left on {self.path}{needed}{free}. Free some space or write to a larger disk "
            "(--output, train.checkpoint_dir, data.cache_dir, SD35HUB_CACHE, HF_HOME), then run again "
            "(training continues with --resume latest)."
        )


class FileWriteError(Sd35HubError):
    """A file or folder could not be written: no permission, a read-only filesystem, or a file in the way."""

    exit_code = 13


class InvalidTokenError(NotLoggedInError):
    """The Hub rejected the token itself (HTTP 401 on a request that sent one): invalid, expired or revoked."""

    def __init__(self, what: str = "this action") -> None:
        Sd35HubError.__init__(
            self,
            f"The Hub rejected your Hugging Face token as invalid or expired ({what} needs a valid one). "
            "Create a new token at https://huggingface.co/settings/tokens, then set HF_TOKEN or run "
            "`hf auth login` again.",
        )


def format_size(n: int) -> str:
    """Bytes as people read them in a message: '512 B', '3.2 MiB', '4.1 GiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _mb(n: int | None) -> str:
    return f"{max(1, round((n or 0) / 2**20)):,}"


# What each exit code means: the table in docs/cli.md is tested against this (tests/test_cli_exit_codes.py).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug)",
    2: "bad configuration or command-line usage",
    3: "license of a gated base model not accepted",
    4: "not logged in / token missing or invalid",
    5: "repository (model, dataset, adapter) or revision not found, or private",
    6: "token cannot write to the target repository",
    7: "dataset problem (no usable samples, column not found, unreadable source)",
    8: "model could not be loaded",
    9: "adapter incompatible, unknown format, unsafe (pickled) file, or too large",
    10: "Hub request failed after retries (network, server error)",
    11: "out of (GPU) memory",
    12: "hardware or dependency missing for a requested option",
    13: "disk full, or a file or folder cannot be written (permission, read-only)",
    14: "a job on Hugging Face Jobs failed, hit its timeout or was cancelled",
    130: "interrupted (Ctrl-C or SIGTERM; a checkpoint was written when training)",
}


class NonFiniteError(AdapterError):
    """An adapter holds NaN/inf weights, or an image's latents stopped being finite while generating
    (an adapter that overflows at its weight); the message names the adapters."""


class GenerationCancelled(Sd35HubError):
    """The person who asked for an image cancelled it (progress callback); nothing was produced."""
