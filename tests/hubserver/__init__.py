"""Local Hub-compatible test server: the real huggingface_hub / datasets clients talk to it over
HF_ENDPOINT. See docs/testing.md."""

from .server import HubServer, RequestRecord
from .state import git_blob_oid

__all__ = ["HubServer", "RequestRecord", "git_blob_oid"]
