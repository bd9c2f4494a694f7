"""Quantize the trained bf16 default model with anybit's own quantizer and install it as the
package's built-in model (``anybit/default_model/``), recording the perplexity bound the CPU test
checks.

    python scripts/train_ship_model.py --src artifacts/default-model-bf16 --bits 4 --method gptq

Steps: ``anybit quantize SRC TMP --bits B --group-size G --method M [--calib FILE]`` (GPTQ
calibration: training-split stdlib files), copy the provenance files (heldout.json,
heldout_sample.json, training.json, tokenizer files the quantizer did not copy), check the folder
is at most ``--max-mb`` MB, score the held-out sample prefix the test uses on CPU through the
engine for both the bf16 and the quantized model, write ``heldout.json["shipped"]`` and replace
``anybit/default_model/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eval_perplexity import calib_text, quantize  # noqa: E402

from anybit.default_model import sample_windows, score_nll  # noqa: E402

DEST = os.path.join(ROOT, "anybit", "default_model")
COPY = ("heldout.json", "heldout_sample.json", "training.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "generation_config.json")
TEST_TOKENS, TEST_WINDOW, BOUND_FACTOR = 3000, 1023, 1.05


def sample_ppl(path: str) -> tuple[float, int]:
    """Perplexity of the test's held-out sample prefix, on CPU through the engine."""
    from anybit import LLM

    llm = LLM(path, progress=False, device="cpu", enable_chunked_prefill=False, max_num_batched_tokens=4096)
    nll, n = score_nll(llm, sample_windows(llm.tokenizer, path, TEST_TOKENS, TEST_WINDOW))
    return math.exp(nll), n


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=os.path.join(ROOT, "artifacts", "default-model-bf16"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    ap.add_argument("--corpus", default=None, help="stdlib dir or .tar.xz for GPTQ calibration")
    ap.add_argument("--calib-bytes", type=int, default=400_000)
    ap.add_argument("--max-mb", type=float, default=25.0)
    ap.add_argument("--quantized", default=None,
                    help="existing `anybit quantize` output of --src with these settings (skip quantizing)")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="anybit-ship-")
    out = os.path.join(work, "default_model")
    calib = os.path.join(work, "calib.txt")
    with open(calib, "w") as f:
        f.write(calib_text(a.corpus, a.calib_bytes))
    if a.quantized:
        shutil.copytree(a.quantized, out)
        secs = float("nan")
    else:
        secs = quantize(a.src, out, a.method, a.bits, a.group_size, calib)
    for name in COPY:
        if not os.path.exists(os.path.join(out, name)) or name.startswith(("heldout", "training")):
            shutil.copy2(os.path.join(a.src, name), os.path.join(out, name))
    mb = folder_mb(out)
    if mb > a.max_mb:
        raise SystemExit(f"quantized folder is {mb:.1f} MB > --max-mb {a.max_mb}: use fewer bits")
    ppl_bf16, n = sample_ppl(a.src)
    ppl_q, n_q = sample_ppl(out)
    assert n == n_q
    info_path = os.path.join(out, "heldout.json")
    with open(info_path) as f:
        info = json.load(f)
    info["shipped"] = {
        "quantization": {"method": a.method, "bits": a.bits, "group_size": a.group_size,
                         "calibration_bytes": a.calib_bytes if a.method == "gptq" else 0,
                         "quantize_seconds": None if math.isnan(secs) else round(secs, 1),
                         "command": f"anybit quantize SRC OUT --bits {a.bits} --group-size {a.group_size} "
                                    f"--method {a.method}" + (" --calib CALIB" * (a.method == "gptq"))},
        "folder_mb": round(mb, 2),
        "test_protocol": {"tokens": n, "window": TEST_WINDOW,
                          "what": "first tokens of heldout_sample.json, anybit engine on CPU (float32)"},
        "test_sample_ppl_bf16": round(ppl_bf16, 4),
        "test_sample_ppl": round(ppl_q, 4),
        "test_ppl_bound": round(ppl_q * BOUND_FACTOR, 4),
        "bound_rule": f"test_sample_ppl * {BOUND_FACTOR}",
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    if os.path.isdir(DEST):
        shutil.rmtree(DEST)
    shutil.copytree(out, DEST)
    os.chmod(DEST, 0o755)
    for name in os.listdir(DEST):
        os.chmod(os.path.join(DEST, name), 0o644)
    shutil.rmtree(work)
    print(json.dumps(info["shipped"], indent=1))
    print(f"installed {DEST} ({mb:.1f} MB)")


if __name__ == "__main__":
    main()
