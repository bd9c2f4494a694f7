"""Held-out perplexity of the default model per weight bit width and KV-cache dtype, through anybit.

Quantizes the bf16 model with anybit's own quantizer (``anybit quantize``, RTN and GPTQ) and
scores a fixed held-out token budget with the engine (``SamplingParams(prompt_logprobs=0,
max_tokens=1)``), then writes ``benchmarks/results/quality.json`` (the benchmark JSON schema).

Held-out text: the held-out files listed in the model's ``heldout.json`` (never trained on),
read from ``--corpus`` (a stdlib folder or the ``.tar.xz`` of ``train_make_corpus.py``; by
default this interpreter's stdlib, which must be the Python version recorded there). Files are
taken in the order of the SHA-1 of their path until ``--tokens`` are scored; protocol as in
``anybit/default_model.py`` (chunks of ``--window - 1`` tokens after a BOS).
GPTQ calibration text: training-split files of the same corpus (never held-out ones).

    python scripts/eval_perplexity.py --model artifacts/default-model-bf16 --tokens 16384
    python scripts/eval_perplexity.py --only bf16,rtn4 --tokens 4096       # a quick subset
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import train_data as D  # noqa: E402

from anybit.default_model import perplexity_windows, score_nll  # noqa: E402

BITS = (8, 6, 5, 4, 3, 2)


def configs() -> list[dict]:
    """All rows: bf16, RTN/GPTQ x bits at group 128 (+ group 32 for 3/2 bits), KV int8/int4."""
    rows = [dict(name="bf16", method="none", bits=16, group_size=None, kv="auto", base=True)]
    for method in ("rtn", "gptq"):
        for b in BITS:
            rows.append(dict(name=f"{method}{b}", method=method, bits=b, group_size=128, kv="auto"))
        for b in (3, 2):
            rows.append(dict(name=f"{method}{b}g32", method=method, bits=b, group_size=32, kv="auto"))
    for kv in ("int8", "int4"):
        rows.append(dict(name=f"bf16-kv{kv}", method="none", bits=16, group_size=None, kv=kv))
        rows.append(dict(name=f"gptq4-kv{kv}", method="gptq", bits=4, group_size=128, kv=kv))
    return rows


def as_is_configs(model: str) -> list[dict]:
    """``--as-is``: the model folder itself (e.g. the shipped quantized one) with each KV dtype."""
    with open(os.path.join(model, "config.json")) as f:
        qc = json.load(f).get("quantization_config") or {}
    method = qc.get("quant_method", "none")
    info_path = os.path.join(model, "heldout.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            method = json.load(f).get("shipped", {}).get("quantization", {}).get("method", method)
    bits, group = qc.get("bits", 16), qc.get("group_size")
    return [dict(name=f"model-kv{kv}", method=method, bits=bits, group_size=group, kv=kv, base=kv == "auto",
                 as_is=True) for kv in ("auto", "int8", "int4")]


def heldout_docs(model: str, corpus: str | None) -> list[str]:
    with open(os.path.join(model, "heldout.json")) as f:
        info = json.load(f)
    files, cinfo = D.read_corpus(corpus)
    want, have = info["corpus"].get("python_version"), cinfo.get("python_version")
    if want and have and want != have:
        print(f"WARNING: corpus Python {have} != training corpus Python {want}; held-out files may "
              f"differ", file=sys.stderr)
    texts = dict(files)
    names = [n for n in info["heldout_files"] if n in texts]
    if len(names) < len(info["heldout_files"]):
        print(f"WARNING: {len(info['heldout_files']) - len(names)} held-out files missing", file=sys.stderr)
    names.sort(key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    return [texts[n] for n in names]


def calib_text(corpus: str | None, max_bytes: int) -> str:
    """Training-split files in SHA-1 order, up to ``max_bytes`` (GPTQ calibration)."""
    files, _ = D.read_corpus(corpus)
    train = sorted((r for r in files if D.split_bucket(r[0]) == "train"),
                   key=lambda r: hashlib.sha1(r[0].encode()).hexdigest())
    out, n = [], 0
    for _, t in train:
        if n + len(t) > max_bytes:
            continue
        out.append(t)
        n += len(t)
    return "\n\n".join(out)


def make_windows(tok, docs: list[str], window: int, budget: int) -> list[list[int]]:
    ws, n = [], 0
    for text in docs:
        for w in perplexity_windows([tok.encode(text, add_special_tokens=False)], tok.bos_token_id, window):
            take = min(len(w) - 1, budget - n)
            if take <= 0:
                return ws
            ws.append(w[: take + 1])
            n += take
    return ws


def engine_nll(model: str, windows: list[list[int]], kv: str, device: str) -> tuple[float, int]:
    """Mean NLL (nats/token) of the windows' tokens after the first, scored by anybit."""
    from anybit import LLM

    llm = LLM(model, progress=False, kv_cache_dtype=kv, device=device, enable_chunked_prefill=False,
              max_num_batched_tokens=max(4096, max(len(w) for w in windows) + 1))
    res = score_nll(llm, windows)
    del llm
    return res


