"""The 8B shape's products at a verify's row counts: cuBLAS (as F.linear calls it, and its other
entry points) against Triton persistent GEMMs, data-parallel and stream-K.

Why: at batch 64 a chain:3 verify runs 256 rows, and its products are compute-bound. cuBLAS
takes 256x128 tiles: gate_up's 28,672 columns make 224 tiles, 1.7 waves on 132 SMs, so about
15 % of the second wave idles. Stream-K splits the k-loop of the tail tiles across SMs.

    python benchmarks/bench_verify_gemm.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SHAPES = {  # name: (N, K) of the 8B shape's products
    "qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096)}


@triton.jit
def _tile_dot(a_desc, w_desc, pm, pn, k0, k1, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(k0, k1):
        a = a_desc.load([pm * BM, kk * BK])
        w = w_desc.load([pn * BN, kk * BK])
        acc = tl.dot(a, w.T, acc)
    return acc


@triton.jit
def _gemm_dp(a_desc, w_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             PROGRAMS: tl.constexpr):
    """Persistent data-parallel: program p takes tiles p, p + PROGRAMS, ...; the M tiles of one
    weight slab are neighbours, so the weight is read from HBM about once."""
    num_m = tl.cdiv(M, BM)
    tiles = num_m * tl.cdiv(N, BN)
    ipt = tl.cdiv(K, BK)
    for tile in range(tl.program_id(0), tiles, PROGRAMS):
        pm = tile % num_m
        pn = tile // num_m
        acc = _tile_dot(a_desc, w_desc, pm, pn, 0, ipt, BM, BN, BK)
        c_desc.store([pm * BM, pn * BN], acc.to(c_desc.dtype))


@triton.jit
def _gemm_streamk(a_desc, w_desc, c_desc, ws_ptr, count_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, PROGRAMS: tl.constexpr):
    """Stream-K: the k-iterations of all tiles, flattened, in PROGRAMS equal runs. A tile split
    between programs sums its parts in an fp32 workspace; the part that completes the tile's
    k-count stores it and clears the workspace for the next call."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    tiles = num_m * tl.cdiv(N, BN)
    ipt = tl.cdiv(K, BK)
    total = tiles * ipt
    it = (pid * total) // PROGRAMS
    end = ((pid + 1) * total) // PROGRAMS
    rm = tl.arange(0, BM)[:, None]
    rn = tl.arange(0, BN)[None, :]
    while it < end:
        tile = it // ipt
        k0 = it - tile * ipt
        k1 = tl.minimum(ipt, k0 + end - it)
        pm = tile % num_m
        pn = tile // num_m
        acc = _tile_dot(a_desc, w_desc, pm, pn, k0, k1, BM, BN, BK)
        if k1 - k0 == ipt:
            c_desc.store([pm * BM, pn * BN], acc.to(c_desc.dtype))
        else:
            ws = ws_ptr + tile * BM * BN + rm * BN + rn
            tl.atomic_add(ws, acc, sem="relaxed")
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + tile, k1 - k0, sem="acq_rel") + (k1 - k0)
            if done == ipt:
                total_acc = tl.load(ws, cache_modifier=".cg")
                c_desc.store([pm * BM, pn * BN], total_acc.to(c_desc.dtype))
                tl.store(ws, tl.zeros((BM, BN), dtype=tl.float32))
                tl.store(count_ptr + tile, 0)
        it += k1 - k0


