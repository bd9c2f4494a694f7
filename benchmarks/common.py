"""Shared benchmark helpers: environment record, result JSON in benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device,
            "versions": {"torch": torch.__version__, "triton": triton_version, "transformers": tf_version,
                         "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def write_result(name: str, title: str, columns: list[str], rows: list[dict], notes: list[str],
                 out_dir: str | None = None, **extra) -> Path:
    record = {"benchmark": name, "title": title, **environment(), "columns": columns, "rows": rows,
              "notes": notes, **extra}
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path


def print_table(columns: list[str], rows: list[dict]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
