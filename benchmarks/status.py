"""The "Status against the issue goals" section at the top of BENCHMARKS.md, computed from result files.

Each goal names the result file(s) that hold its latest measurement, the rows that count and the
figure taken from them. The table shows the range over those rows (shapes, batches, contexts) and
whether the goal is met on all of them; the hand-written explanations of each shortfall are in the
analysis of the named file. Nothing here types a measured number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    """One goal: ``figure(row)`` over the rows of ``files`` that ``keep(file, row)`` selects must be >=
    ``goal``."""

    issue: int
    label: str
    files: tuple[str, ...]
    keep: Callable[[str, dict], bool]
    figure: Callable[[dict], float]
    goal: float
    unit: str = "x"
    per: Callable[[dict], str] | None = None  # row -> the case name, listed when some rows miss


def _qm(bits: int, ms: tuple[int, ...]) -> Callable[[str, dict], bool]:
    """The launcher's rows at this width and these M; from the s16 lm_head file only what the newer lm_head
    files do not cover (W4: s32-7; the other widths at M >= 64: s21-5)."""
    return lambda f, r: (r["method"] == "anybit" and r["bits"] == bits and r["M"] in ms
                         and not (f == "quant_matmul_s16_lm_head" and (bits == 4 or r["M"] >= 64)))


def _decode(variant: str) -> Callable[[str, dict], bool]:
    """The launcher's default for one cache dtype at batch 32/64 and 4k-32k tokens."""
    return lambda f, r: r["variant"] == variant and r["batch"] in (32, 64) and r["context"] >= 4096


# s33-4: every width and M on the layer shapes at the routes of sessions 23-33 (rws with DUO, whole-tile
# waves and equal parts, PDL and DUO's fixed roles; it replaced s32-9, which had replaced s32-6, s31-5,
# s30-12, s30-10 / s30-8 / s28-2, s23-7, s26-6 and s26-15 for those shapes); lm_head: W4 (M 1-1024, the same
# routes: s32-8's rule finds no program count for its 4008 tiles) from s33-5 (the same code as s33-4), the
# other widths at M >= 64 from s21-5 (rws), at M <= 16 from s16-7 (the goal cells' routes did not change)
QM = ("quant_matmul_s33_4", "quant_matmul_s33_5_lm_head", "quant_matmul_s21_5_lm_head",
      "quant_matmul_s16_lm_head")
# s28-2: the s19-2 grid at the current code (CUDA graphs, f16 scales, GL_PAIR, in-kernel merge, one working
# split writing out)
DECODE = ("attention_decode_graph_s28_2",)
# s27-16 and s33-7: bf16 ("auto" = Triton backend) and W4 in one call each, on two H100s; s33-12 ran s27-16's
# code and session 33's on the s33-7 machine in one call: the same figures (bf16 169.3 both), so the bf16
# difference between the two files is the machine
E2E = ("e2e_w4_bf16_batches_s27_16", "e2e_w4_bf16_batches_s33_7")
SPEEDUP = lambda r: r["speedup"]  # noqa: E731
SHAPE = lambda r: f"{r['shape']} M{r['M']}"  # noqa: E731