def quantize(src: str, out: str, method: str, bits: int, group: int, calib: str | None) -> float:
    """Run ``anybit quantize``; returns seconds."""
    cmd = [sys.executable, "-m", "anybit.cli", "quantize", src, out, "--bits", str(bits),
           "--group-size", str(group), "--method", method]
    if method == "gptq":
        cmd += ["--calib", calib]
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.time() - t


def folder_mb(path: str) -> float:
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    return sum(os.path.getsize(os.path.join(path, f)) for f in files) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "artifacts", "default-model-bf16"))
    ap.add_argument("--corpus", default=None, help="stdlib dir or .tar.xz (default: this Python's stdlib)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored per row")
    ap.add_argument("--window", type=int, default=1023)
    ap.add_argument("--calib-bytes", type=int, default=400_000)
    ap.add_argument("--only", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--as-is", action="store_true",
                    help="evaluate --model itself (no quantization) with KV cache auto/int8/int4")
    ap.add_argument("--keep", default=None, help="folder to keep the quantized checkpoints in")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality.json"))
    a = ap.parse_args()

    from anybit.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(a.model)
    windows = make_windows(tok, heldout_docs(a.model, a.corpus), a.window, a.tokens)
    rows_cfg = as_is_configs(a.model) if a.as_is else configs()
    if a.only:
        keep = set(a.only.split(","))
        rows_cfg = [r for r in rows_cfg if r["name"] in keep]
    work = a.keep or tempfile.mkdtemp(prefix="anybit-quality-")
    calib = os.path.join(work, "calib.txt")
    if any(r["method"] == "gptq" for r in rows_cfg):
        with open(calib, "w") as f:
            f.write(calib_text(a.corpus, a.calib_bytes))
    base_nll = None
    rows = []
    for r in rows_cfg:
        t0 = time.time()
        path, qs = a.model, 0.0
        if r["method"] != "none" and not r.get("as_is"):
            path = os.path.join(work, f"{r['method']}{r['bits']}g{r['group_size']}")
            if not os.path.isdir(path):
                qs = quantize(a.model, path, r["method"], r["bits"], r["group_size"], calib)
        nll, n = engine_nll(path, windows, r["kv"], a.device)
        if r.get("base"):
            base_nll = nll
        row = {"config": r["name"], "weights": "bf16" if r["method"] == "none" else r["method"],
               "bits": r["bits"], "group_size": r["group_size"] or "-",
               "kv_cache": "model dtype" if r["kv"] == "auto" else r["kv"],
               "ppl": round(math.exp(nll), 4), "nll": round(nll, 5),
               "delta_ppl_pct": None if base_nll is None else round(100 * (math.exp(nll - base_nll) - 1), 2),
               "weights_mb": round(folder_mb(path), 2), "tokens": n,
               "quantize_s": round(qs, 1), "eval_s": round(time.time() - t0 - qs, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(a, rows, len(windows))


def write_json(a, rows: list[dict], num_windows: int) -> None:
    dev_is_cuda = a.device != "cpu" and torch.cuda.is_available()
    if dev_is_cuda:
        dev = torch.cuda.get_device_name()
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    res = {
        "benchmark": "quality_shipped" if a.as_is else "quality",
        "title": ("Shipped default model: held-out perplexity per KV-cache dtype" if a.as_is else
                  "Default model: held-out perplexity per weight bit width and KV-cache dtype"),
        "device": dev,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "columns": ["config", "weights", "bits", "group_size", "kv_cache", "ppl", "delta_ppl_pct",
                    "weights_mb", "tokens"],
        "rows": rows,
        "notes": [
            f"Model: {os.path.basename(os.path.normpath(a.model))} (29.4M-parameter Llama trained on the "
            "Python 3.11 stdlib by scripts/train_default_model.py); perplexity of held-out stdlib files.",
            f"{rows[0]['tokens'] if rows else 0} held-out tokens per row in {num_windows} windows of at most "
            f"{a.window} tokens, each scored after <|bos|>; same tokens for every row.",
            "Scored through anybit's engine with SamplingParams(prompt_logprobs=0, max_tokens=1); "
            + ("on CUDA: bf16 activations, Triton kernels (quant_matmul, paged attention, KV quantize)."
               if dev_is_cuda else "on CPU the engine computes in float32 (bf16 weights upcast), torch "
               "reference ops."),
            ("The model folder as shipped (scripts/train_ship_model.py), not re-quantized."
             if a.as_is else "Quantized with `anybit quantize --method rtn|gptq` (asymmetric uniform, "
             f"group-wise scales); GPTQ calibration: {a.calib_bytes // 1000} KB of training-split files.")
            + " weights_mb: safetensors bytes on disk (embeddings stay bf16).",
            "delta_ppl_pct: relative to the " + ("first row (model dtype KV)." if a.as_is else "bf16 row."),
        ],
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
