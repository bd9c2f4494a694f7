"""Train anybit's built-in default model: a ~30M-parameter Llama on Python's standard library.

Needs only torch, tokenizers and safetensors. Writes a Hugging Face-style folder::

    config.json generation_config.json model.safetensors (bf16, HF LlamaForCausalLM names)
    tokenizer.json tokenizer_config.json special_tokens_map.json
    heldout.json (split rule, corpus Python version, held-out/validation file lists, losses)
    heldout_sample.json (a ~40 KB sample of held-out files, for CPU perplexity tests)
    training.json (hyper-parameters, throughput, loss curve, a greedy sample)

Usage::

    python scripts/train_default_model.py --out artifacts/default-model-bf16 --minutes 9
    python scripts/train_default_model.py --tiny --out /tmp/tiny-model      # CPU smoke test

``--corpus`` takes a stdlib directory or a ``.tar.xz`` from ``scripts/train_make_corpus.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_data as D  # noqa: E402
from train_model import TinyLlama, TinyLlamaConfig, greedy  # noqa: E402

PROMPT = "def fibonacci(n):"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default=None, help="stdlib dir or .tar.xz (default: this Python's stdlib)")
    ap.add_argument("--minutes", type=float, default=9.0, help="training time budget (compile included)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, few files, few steps (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (default: fill --minutes)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--max-epochs", type=float, default=20.0, help="cap on passes over the train stream")
    ap.add_argument("--no-compile", action="store_true")
    return ap.parse_args(argv)


def encode_docs(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def build_stream(docs: list[list[int]], bos: int, eos: int, seed: int) -> torch.Tensor:
    """Shuffle documents (seeded) and pack them as ``bos doc eos bos doc eos ...``."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    flat: list[int] = []
    for i in order:
        flat.append(bos)
        flat.extend(docs[i])
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.int32)


def eval_windows(docs: list[list[int]], bos: int, seq_len: int) -> list[list[int]]:
    """Perplexity protocol: each document cut into chunks of ``seq_len - 1`` tokens, each chunk
    scored after a BOS (the BOS itself is not scored). Same rule as anybit/default_model.py."""
    out = []
    for d in docs:
        for i in range(0, len(d), seq_len - 1):
            out.append([bos] + d[i : i + seq_len - 1])
    return out


