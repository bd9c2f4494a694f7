"""The generated status section of BENCHMARKS.md (benchmarks/status.py): ranges, verdicts and the
cases that meet a goal come from the result rows; missing files are reported, not guessed."""

from pathlib import Path

from benchmarks.status import GOALS, Goal, goal_row, status_section


def _record(rows, device="GPU X"):
    return {"device": device, "rows": rows}


def test_range_verdict_and_cases_that_meet_the_goal():
    goal = Goal(3, "W4 at M = 1", ("a",), lambda f, r: r["M"] == 1, lambda r: r["speedup"], 3.2,
                per=lambda r: r["shape"])
    rows = [dict(M=1, shape="s1", speedup=2.5), dict(M=1, shape="s2", speedup=3.7),
            dict(M=4, shape="s1", speedup=9.0)]
    line = goal_row(goal, {"a": _record(rows)})
    assert "| 2.50-3.70x |" in line and "1 of 2 (met: s2)" in line and "(GPU X)" in line
    assert "| yes |" in goal_row(goal, {"a": _record([dict(M=1, shape="s", speedup=4.0)])})
    assert "| no |" in goal_row(goal, {"a": _record([dict(M=1, shape="s", speedup=1.0)])})
    assert "no record" in goal_row(goal, {})
    assert "no rows" in goal_row(goal, {"a": _record([dict(M=4, shape="s", speedup=1.0)])})


def test_every_goal_renders_from_the_committed_results():
    import json
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    records = {f.stem: json.loads(f.read_text()) for f in results.glob("*.json")}
    text = status_section(records)
    assert text.count("\n| 3 |") == sum(g.issue == 3 for g in GOALS)
    assert text.count("\n| 4 |") == sum(g.issue == 4 for g in GOALS)
    assert "no record" not in text and "no rows" not in text
