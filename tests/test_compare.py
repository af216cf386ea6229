"""`python -m results.compare`: paired per-pair comparison of finished runs (discordant counts, exact McNemar)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from results import compare


def _run(root: Path, name: str, decisions: str, accuracy: float, set_name: str = "synthfaces") -> Path:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"val": {set_name: {"accuracy": accuracy, "pair_correct": decisions}}}))
    return d


def test_discordant_pairs_and_exact_mcnemar_against_a_hand_count(tmp_path, capsys):
    ref = _run(tmp_path, "study-a/logit/seed0", "1111100000", 0.5)
    other = _run(tmp_path, "study-b/logit/seed0", "1110011000", 0.5)   # ref-only right: 2 pairs, other-only: 2
    better = _run(tmp_path, "study-c/logit/seed0", "1111111111", 1.0)  # ref-only: 0, other-only: 5
    assert compare.main([str(ref), f"B={other}", str(better)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "synthfaces, 10 pairs; reference: study-a/logit/seed0"
    rows = compare.compare([compare.load_run(str(p)) for p in (ref, other, better)])
    assert "vs" not in rows[0] and rows[0]["accuracy"] == 0.5
    assert (rows[1]["ref_only_right"], rows[1]["only_this_right"], rows[1]["mcnemar_p"]) == (2, 2, 1.0)
    # exact two-sided binomial: 2 * P(X <= 0 | n = 5, 1/2) = 2 / 32
    assert rows[2]["points"] == 50.0 and rows[2]["mcnemar_p"] == pytest.approx(2 / 2 ** 5)
    assert rows[2]["run"] == "study-c/logit/seed0" and "B" in out and "0.062" in out
    assert math.isclose(json.loads(json.dumps(rows))[2]["mcnemar_p"], 0.0625)


def test_runs_must_share_one_set_and_hold_decisions(tmp_path, capsys):
    a = _run(tmp_path, "a", "10", 0.5)
    b = _run(tmp_path, "b", "11", 1.0, set_name="lfw")
    for argv, message in (([str(a), str(b)], "the runs share the sets none: choose one with --set"),
                          ([str(a), str(a), "--set", "lfw"], "--set lfw: not evaluated by every run"),
                          ([str(a)], "give at least two runs"),
                          ([str(a), str(tmp_path / "missing")], "no metrics.json there")):
        with pytest.raises(SystemExit) as exc:
            compare.main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    c = tmp_path / "runs" / "c"
    c.mkdir()
    (c / "metrics.json").write_text(json.dumps({"val": {"synthfaces": {"accuracy": 0.5}}}))
    with pytest.raises(SystemExit):
        compare.main([str(a), str(c)])
    assert "c: its metrics.json has no per-pair decisions for synthfaces" in capsys.readouterr().err
    short = _run(tmp_path, "short", "1", 1.0)
    with pytest.raises(SystemExit):
        compare.main([str(a), str(short)])
    assert "not on the same pairs (2 vs 1)" in capsys.readouterr().err
