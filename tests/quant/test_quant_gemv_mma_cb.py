"""Codebook weights (nf4 / fp4 / learned 4-bit, learned 2-bit) on the mma.sync kernel (quant_gemv_mma.py's
CB): the code table in shared memory. On CPU: the per-word PTX by emulation against the table ``_fill_lut`` /
``_fill_byte_table`` writes, and an
offline sm_90 compile (table loads in the loop, no spills, the table alone in shared memory so it sits at
offset 0). On CUDA: every variant against ref_quant_matmul, and the launcher's routes."""

import os
import re

import pytest
import torch
from sm90_sass import loop_bodies, nvdisasm, shared_bytes, sm90_sass_ptrs  # same folder

from anybit.kernels import quant_gemv_mma as mm
from anybit.kernels import quant_matmul as qm
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.format import builtin_codebook
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _bf16_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.bfloat16).view(torch.int16)[0]) & 0xFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte k of the result is byte ``sel`` nibble k & 7 of {b, a}, or with
    the nibble's bit 3 set, that byte's sign bit replicated."""
    src = a | b << 32
    out = 0
    for k in range(4):
        nib = (sel >> (4 * k)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _run_lut_asm(word: int, base: int, smem: dict, bits: int = 4, high: int = 0) -> list[int]:
    """Interprets ``_lut_asm``'s PTX (``_lut2_asm``'s with bits 2, ``_lut3_asm``'s with bits 3 and the high
    bits ``high``): prmt, shl, shr, and, mul.lo, add, lop3, ld.shared.b32 (.v2 / .v4), movs."""
    n = 32 // bits if bits != 3 else 16  # outputs: one per code; then the inputs
    ins = [word & 0xFFFFFFFF] + ([high & 0xFFFFFFFF] if bits == 3 else []) + [base]
    regs = {f"${n + i}": v for i, v in enumerate(ins)}
    out = {}
    asm = {4: mm._lut_asm, 2: mm._lut2_asm, 3: mm._lut3_asm}[bits]()
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.startswith("{"):
            halves, src = re.match(r"\{(\$\d+), (\$\d+)\}, (\w+)", args).group(1, 2), args.split(", ")[-1]
            out[halves[0]], out[halves[1]] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        if op.startswith("ld.shared.v"):  # {r0, r1, ...}, [t]: consecutive words
            dst = re.findall(r"\w+", args.split("}")[0])
            addr = regs[args.split("[")[1].strip("]")]
            for i, d in enumerate(dst):
                regs[d] = smem[addr + 4 * i]
            continue
        a = [s.strip() for s in args.split(",")]

        def val(x):
            return regs[x] if x in regs else int(x, 0)
        if op == "prmt.b32":
            regs[a[0]] = _prmt(val(a[1]), val(a[2]), int(a[3], 16))
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "shr.b32":
            regs[a[0]] = val(a[1]) >> int(a[2])
        elif op == "and.b32":
            regs[a[0]] = val(a[1]) & val(a[2])
        elif op == "mul.lo.u32":
            regs[a[0]] = (val(a[1]) * val(a[2])) & 0xFFFFFFFF
        elif op == "lop3.b32":
            x, y, z, lut = val(a[1]), val(a[2]), val(a[3]), int(a[4], 16)
            regs[a[0]] = sum(((lut >> ((x >> i & 1) << 2 | (y >> i & 1) << 1 | (z >> i & 1))) & 1) << i
                             for i in range(32))
        elif op == "shl.b32":
            regs[a[0]] = (regs[a[1]] << int(a[2])) & 0xFFFFFFFF
        elif op == "add.u32":
            regs[a[0]] = (regs[a[1]] + regs[a[2]]) & 0xFFFFFFFF
        elif op == "ld.shared.b32":
            regs[a[0]] = smem[regs[a[1].strip("[]")]]
        else:
            raise AssertionError(f"unexpected PTX: {line}")
    return [out[f"${j}"] for j in range(n)]


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "learned"])
def test_lut_ptx_gives_codebook_values_in_natural_order(fmt):
    """Output j = bf16 ``codebook[code j]`` (bits 4j..4j+3 of the word), read from the lane's copy of the
    pair table that ``_fill_lut`` writes (entry e = (codebook[e & 15], codebook[e >> 4]) at word
    32 e + lane)."""
    cb = builtin_codebook(fmt, 4)
    if cb is None:
        cb = torch.sort(torch.randn(16, generator=torch.Generator().manual_seed(1))).values
    bits = [_bf16_bits(float(v)) for v in cb]
    smem = {}
    for e in range(mm.MMA_CB_ENTRIES):
        for lane in range(mm.MMA_CB_LANES):
            smem[4 * (32 * e + lane)] = bits[e & 15] | bits[e >> 4] << 16
    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        codes = torch.randint(0, 16, (8,), generator=g).tolist() if trial else list(range(8))
        word = sum(c << (4 * j) for j, c in enumerate(codes))
        lane = trial % 32
        assert _run_lut_asm(word, 4 * lane, smem) == [bits[c] for c in codes], (trial, codes)


def test_lut2_ptx_gives_codebook_values_in_natural_order():
    """2-bit codes: output j = bf16 ``codebook[code j]`` (bits 2j..2j+1 of the word), read from the lane's
    copy (lane & 15) of the 2-bit table that ``_fill_byte_table`` writes: entry e (a byte) at int32 columns
    2 l, 2 l + 1 of row e holds the pairs (codebook[e & 3], codebook[e >> 2 & 3]) and (codebook[e >> 4 & 3],
    codebook[e >> 6])."""
    cb = torch.sort(torch.randn(4, generator=torch.Generator().manual_seed(2))).values
    bits = [_bf16_bits(float(v)) for v in cb]
    smem = {}
    for e in range(256):
        for c in range(2 * mm.MMA_CB2_COPIES):
            sh = 4 * (c & 1)
            smem[4 * (32 * e + c)] = bits[(e >> sh) & 3] | bits[(e >> (sh + 2)) & 3] << 16
    g = torch.Generator().manual_seed(8)
    for trial in range(40):
        codes = torch.randint(0, 4, (16,), generator=g).tolist() if trial else [j % 4 for j in range(16)]
        word = sum(c << (2 * j) for j, c in enumerate(codes))
        lane = trial % 32
        got = _run_lut_asm(word, 8 * (lane & 15), smem, bits=2)
        assert got == [bits[c] for c in codes], (trial, codes)


def test_lut3_ptx_gives_codebook_values_in_natural_order():
    """3-bit codes (low 2 bits in a 2-bit word, high bits in a 1-bit word's 16 bits): output j = bf16
    ``codebook[lo_j + 4 hi_j]``, read from the lane's copy (lane & 7) of the 3-bit table that
    ``_fill_byte_table`` writes: row e (a byte of low bits), int32 column 4 c + w of copy c holds the pair
    (codebook[lo_a + 4 h], codebook[lo_b + 4 h]) with h = w >> 1 and (lo_a, lo_b) the byte's codes 2 (w & 1)
    and 2 (w & 1) + 1."""
    cb = torch.sort(torch.randn(8, generator=torch.Generator().manual_seed(3))).values
    bits = [_bf16_bits(float(v)) for v in cb]
    smem = {}
    for e in range(256):
        for c in range(4 * mm.MMA_CB3_COPIES):
            h, sh = (c >> 1) & 1, 4 * (c & 1)
            smem[4 * (32 * e + c)] = bits[((e >> sh) & 3) + 4 * h] | bits[((e >> (sh + 2)) & 3) + 4 * h] << 16
    g = torch.Generator().manual_seed(9)
    for trial in range(60):
        codes = torch.randint(0, 8, (16,), generator=g).tolist() if trial else [j % 8 for j in range(16)]
        lo = sum((c & 3) << (2 * j) for j, c in enumerate(codes))
        hi = sum((c >> 2) << j for j, c in enumerate(codes)) | (trial * 0x9E370000 & 0xFFFF0000)  # junk above
        lane = trial % 32
        got = _run_lut_asm(lo, 16 * (lane & 7), smem, bits=3, high=hi)
        assert got == [bits[c] for c in codes], (trial, codes)


def test_high_bits_of_3bit_codes_sit_where_the_table_kernel_reads_them():
    """``pack_codes`` at 3 bits = a 2-bit slice (K / 16 word rows) then a 1-bit slice (K / 32 rows). The
    kernel (``_load_high_bits``) reads the high bits of 2-bit word row r of a tile at k0 from the 1-bit
    slice's row k0 / 32 + r / 2 (offset K / 32 * 2 rows), shifted right by 16 (r % 2), code j at bit j: the
    same bits ``pack_codes`` wrote. The low bits are the 2-bit word's codes at bits 2 j, as the 2-bit table
    reads them."""
    from anybit.quant.format import pack_codes

    K, N = 256, 3
    q = torch.randint(0, 8, (N, K), generator=torch.Generator().manual_seed(4))
    words = pack_codes(q, 3).to(torch.int64) & 0xFFFFFFFF  # [3 K / 32, N]
    hi_base = K // 32 * 2
    for k0 in (0, 128):  # tile starts (128-K tiles: 8 two-bit word rows)
        for r in range(8):
            for n in range(N):
                lo_word = int(words[k0 // 16 + r, n])
                hi_word = int(words[hi_base + k0 // 32 + r // 2, n]) >> (16 * (r % 2))
                for j in range(16):
                    k = k0 + 16 * r + j
                    got = ((lo_word >> (2 * j)) & 3) | ((hi_word >> j) & 1) << 2
                    assert got == int(q[n, k]), (k0, r, n, j)


def test_codebook_applicability_on_cpu():
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "nf4"))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert not mm.mma_applies(pw, 1, x) and not qm.mma_chosen(pw, 1, x)  # CPU tensors: never the Gluon path
    assert mm.MMA_CB_MAX_M == 64


def _compile_cb(bm, ks, u2, acc=False, bk=128, w0=4):
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp32",
            "y_ptr": "*fp32" if acc else "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    # w0 3: 3-bit codes as 2-bit words plus their high bits (the kernel's CB 2), 128-K tiles
    consts = dict(W0=2 if w0 == 3 else w0, BLOCK_M=bm, BLOCK_K=64 if bm > 16 and w0 != 3 else bk,
                  SPLIT=True, PDL=True, CLUSTER=1, DIAG=0, ACC=acc, KS=ks, MR=bm // ks if ks > 1 else 0,
                  U2=u2, CB=2 if w0 == 3 else 1, SA=bm > 16,
                  SUM_LOADS=mm.MMA_SUM_LOADS[bm])
    cap = {"maxnreg": mm.MMA_CB3_MAX_REGISTERS} if w0 == 3 and bm == 8 else {}  # as the launcher caps it
    lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4, **cap})
    return lines, max((b for b in loop_bodies(lines) if any(s.startswith("HMMA") for s in b)), key=len)


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bm,ks,u2,acc,bk,w0", [(8, 8, True, False, 128, 4), (8, 1, False, False, 128, 4),
                                                (16, 1, True, False, 128, 4), (8, 8, True, True, 128, 4),
                                                (8, 1, True, False, 64, 4), (32, 1, False, False, 64, 4),
                                                (64, 1, False, True, 64, 4), (8, 8, True, False, 128, 2),
                                                (8, 1, False, False, 128, 2), (16, 1, True, False, 128, 2),
                                                (32, 1, False, False, 64, 2), (8, 1, False, False, 128, 3),
                                                (8, 4, False, True, 128, 3), (16, 1, True, False, 128, 3),
                                                (32, 1, False, False, 128, 3)])
def test_sm90_compile_reads_codes_from_the_shared_table(bm, ks, u2, acc, bk, w0):
    """Per K tile (128 K; 64 from BLOCK_M 32, except with a 1-bit slice) and thread: BK / 8 words (2- and
    3-bit: BK / 16 of 2 bits), 4 table loads each (LDS; 2-bit: LDS.64; 3-bit: LDS.128; no LDSM), the tile's
    HMMA chain, no spills; the table is the kernel's only shared memory (so it sits at offset 0, where
    ``_table_base`` reads it); x needs no relabeling PRMT (a relabeling of
    register bits on both operands; 3-bit: 8 more PRMT per word make the high bits' masks). From BLOCK_M 32
    the scale is applied to the table values (one HMUL2 per pair)."""
    lines, loop = _compile_cb(bm, ks, u2, acc, bk, w0)
    tiles = 2 if u2 else 1
    words = bk // 8 if w0 == 4 else bk // 16
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert sum(o == {4: "LDS", 2: "LDS.64", 3: "LDS.128"}[w0] for o in ops) == 4 * words * tiles
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) == 2 * bk // 16 * bm // 8 * tiles
    assert sum(o == "PRMT" for o in ops) <= (4 if w0 != 3 else 12) * words * tiles + 8
    assert sum(o.startswith("HMUL2") for o in ops) == (4 * bk // 8 if bm > 16 else 0)
    assert not any(s.split()[0].startswith(("STL", "LDL", "LDSM")) for s in lines if not s.startswith("//"))
    assert shared_bytes(lines) == 4 * mm.MMA_CB_ENTRIES * mm.MMA_CB_LANES
    # the compiler counts the table dead after its store (the loads are inline PTX) and puts the epilogue's
    # scratch over it: a CTA barrier must separate the last table load from the first shared store after it
    body = [s.split()[1] if s.startswith("@") else s.split()[0] for s in lines if not s.startswith("//")]
    last_lds = max(i for i, o in enumerate(body) if o == "LDS")
    after = body[last_lds:]
    first_sts = next((i for i, o in enumerate(after) if o.startswith("STS")), None)
    if first_sts is not None:
        assert any(o.startswith("BAR") for o in after[:first_sts]), "table loads race the epilogue's stores"


def _codebook_weight(N, K, fmt, group, seed=0, bits=4):
    g = torch.Generator().manual_seed(seed)
    pw = rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, fmt))
    return pw.to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("fmt,bits", [("nf4", 4), ("fp4", 4), ("learned", 4), ("learned", 2), ("learned", 3)])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 24, 64])
@pytest.mark.parametrize("group", [64, 128, -1])
def test_codebook_matches_reference(fmt, bits, M, group):
    N, K = 384, 2048
    if bits == 3 and (group == 64 or M > 32):  # a 1-bit slice needs groups of 128 and M <= 32
        return
    pw = _codebook_weight(N, K, fmt, group, seed=M, bits=bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
    assert mm.mma_applies(pw, M, x)
    want = ref_quant_matmul(x.float(), pw)
    tol = 1e-2 * want.abs().max().item() + 1e-3
    base = None
    G, bk = (K if group == -1 else group), (64 if group == 64 else 128)
    for kw in (dict(), dict(split_k=1), dict(split_k=3), dict(unroll2=True), dict(unroll2=False, split_k=2),
               dict(unroll2=True, x_prefetch=True), dict(ks=1), dict(ks=2), dict(ks=4), dict(ks=8)):
        if kw.get("ks", 1) > 1 and not mm.ks_fits(kw["ks"], M, 8 if M <= 8 else 16, K, G, bk):
            continue
        if M > 16 and kw.get("unroll2"):  # BLOCK_M 32 / 64: no unrolled loop
            continue
        nan = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        y = mm.quant_gemv_mma(x, pw, nan, **kw)
        err = (y.float() - want).abs().max().item()
        assert err <= tol, (kw, err)
        assert torch.equal(y, mm.quant_gemv_mma(x, pw, torch.empty_like(y), **kw)), kw  # fixed sum order
        if "ks" not in kw:
            base = y if base is None else base
            assert torch.equal(y, base) or "split_k" in kw, kw  # unrolled or not: the same bits
    acc = torch.zeros(M, N, dtype=torch.float32, device="cuda")
    mm.quant_gemv_mma(x, pw, None, acc=acc, split_k=2)  # pending sums
    assert (acc - want).abs().max().item() <= tol
    assert qm.mma_chosen(pw, M, x) and qm.mma_chosen(pw, M, x, pending=True)
    assert torch.equal(quant_matmul(x, pw), quant_matmul(x, pw, path="mma"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
def test_codebook_launch_checks_the_compiled_table(monkeypatch):
    """Every codebook launch hands its compiled kernel to ``check_table_alone``, whose shared memory is the
    table alone (so the check is not skipped for want of metadata)."""
    seen = []
    monkeypatch.setattr(mm, "check_table_alone", lambda k: seen.append(k.metadata.shared))
    pw = _codebook_weight(256, 1024, "fp4", 128)
    for M in (1, 12, 40):
        x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
        mm.quant_gemv_mma(x, pw, torch.empty(M, 256, dtype=torch.bfloat16, device="cuda"))
    assert seen == [4 * mm.MMA_CB_ENTRIES * mm.MMA_CB_LANES] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
def test_codebook_routes_and_refusals():
    """Above M 64 codebooks keep the generic kernels; the TMA-ring kernel and x in shared memory refuse them;
    a table of the wrong size is not this path's."""
    from anybit.kernels.quant_gemv_tma import tma_applies
    pw = _codebook_weight(256, 1024, "nf4", 64)
    x65 = torch.randn(65, 1024, device="cuda", dtype=torch.bfloat16)
    assert not mm.mma_applies(pw, 65, x65) and not qm.mma_chosen(pw, 65, x65)
    want = ref_quant_matmul(x65.float(), pw)
    assert (quant_matmul(x65, pw).float() - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3
    assert torch.equal(quant_matmul(x65, pw), quant_matmul(x65, pw, path="dequant"))  # CB_DEQUANT_MIN_M
    x = torch.randn(12, 1024, device="cuda", dtype=torch.bfloat16)
    assert not tma_applies(pw, 12, x)
    with pytest.raises(ValueError, match="x_whole needs a uniform weight"):
        mm.quant_gemv_mma(x, pw, torch.empty(12, 256, dtype=torch.bfloat16, device="cuda"), x_whole=True)
    with pytest.raises(ValueError, match="x_slots"):
        mm.quant_gemv_mma(x, pw, torch.empty(12, 256, dtype=torch.bfloat16, device="cuda"), x_slots=3)
    pw3 = rtn_quantize(torch.randn(256, 1024, device="cuda"), QuantSpec(3, 64, "learned"))  # 8 entries
    assert not mm.mma_applies(pw3, 4, x[:4]) and not qm.mma_chosen(pw3, 4, x[:4])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("fmt,group,bits", [("nf4", 64, 4), ("learned", 128, 4), ("learned", 128, 2),
                                             ("learned", 128, 3)])
def test_gpu_engine_codebook_model_generates_what_the_generic_kernels_do(tmp_path, monkeypatch, fmt,
                                                                          group, bits):
    """A codebook-quantized model (quantized on the GPU) decoding at batch 1 and 3 (the table kernel at M = 1
    with pending sums, and at M = 3): the same greedy tokens and logprobs (within 0.1) as with the table
    kernel off (``MMA_CB_AUTO``). The table holds codebook values in bf16 and the generic kernels in float32
    (s24-5: 0.103 apart in one logprob), so the checkpoint's tables are rounded to bf16 first: what is left
    is the order of the float32 sums."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from anybit import LLM, SamplingParams
    from anybit.quant.quantize import quantize_model
    from tests.model_factory import make_tiny_model

    dense = make_tiny_model(tmp_path / "llama", hidden_size=512, intermediate_size=1024,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=128, num_layers=2,
                            dtype="bfloat16")
    model = quantize_model(dense, tmp_path / fmt, bits=bits, group_size=group, fmt=fmt, progress=False)
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        tensors = load_file(str(f))
        tables = [k for k in tensors if k.endswith("codebook")]
        assert tables
        for k in tables:
            tensors[k] = tensors[k].to(torch.bfloat16).float()
        save_file(tensors, str(f), metadata=meta)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
    texts = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys"]
    outs = {}
    for table in (False, True):
        monkeypatch.setattr(qm, "MMA_CB_AUTO", table)
        llm = LLM(str(model), dtype="bfloat16", device="cuda", kv_cache_memory=64 << 20, progress=False)
        outs[table] = [[(r.token_ids, [d[t] for t, d in zip(r.token_ids, r.logprobs, strict=True)])
                        for r in (o.outputs[0] for o in llm.generate(texts[:n], params))] for n in (1, 3)]
        del llm
    for (tok0, lp0), (tok1, lp1) in zip(sum(outs[False], []), sum(outs[True], []), strict=True):
        same = next((i for i, (a, b) in enumerate(zip(tok0, tok1, strict=True)) if a != b), len(tok0))
        last = min(same + 1, len(tok0))  # up to the first differing token, whose two choices were near-tied
        diff = max(abs(a - b) for a, b in zip(lp0[:last], lp1[:last], strict=True))
        print(f"{fmt}: {same} equal tokens, logprobs within {diff:.4f}")
        assert same >= 2 and diff < 0.1, (tok0, tok1, lp0, lp1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or mm.gluon is None, reason="needs CUDA sm_80+ and Gluon")
@pytest.mark.parametrize("fmt,bits", [("uniform", 4), ("uniform", 2), ("nf4", 4), ("learned", 2)])
@pytest.mark.parametrize("M", [1, 3, 9, 16])
def test_two_groups_of_64_per_tile(fmt, bits, M):
    """G2: 128-K tiles holding two groups of 64 (each with its zero points, scales and MMA chain) give the
    reference's result, as the 64-K tiles do; with pending sums too."""
    N, K = 384, 2048
    g = torch.Generator().manual_seed(M + bits)
    pw = rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, 64, fmt)).to("cuda")
    x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
    want = ref_quant_matmul(x.float(), pw)
    tol = 1e-2 * want.abs().max().item() + 1e-3
    for kw in (dict(two_groups=True), dict(two_groups=True, split_k=3), dict(two_groups=True, unroll2=True),
               dict(two_groups=False)):
        if kw.get("unroll2") and fmt == "uniform" and M > 8:  # BLOCK_M 16: x through the ring, no unrolling
            continue
        nan = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        y = mm.quant_gemv_mma(x, pw, nan, **kw)
        assert (y.float() - want).abs().max().item() <= tol, kw
        assert torch.equal(y, mm.quant_gemv_mma(x, pw, torch.empty_like(y), **kw)), kw
    acc = torch.zeros(M, N, dtype=torch.float32, device="cuda")
    mm.quant_gemv_mma(x, pw, None, acc=acc, two_groups=True)
    assert (acc - want).abs().max().item() <= tol
    with pytest.raises(ValueError, match="quant_gemv_mma"):  # groups of 32: not this kernel's
        mm.quant_gemv_mma(x, rtn_quantize(torch.randn(N, K), QuantSpec(bits, 32, fmt)).to("cuda"),
                          torch.empty(M, N, dtype=torch.bfloat16, device="cuda"), block_k=128)


