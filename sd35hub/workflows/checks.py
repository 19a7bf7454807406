"""What a run needs from the Hub, checked once before anything downloads: the one access check of the CLI's
``train``, the notebook's access cell, the trainer's setup and ``--on hf-jobs``.

    lines = check_run_access(cfg)                      # read the base (license), write hub.repo_id if publishing
    with checks_once():                                # sd35hub.access: a passed read check is not asked again
        trainer.setup(); trainer.train(); trainer.save()

Part of the plan layer (docs/architecture.md): the trainer calls it, so it imports nothing from train/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sd35hub.access import checks_once

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.config import Config

__all__ = ["check_run_access", "checks_once"]


def check_run_access(cfg: Config, *, token: str | bool | None = None, publish: bool | None = None,
                     dataset: bool = False) -> list[str]:
    """Raise the typed access error (license, token, missing repo, no write permission) of the first
    permission the run lacks; return one line per check that passed.

    Reads the base when it is a Hub model; the dataset when ``dataset`` (a job reads it on the Hub's
    machine with this token) and it is a Hub dataset; writes ``hub.repo_id`` when ``publish`` (default:
    ``hub.push_to_hub``) and a repo is named.
    """
    from sd35hub.access import check_read_access, check_write_access
    from sd35hub.models.load import resolve_model

    lines: list[str] = []
    model = cfg.model
    if resolve_model(model.name, model.revision).is_hub:
        check_read_access(model.name, revision=model.revision, token=token)
        lines.append(f"read access to {model.name}: ok (license accepted)")
    else:
        lines.append(f"{model.name}: local model, no license check needed")
    if dataset and cfg.data.source != "sample":
        from sd35hub.data.sources import resolve_source

        if resolve_source(cfg.data.source).kind == "hub":
            check_read_access(cfg.data.source, repo_type="dataset", token=token)
            lines.append(f"read access to the dataset {cfg.data.source}: ok")
    publish = cfg.hub.push_to_hub if publish is None else publish
    if publish and cfg.hub.repo_id:
        user = check_write_access(cfg.hub.repo_id, token=token)
        lines.append(f"write access to {cfg.hub.repo_id}: ok (as {user})")
    return lines
