"""Offline sm_90 compile of the Gluon GEMM kernels (quant_gemm_wg / quant_gemm_ws) and of plain
Triton kernels on a machine without a GPU: Triton's bundled ptxas and nvdisasm give the SASS that
the tests inspect.

The compile runs in a fresh Python process: after the interpreter-mode kernel tests of the same
pytest run (TRITON_INTERPRET=1), Triton's code generator no longer wraps the kernel arguments
(``'block_argument' object has no attribute 'dtype'`` on the first use of M), so an in-process
compile passed or failed depending on the test order and on Triton's on-disk cache."""

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch


def nvdisasm() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def sm90_sass(kernel, consts: dict, bm: int, bn: int, bk: int, bits: int, options: dict) -> list[str]:
    """SASS instructions of ``kernel`` (signature x_desc, w_desc, t_desc, y_ptr, ws_ptr, lock_ptr, M,
    N, K, G, stride_ym, k_per_split, n_iters, split_k, then the constexprs in ``consts``) compiled
    for sm_90 with x tiles [bm, bk], word tiles [bk * bits / 32, bn], in a fresh process."""
    job = dict(module=kernel.fn.__module__, name=kernel.fn.__name__, consts=consts, bm=bm, bn=bn, bk=bk,
               bits=bits, options=options)
    env = dict(os.environ, TRITON_INTERPRET="0")  # "0", not unset: anybit.kernels sets 1 when there is no GPU
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(job)], capture_output=True,
                         text=True, env=env, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"offline sm_90 compile failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def sm90_sass_ptrs(kernel, consts: dict, ptr_types: dict, options: dict) -> list[str]:
    """As ``sm90_sass`` for a kernel of plain pointers (``ptr_types``: name -> "*bf16", ...) and
    i32 scalars; pointers, N, K, G, strides and k_per_split are assumed 16-aligned. Gluon kernels;
    ``options["plain_triton"] = True`` for a ``@triton.jit`` kernel."""
    return sm90_sass(kernel, consts, 0, 0, 0, 0, dict(options, ptr_types=ptr_types))


def _compile_here(kernel, consts: dict, bm: int, bn: int, bk: int, bits: int, options: dict) -> list[str]:
    """The compile itself (in the child process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    ptr_types = options.pop("ptr_types", None)
    plain = options.pop("plain_triton", False)
    names = list(kernel.arg_names)
    # constexpr parameters left out take their defaults (else they would compile as i32 run-time arguments,
    # and a branch on one would keep both sides)
    consts = dict(consts)
    for p in kernel.params:
        if p.is_constexpr and p.name not in consts and p.default is not inspect.Parameter.empty:
            consts[p.name] = p.default
    if ptr_types:
        sig = {n: ptr_types.get(n, "i32") for n in names}
        for n, spec in ptr_types.items():  # "desc:int32:ROWSxCOLS:BROWSxBCOLS[:SWIZZLE]": a 2D TMA descriptor
            if spec.startswith("desc:"):
                _, dt, shape, block, *swz = spec.split(":")
                shape, block = [int(v) for v in shape.split("x")], [int(v) for v in block.split("x")]
                base = torch.empty(shape, dtype=getattr(torch, dt))
                layout = (gl.NVMMASharedLayout(int(swz[0]), base.element_size() * 8, 2) if swz else
                          gl.NVMMASharedLayout.get_default_for(block, getattr(gl, dt)))
                sig[n] = mangle_type(TensorDescriptor(base, shape, [shape[1], 1], block, layout))
        sig.update({c: "constexpr" for c in consts})
        aligned = [n for n in names if (n in ptr_types and not ptr_types[n].startswith("desc:"))
                   or n in ("N", "K", "G", "k_per_split") or n.startswith("stride")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        if plain:
            from triton.compiler import ASTSource
            src = ASTSource(kernel, sig, consts, attrs)
        else:
            src = GluonASTSource(kernel, sig, consts, attrs)
        return _sass_of(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options))
    from anybit.quant.format import SLICES
    x = torch.empty(64, 4096, dtype=torch.bfloat16)
    q = torch.empty(4096 * bits // 32, 1024, dtype=torch.int32)
    t = torch.empty(64, 1024, dtype=torch.int32)
    y = torch.empty(64, 1024, dtype=torch.bfloat16)
    flat = gl.NVMMASharedLayout(0, 32, rank=2)
    # one word descriptor per slice (w_desc, w1_desc, w2_desc: kernels of sliced widths; the single-slice
    # kernels take w_desc of the whole width)
    widths = SLICES[bits] if "w1_desc" in names else (bits,)
    wd = [TensorDescriptor(q, list(q.shape), [1024, 1], [bk * w // 32, bn], flat) for w in widths]
    wd += wd[:1] * (3 - len(wd))
    descs = {"x_desc": TensorDescriptor(x, [64, 4096], [4096, 1], [bm, bk],
                                        gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)),
             "w_desc": wd[0], "w1_desc": wd[1], "w2_desc": wd[2],
             "t_desc": TensorDescriptor(t, [64, 1024], [1024, 1], [1, bn], flat),
             "y_desc": TensorDescriptor(y, [64, 1024], [1024, 1], [bm, bn],
                                        gl.NVMMASharedLayout.get_default_for([bm, bn], gl.bfloat16))}
    sig = {n: mangle_type(d) for n, d in descs.items() if n in names}
    sig.update({"y_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                "G": "i32", "stride_ym": "i32", "k_per_split": "i32", "n_iters": "i32", "split_k": "i32",
                "total": "i32", "base": "i32", "off1": "i32", "off2": "i32"})
    sig.update({c: "constexpr" for c in consts})
    sig = {n: sig[n] for n in names}
    aligned = ("y_ptr", "ws_ptr", "lock_ptr", "N", "K", "G", "stride_ym", "k_per_split")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    compiled = triton.compile(GluonASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    return _sass_of(compiled)


def _sass_of(compiled) -> list[str]:
    """SASS instruction texts of a compiled kernel (nvdisasm of its cubin), with a line ``// label
    .L_x_N`` where a branch target starts, then one line ``// shared BYTES`` (the kernel's shared
    memory: ``shared_bytes`` reads it)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = [m.group(2) if m.group(2) is not None else f"// label {m.group(1)}"
             for m in re.finditer(r"^(\.L_x_\d+):|/\*[0-9a-f]{4,}\*/\s*(.*?);", sass, re.M)]
    return lines + [f"// shared {compiled.metadata.shared}"]