@torch.no_grad()
def mean_nll(model, windows: list[list[int]], device, batch: int, amp) -> tuple[float, int]:
    """Mean NLL (nats/token) over all scored tokens of ``windows`` and the token count."""
    model.eval()
    tot, n = 0.0, 0
    windows = sorted(windows, key=len)
    for i in range(0, len(windows), batch):
        ws = windows[i : i + batch]
        t = max(len(w) for w in ws)
        x = torch.zeros(len(ws), t, dtype=torch.long)
        y = torch.full((len(ws), t), -100, dtype=torch.long)
        for j, w in enumerate(ws):
            x[j, : len(w)] = torch.tensor(w)
            y[j, : len(w) - 1] = torch.tensor(w[1:])
        x, y = x.to(device), y.to(device)
        with amp():
            loss = model.loss(x, y)
        k = int((y != -100).sum())
        tot += float(loss) * k
        n += k
    model.train()
    return tot / max(n, 1), n


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tiny:
        a.vocab, a.seq_len, a.batch, a.steps = 512, 128, 4, a.steps or 8
    cfg = TinyLlamaConfig(vocab_size=a.vocab, max_position_embeddings=a.seq_len, dropout=a.dropout)
    if a.tiny:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 64, 192, 2
        cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2

    files, info = D.read_corpus(a.corpus)
    if a.tiny:
        files = files[:150]
    parts = D.split_corpus(files)
    print(
        f"corpus: {info}; train/val/heldout files: "
        f"{len(parts['train'])}/{len(parts['val'])}/{len(parts['heldout'])}",
        flush=True,
    )
    train_texts = [t for _, t in parts["train"]]
    chat = D.chat_examples(parts["train"], limit_chars=int(0.05 * sum(len(t) for t in train_texts)))
    tok = D.train_tokenizer(train_texts + chat, a.vocab)
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = bos, eos, tok.token_to_id("<|pad|>")
    train_docs = encode_docs(tok, train_texts + chat)
    stream = build_stream(train_docs, bos, eos, a.seed).to(dev)
    val_w = eval_windows(encode_docs(tok, [t for _, t in parts["val"]]), bos, a.seq_len)
    val_w = val_w[: (8 if a.tiny else 256)]
    held_w = eval_windows(encode_docs(tok, [t for _, t in parts["heldout"]]), bos, a.seq_len)
    print(
        f"tokenizer + data ready in {time.time() - t0:.0f}s: {len(stream)} train tokens "
        f"({len(chat)} chat examples), {len(held_w)} held-out windows",
        flush=True,
    )

    model = TinyLlama(cfg).to(dev)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, config {cfg}", flush=True)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=a.lr,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        **({"fused": True} if dev.type == "cuda" else {}),
    )
    use_amp = dev.type == "cuda"
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp)
    step_fn = model.loss
    if dev.type == "cuda" and not a.no_compile:
        try:
            step_fn = torch.compile(model.loss)
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable ({e}); eager", flush=True)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    budget = a.minutes * 60 - (time.time() - t0) - 45  # keep time for final eval and save
    total = a.steps or 10**9
    warmup = 8 if a.tiny else 200
    best = (float("inf"), None, -1)
    curve = []
    t_train, tok_count, rate_t = time.time(), 0, None
    step = 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, warmup, a.lr)
        starts = torch.randint(0, len(stream) - a.seq_len - 1, (a.batch,), device=dev, generator=gen)
        idx = starts[:, None] + torch.arange(a.seq_len + 1, device=dev)
        w = stream[idx].long()
        try:
            with amp():
                loss = step_fn(w[:, :-1], w[:, 1:])
        except Exception as e:  # noqa: BLE001
            if step_fn is model.loss:
                raise
            print(f"compiled step failed ({type(e).__name__}: {e}); falling back to eager", flush=True)
            step_fn = model.loss
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tok_count += w[:, :-1].numel()
        if step == 30 and a.steps is None:
            rate_t = (time.time(), step)
        if step == 130 and a.steps is None:
            sps = (step - rate_t[1]) / (time.time() - rate_t[0])
            total = step + int(sps * (budget - (time.time() - t_train)) * 0.97)
            total = min(total, int(a.max_epochs * len(stream) / (a.batch * a.seq_len)))
            print(
                f"{sps:.2f} steps/s = {sps * a.batch * a.seq_len / 1e3:.0f}k tok/s -> total {total} "
                f"steps ({total * a.batch * a.seq_len / len(stream):.1f} epochs)",
                flush=True,
            )
        if step % (4 if a.tiny else 250) == 0 or step == total:
            v, _ = mean_nll(model, val_w, dev, 16, amp)
            curve.append(
                {
                    "step": step,
                    "train_loss": round(loss.item(), 4),
                    "val_loss": round(v, 4),
                    "lr": round(opt.param_groups[0]["lr"], 6),
                    "s": round(time.time() - t0),
                }
            )
            print(json.dumps(curve[-1]), flush=True)
            if v < best[0]:
                best = (v, {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}, step)
    train_s = time.time() - t_train
    if best[1] is not None:
        model.load_state_dict(best[1])
    # evaluate exactly what is saved: bf16-rounded weights
    sd = model.hf_state_dict(torch.bfloat16)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    held, held_n = mean_nll(model, held_w, dev, 16, amp)
    tr_w = eval_windows(train_docs[: len(val_w)], bos, a.seq_len)[: len(val_w)]
    tr, _ = mean_nll(model, tr_w, dev, 16, amp)
    model.eval()
    with amp():
        sample_ids = greedy(model, tok.encode(PROMPT).ids, 16 if a.tiny else 96, {eos})
    sample = tok.decode(sample_ids)
    print(
        f"best step {best[2]}; held-out loss {held:.4f} (ppl {math.exp(held):.2f}) over {held_n} tokens; "
        f"train-sample loss {tr:.4f}",
        flush=True,
    )
    print(f"greedy continuation of {PROMPT!r}:\n{PROMPT}{sample}", flush=True)
    stats = dict(
        info=info,
        cfg=cfg,
        args=vars(a),
        steps=step,
        best_step=best[2],
        train_s=train_s,
        tok_per_s=tok_count / train_s,
        train_tokens=len(stream),
        seen_tokens=tok_count,
        held=held,
        held_n=held_n,
        train_loss=tr,
        curve=curve,
        sample=sample,
        chat=len(chat),
    )
    save_folder(a.out, sd, tok, cfg, parts, stats, model, dev, amp)
    print(f"saved {a.out} in {time.time() - t0:.0f}s total", flush=True)