def triton_gemm(x: torch.Tensor, w: torch.Tensor, cfg: dict, out: torch.Tensor, ws: torch.Tensor,
                counts: torch.Tensor, programs: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    a_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if cfg["kind"] == "dp":
        grid = min(tiles, programs)
        _gemm_dp[(grid,)](a_desc, w_desc, c_desc, m, n, k, bm, bn, bk, grid, num_warps=cfg["warps"],
                          num_stages=cfg["stages"])
    else:
        _gemm_streamk[(programs,)](a_desc, w_desc, c_desc, ws, counts, m, n, k, bm, bn, bk, programs,
                                   num_warps=cfg["warps"], num_stages=cfg["stages"])
    return out


def time_us(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,256,320")
    ap.add_argument("--products", default="qkv,o_proj,gate_up,down,lm_head")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    configs = [dict(kind=kind, BM=bm, BN=bn, BK=64, stages=s, warps=wp)
               for kind in ("dp", "sk") for bm, bn, s, wp in ((128, 256, 3, 8), (128, 128, 4, 8), (64, 256, 4, 4))]
    rows_out = []
    for name in args.products.split(","):
        n, k = SHAPES[name]
        copies = max(1, (256 << 20) // (n * k * 2) + 1)  # rotate weights so none stays in L2
        ws_list = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            turn = [0]

            def weight():
                turn[0] = (turn[0] + 1) % copies
                return ws_list[turn[0]]

            ref = F.linear(x, ws_list[0]).float()
            flop = 2 * m * n * k
            row = {"product": name, "rows": m, "N": n, "K": k, "gflop": flop / 1e9}
            row["cublas_linear_us"] = time_us(lambda: F.linear(x, weight()))
            bias = torch.zeros(n, device=dev, dtype=torch.bfloat16)
            row["cublaslt_addmm_us"] = time_us(lambda: torch.addmm(bias, x, weight().T))
            torch.backends.cuda.preferred_blas_library("cublaslt")
            row["cublaslt_pref_us"] = time_us(lambda: F.linear(x, weight()))
            torch.backends.cuda.preferred_blas_library("cublas")
            row["cublas_pref_us"] = time_us(lambda: F.linear(x, weight()))
            torch.backends.cuda.preferred_blas_library("default")
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            for cfg in configs:
                label = f"triton_{cfg['kind']}_{cfg['BM']}x{cfg['BN']}_s{cfg['stages']}_w{cfg['warps']}"
                bm, bn = cfg["BM"], cfg["BN"]
                tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
                wsp = torch.zeros(tiles * bm * bn, device=dev, dtype=torch.float32)
                counts = torch.zeros(tiles, device=dev, dtype=torch.int32)
                try:
                    got = triton_gemm(x, ws_list[0], cfg, out, wsp, counts, sms).float()
                    err = (got - ref).abs().max().item()
                    got2 = triton_gemm(x, ws_list[0], cfg, out, wsp, counts, sms).float()
                    err = max(err, (got2 - ref).abs().max().item())
                    us = time_us(lambda: triton_gemm(x, weight(), cfg, out, wsp, counts, sms))
                    row[label + "_us"] = us
                    row[label + "_maxerr"] = err
                except Exception as e:  # a config Triton cannot build here: recorded, not fatal
                    row[label + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            best = min((v, key) for key, v in row.items() if key.endswith("_us"))
            row["best"] = best[1]
            print(f"{name:8s} rows {m:4d}: cuBLAS {row['cublas_linear_us']:8.1f} us "
                  f"({flop / row['cublas_linear_us'] / 1e6:5.0f} TFLOP/s), best {best[1]} {best[0]:8.1f} us "
                  f"({flop / best[0] / 1e6:5.0f} TFLOP/s)", flush=True)
            rows_out.append(row)
    # TunableOp: which implementations this build offers for a GEMM (on CUDA, possibly one).
    try:
        import torch.cuda.tunable as tunable
        tunable.enable(True)
        tunable.tuning_enable(True)
        tunable.set_filename(str(args.out / "tunableop.csv"))
        x = torch.randn(256, 4096, device=dev, dtype=torch.bfloat16)
        w = torch.randn(28672, 4096, device=dev, dtype=torch.bfloat16)
        F.linear(x, w)
        torch.cuda.synchronize()
        tune = {"results": str(tunable.get_results()), "validators": str(tunable.get_validators())}
        tunable.enable(False)
        tune["us_after"] = time_us(lambda: F.linear(x, w))
    except Exception as e:
        tune = {"error": f"{type(e).__name__}: {e}"}
    print("tunableop:", tune)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify-gemm.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "sms": sms, "rows": rows_out, "tunableop": tune}, indent=1))


if __name__ == "__main__":
    main()
