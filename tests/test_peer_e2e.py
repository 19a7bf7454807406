"""benchmarks/peer_e2e.py's bookkeeping: the peer's sample counts and the fixes applied to its copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("peer_e2e", ROOT / "benchmarks" / "peer_e2e.py")
peer_e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_e2e)


def test_peer_windows_are_whole_epochs_with_the_short_last_batch() -> None:
    assert peer_e2e.epoch_sizes(8) == [8, 8, 8, 8, 2] and peer_e2e.epoch_sizes(4) == [4] * 8 + [2]
    for model in ("medium", "large"):
        plan = peer_e2e.PLAN[model]
        steps = plan["peer_steps"] - plan["peer_from"]
        epoch = len(peer_e2e.epoch_sizes(plan["batch"]))
        assert steps % epoch == 0, model  # any run of whole epochs holds each batch size once
        assert peer_e2e.peer_samples(plan["peer_from"], plan["peer_steps"], plan["batch"]) == 34 * steps // epoch
    assert peer_e2e.peer_samples(0, 5, 8) == 34 and peer_e2e.peer_samples(4, 5, 8) == 2


def test_the_peer_copy_gets_a_fix_only_where_it_is_needed(tmp_path: Path) -> None:
    src = tmp_path / "peer.py"
    src.write_text('import x\ncheck_min_version("999.0.0.dev0")\nprint(1)\n')
    fixes = peer_e2e.prepare_peer(src, tmp_path / "copy" / "peer.py")
    assert len(fixes) == 1 and "check_min_version relaxed" in fixes[0]
    assert 'check_min_version("999' not in (tmp_path / "copy" / "peer.py").read_text()
    src.write_text('check_min_version("0.1.0")\n')
    assert peer_e2e.prepare_peer(src, tmp_path / "copy2.py") == []
    assert (tmp_path / "copy2.py").read_text() == src.read_text()
    assert "pass" in peer_e2e.FIXES[0][2]  # the relaxed line is still valid Python at module level


def test_the_peers_progress_line_is_parsed() -> None:
    line = "Steps:  42%|████▏     | 5/12 [00:07<00:09,  1.31s/it, loss=0.53, lr=0.0001]"
    assert peer_e2e.STEP_RE.search(line).groups() == ("5", "12")
    assert peer_e2e.STEP_RE.search("Caching latents: 100%|██████████| 5/5 [00:01<00:00]") is None


def test_the_report_lists_ours_phases() -> None:
    report = {"device": "cpu", "peer_source": "x", "skipped": [], "build_s": {},
              "models": {"tiny": {"ours_warm": {"rc": 0, "to_first_step_s": 3.0,
                                                "phases": {"imports": 2.0, "to first step": 3.0}}}}}
    text = peer_e2e.markdown(report)
    assert "tiny ours_warm, seconds to the first step by phase: imports 2.0, to first step 3.0" in text