def save_folder(out, sd, tok, cfg, parts, st, model, dev, amp) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    _dump(os.path.join(out, "config.json"), cfg.hf_config())
    im_end = tok.token_to_id("<|im_end|>")
    _dump(
        os.path.join(out, "generation_config.json"),
        {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": [cfg.eos_token_id, im_end],
            "pad_token_id": cfg.pad_token_id,
            "do_sample": False,
            "max_new_tokens": 128,
        },
    )
    tok.save(os.path.join(out, "tokenizer.json"))
    _dump(os.path.join(out, "tokenizer_config.json"), D.tokenizer_config(cfg.max_position_embeddings))
    _dump(
        os.path.join(out, "special_tokens_map.json"),
        {
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        },
    )
    docs = D.heldout_sample(parts["heldout"], 40_000)
    bos = cfg.bos_token_id
    w = eval_windows(encode_docs(tok, [d["text"] for d in docs]), bos, cfg.max_position_embeddings)
    s_nll, s_n = mean_nll(model, w, dev, 16, amp)
    _dump(
        os.path.join(out, "heldout_sample.json"),
        {
            "description": "whole held-out stdlib files (never trained on), for CPU perplexity tests",
            "protocol": "each document tokenized without special tokens, cut into chunks of "
            "max_position_embeddings-1 tokens, each chunk scored after <|bos|>",
            "num_tokens_scored": s_n,
            "documents": docs,
        },
    )
    _dump(
        os.path.join(out, "heldout.json"),
        {
            "corpus": st["info"],
            "split_rule": D.SPLIT_RULE,
            "max_file_bytes": D.MAX_FILE_BYTES,
            "heldout_files": [r for r, _ in parts["heldout"]],
            "val_files": [r for r, _ in parts["val"]],
            "num_train_files": len(parts["train"]),
            "bf16": {
                "heldout_nll": round(st["held"], 5),
                "heldout_ppl": round(math.exp(st["held"]), 4),
                "heldout_tokens": st["held_n"],
                "sample_nll": round(s_nll, 5),
                "sample_ppl": round(math.exp(s_nll), 4),
                "sample_tokens": s_n,
                "measured_on": str(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"),
            },
        },
    )
    _dump(
        os.path.join(out, "training.json"),
        {
            "params": model.num_params(),
            "args": st["args"],
            "steps": st["steps"],
            "best_step": st["best_step"],
            "best_val_loss": min((c["val_loss"] for c in st["curve"]), default=None),
            "train_seconds": round(st["train_s"], 1),
            "tokens_per_second": round(st["tok_per_s"]),
            "train_stream_tokens": st["train_tokens"],
            "tokens_seen": st["seen_tokens"],
            "chat_examples": st["chat"],
            "train_sample_loss": round(st["train_loss"], 5),
            "heldout_loss": round(st["held"], 5),
            "curve": st["curve"],
            "greedy_sample": PROMPT + st["sample"],
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        },
    )


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
