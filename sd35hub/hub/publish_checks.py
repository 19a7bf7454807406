"""What `publish` accepts from a run folder: a well-formed summary.json, and files inside the folder only.

summary.json is a file on disk anyone may edit (or a damaged one). The rules live with its schema,
sd35hub.run_summary.RunSummary: every field is checked against the type declared there before the card is
built, and every path it names (the adapter, validation images, the loss plot, the pivotal embeddings)
must be a plain relative path that, with symbolic links resolved, stays inside the run folder. Anything
else is a ConfigError naming each field and the fix; nothing outside the folder is ever read for upload.
"""

from __future__ import annotations

from pathlib import Path

from sd35hub.run_summary import RunSummary, inside

__all__ = ["check_summary", "inside"]


def check_summary(output_dir: Path) -> RunSummary:
    """The summary of ``output_dir`` when summary.json is there and well formed; ConfigError listing
    every problem otherwise (RunSummary.read)."""
    return RunSummary.read(output_dir)