@pytest.mark.skipif(mm.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("cb", [False, True])
def test_sm90_compile_two_groups_per_tile_split_the_chain_in_registers(cb):
    """G2 (two groups of 64 per 128-K tile, BLOCK_M 16 unrolled): the tile's MMAs split by K into two chains
    without moving data through shared memory, as many HMMA as one chain, no spills."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp32" if cb else "*fp16",
            "y_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    loops = {}
    for g2 in (False, True):
        consts = dict(W0=4, BLOCK_M=16, BLOCK_K=128, SPLIT=True, PDL=True, CLUSTER=1, DIAG=0, U2=True, G2=g2,
                      CB=cb, XP=cb, XW=0 if cb else 16)
        lines = sm90_sass_ptrs(mm._quant_gemv_mma_kernel, consts, ptrs, {"num_warps": 4})
        assert not any(s.split()[0].startswith(("STL", "LDL")) for s in lines if not s.startswith("//"))
        loop = max((b for b in loop_bodies(lines) if any(s.startswith("HMMA") for s in b)), key=len)
        loops[g2] = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop
                     if not s.startswith("//")]
    for op in ("HMMA.16816.F32.BF16", "LDS", "STS", "SHFL.IDX"):
        assert sum(o == op for o in loops[True]) == sum(o == op for o in loops[False]), op


def test_table_alone_check():
    """The launcher refuses a compiled codebook kernel whose shared memory is not the table alone."""
    from types import SimpleNamespace

    table = 4 * mm.MMA_CB_ENTRIES * mm.MMA_CB_LANES
    mm.check_table_alone(SimpleNamespace(metadata=SimpleNamespace(shared=table)))
    with pytest.raises(RuntimeError, match="table alone"):
        mm.check_table_alone(SimpleNamespace(metadata=SimpleNamespace(shared=table + 1024)))


def test_two_groups_default_rule():
    """G2 by default: uniform weights at M 2..16 up to MMA_G2_WIDE_N outputs; 4-bit codebooks at M 9..16, and
    at every M up to 16 on wider outputs (lm_head); 2-bit codebooks at every M up to 16; never with groups
    other than 64 or widths other than 2 / 4."""
    from anybit.quant.format import PackedWeight

    def packed(N, G=64, fmt="uniform", bits=4, K=256):
        q = torch.zeros(bits * K // 32, N, dtype=torch.int32)
        s = torch.ones(K // G, N, dtype=torch.float16)
        if fmt == "uniform":
            return PackedWeight(q, s, torch.zeros_like(s), bits, G, K, N)
        table = builtin_codebook(fmt, bits)
        table = torch.linspace(-1, 1, 2 ** bits) if table is None else table  # learned: any sorted table
        return PackedWeight(q, s, None, bits, G, K, N, fmt=fmt, codebook=table)

    narrow, wide = 4096, mm.MMA_G2_WIDE_N + 128
    assert [mm.g2_applies(packed(narrow), M) for M in (1, 2, 8, 9, 16, 17)] == [False, True, True, True, True,
                                                                                 False]
    assert not any(mm.g2_applies(packed(wide), M) for M in (1, 4, 16))
    assert [mm.g2_applies(packed(narrow, fmt="nf4"), M) for M in (1, 8, 9, 16)] == [False, False, True, True]
    assert all(mm.g2_applies(packed(wide, fmt="nf4"), M) for M in (1, 4, 16))
    two = packed(narrow, fmt="learned", bits=2)
    assert [mm.g2_applies(two, M) for M in (1, 8, 16, 17)] == [True, True, True, False]
    assert not mm.g2_applies(packed(narrow, G=128), 4) and not mm.g2_applies(packed(narrow, bits=8), 4)
    assert mm.g2_applies(packed(narrow, bits=2), 4) and mm.g2_applies(packed(wide))


def test_x_prefetch_default_rule():
    """x two tiles ahead (XP) for unrolled codebook calls at BLOCK_M 16 or with ks > 1; 2-bit tables with two
    groups per tile at BLOCK_M 8 (146 registers with it: 3 programs per SM) only where the grid fits that. On
    132 SMs at M = 1 with mma_config's ks and split: 6144x4096 (384 programs) keeps it, 14336x4096 (448) and
    4096x14336 (512) do not."""
    sms = 132
    assert mm.cb_x_prefetch(4, 16, 1, False, 10 ** 4, sms) and not mm.cb_x_prefetch(4, 8, 1, False, 1, sms)
    assert mm.cb_x_prefetch(4, 8, 8, True, 10 ** 4, sms) and mm.cb_x_prefetch(2, 8, 8, False, 10 ** 4, sms)
    want = {(6144, 4096): True, (14336, 4096): False, (4096, 14336): False}
    for (N, K), keep in want.items():
        bm, bk, split, ks = mm.mma_config(1, N, K, 64, sms, bits=2, g2=True)
        assert (bm, bk) == (8, 128) and ks > 1
        assert mm.cb_x_prefetch(2, bm, ks, True, mm.grid_programs(N, ks, split), sms) == keep, (N, K)