def loop_bodies(lines: list[str]) -> list[list[str]]:
    """The instructions of each loop: from a label to a later branch back to it (inclusive)."""
    where = {s.split()[-1]: i for i, s in enumerate(lines) if s.startswith("// label ")}
    loops = []
    for i, s in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", s)
        if m and where.get(m.group(1), len(lines)) < i:
            loops.append(lines[where[m.group(1)] + 1:i + 1])
    return loops


def wgmma_register_a_hazards(body: list[str]) -> list[str]:
    """Instructions of a loop body that write a register which an HGMMA still in flight reads as its
    A operand (``HGMMA.64xNx16 Racc, Ra, gdesc``: Ra..Ra+3). Groups end at the HGMMA marked
    ``gsb0``; ``WARPGROUP.DEPBAR.LE gsb0, k`` leaves the last k groups in flight. The body is
    walked twice, so groups left in flight at the branch back are in flight at the top."""
    groups: list[set] = []
    current: set = set()
    hazards = []
    for s in body + body:
        t = s.split()
        if not t or s.startswith("//"):
            continue
        op, args = (t[1], t[2:]) if t[0].startswith("@") else (t[0], t[1:])
        if op.startswith("HGMMA"):
            if len(args) > 1 and re.fullmatch(r"R\d+,", args[1]):
                base = int(args[1][1:-1])
                current |= set(range(base, base + 4))
            if "gsb0" in s:
                groups.append(current)
                current = set()
            continue
        if op.startswith("WARPGROUP.DEPBAR.LE"):
            keep = int(args[-1], 0)
            groups = groups[len(groups) - keep:] if keep else []
            continue
        in_flight = set().union(*groups) if groups else set()
        m = re.match(r"R(\d+)", args[0]) if args else None
        if m and in_flight and not op.startswith(("ST", "RED", "ATOM", "BRA", "SYNCS", "BAR")):
            width = 4 if ".128" in op else 2 if ".64" in op else 1
            if set(range(int(m.group(1)), int(m.group(1)) + width)) & in_flight:
                hazards.append(s)
    return hazards


def shared_bytes(lines: list[str]) -> int:
    """The shared memory of the kernel whose SASS lines (from ``sm90_sass``) these are."""
    return int(next(s for s in lines if s.startswith("// shared ")).split()[-1])


if __name__ == "__main__":  # child process: argv[1] = the job as JSON, prints the SASS lines as JSON
    job = json.loads(sys.argv[1])
    kern = getattr(importlib.import_module(job["module"]), job["name"])
    print(json.dumps(_compile_here(kern, job["consts"], job["bm"], job["bn"], job["bk"], job["bits"],
                                   job["options"])))