GOALS = [
    Goal(3, "W4 at M = 1 vs cuBLAS bf16", QM, _qm(4, (1,)), SPEEDUP, 3.2, per=SHAPE),
    Goal(3, "W3 at M = 1", QM, _qm(3, (1,)), SPEEDUP, 4.0, per=SHAPE),
    Goal(3, "W2 at M = 1", QM, _qm(2, (1,)), SPEEDUP, 5.0, per=SHAPE),
    Goal(3, "W5 at M = 1", QM, _qm(5, (1,)), SPEEDUP, 2.6, per=SHAPE),
    Goal(3, "W6 at M = 1", QM, _qm(6, (1,)), SPEEDUP, 2.2, per=SHAPE),
    Goal(3, "W8 at M = 1", QM, _qm(8, (1,)), SPEEDUP, 1.8, per=SHAPE),
    Goal(3, "W4 at M = 16", QM, _qm(4, (16,)), SPEEDUP, 3.0, per=SHAPE),
    Goal(3, "W4 at M = 64", QM, _qm(4, (64,)), SPEEDUP, 2.0, per=SHAPE),
    Goal(3, "W4 at M = 256 and 1024", QM, _qm(4, (256, 1024)), SPEEDUP, 0.9, per=SHAPE),
    Goal(4, "prefill vs SDPA flash (causal d128, 1k-16k)", ("attention_prefill_s14",), lambda f, r: True,
         lambda r: r["vs_flash"], 1.0, per=lambda r: r["seqs"]),
    Goal(4, "decode b32/b64 4k-32k, bf16 KV: effective TB/s", DECODE, _decode("bf16"),
         lambda r: r["tb_per_s"], 2.6, " TB/s", per=lambda r: f"b{r['batch']} {r['context']}"),
    Goal(4, "decode b32/b64 4k-32k, int8 KV vs our bf16 KV", DECODE, _decode("int8"),
         lambda r: r["speedup_vs_bf16"], 1.8, per=lambda r: f"b{r['batch']} {r['context']}"),
    Goal(4, "decode b32/b64 4k-32k, int4 KV vs our bf16 KV", DECODE, _decode("int4"),
         lambda r: r["speedup_vs_bf16"], 3.2, per=lambda r: f"b{r['batch']} {r['context']}"),
    Goal(4, "batch-1 decode, bf16 (llama3-8b random)", E2E, lambda f, r: r["batch"] == 1,
         lambda r: r.get("anybit_triton_decode_tok_s", r.get("anybit_auto_decode_tok_s")), 170.0, " tok/s"),
    Goal(4, "batch-1 decode, W4 (lm_head W4)", E2E, lambda f, r: r["batch"] == 1,
         lambda r: r["anybit_w4_decode_tok_s"], 450.0, " tok/s"),
]


def _fmt(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def goal_row(goal: Goal, records: dict[str, dict]) -> str:
    """One markdown table row: issue, goal, latest range (and the cases that miss), met, source."""
    missing = [f for f in goal.files if f not in records]
    src = ", ".join(f"`{f}`" for f in goal.files)
    if missing:
        return f"| {goal.issue} | {goal.label} | >= {_fmt(goal.goal)}{goal.unit} | no record | - | {src} |"
    rows = [r for f in goal.files for r in records[f]["rows"] if goal.keep(f, r)]
    if not rows:
        return f"| {goal.issue} | {goal.label} | >= {_fmt(goal.goal)}{goal.unit} | no rows | - | {src} |"
    vals = [goal.figure(r) for r in rows]
    lo, hi = min(vals), max(vals)
    got = _fmt(lo) if _fmt(lo) == _fmt(hi) else f"{_fmt(lo)}-{_fmt(hi)}"
    met = sum(v >= goal.goal for v in vals)
    verdict = "yes" if met == len(vals) else "no" if met == 0 else f"{met} of {len(vals)}"
    if goal.per is not None and 0 < met < len(vals):
        verdict += " (met: " + ", ".join(goal.per(r) for r, v in zip(rows, vals) if v >= goal.goal) + ")"
    devices = ", ".join(sorted({records[f]["device"] for f in goal.files}))
    target = f">= {_fmt(goal.goal)}{goal.unit}"
    return f"| {goal.issue} | {goal.label} | {target} | {got}{goal.unit} | {verdict} | {src} ({devices}) |"


def status_section(records: dict[str, dict]) -> str:
    """The section's markdown: one row per goal of ``GOALS`` from ``records`` (benchmark name -> result)."""
    lines = ["## Status against the issue goals", "",
             "Computed from the result files named in the last column (ranges over their shapes, batches "
             "and contexts); why a goal is missed is in the analysis under that file's table below.", "",
             "| issue | goal | target | latest | met | source |", "|---|---|---|---|---|---|"]
    lines += [goal_row(g, records) for g in GOALS]
    return "\n".join(lines) + "\n"
