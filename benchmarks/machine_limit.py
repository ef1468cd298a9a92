"""The limit of this machine: sustained matrix-product FLOP/s in fp32 and bf16.

    .venv/bin/python benchmarks/machine_limit.py [--quick] [--threads N] [--seconds S] [--json F]

A (512 x n) by (n x n) product, n in 576 / 1024 / 1536 / 2048 (576 and 1536 are SmolLM2's
hidden and MLP widths), repeated for about --seconds each on the cores a stage uses (torch
threads = cores, as a stage given --cores all). The limit of a dtype is the best n's rate:
the rate the model's matmuls could reach at most here. eval_speed.py and precision.py divide
a stage's model FLOP/s by it (an MFU for CPUs: 2 x params x tokens/s for a forward pass).
It also prints the precision `train.precision: auto` and `evaluation.precision: auto` pick
here (cfs.modeling.compute_precision: bf16 where the CPU has AVX-512 BF16 or AMX).
--quick: n 64 and 128, 0.05 s each.
"""

from __future__ import annotations

import argparse
import time

from _common import quick_mode, quiet, report, set_threads, table, wait_for_quiet

SIZES = (576, 1024, 1536, 2048)
ROWS = 512


def matmul_rate(n: int, dtype, seconds: float) -> float:
    """FLOP/s of a (ROWS x n) @ (n x n) product: the best of 5 timed slices of `seconds` / 5
    (one slice of one product where a single product takes longer than that, as bf16 does
    on a CPU without native bf16 instructions)."""
    import torch

    a = torch.randn(ROWS, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(ROWS, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    once = max(time.perf_counter() - start, 1e-5)
    slices = 5 if once < seconds / 5 else 1
    reps = max(1, int(seconds / 5 / once))
    rates = [2 * ROWS * n * n / once]
    for _ in range(slices):
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        rates.append(2 * ROWS * n * n * reps / (time.perf_counter() - start))
    return max(rates)


def machine_limit(seconds: float = 2.0, sizes=SIZES) -> dict:
    """{'float32': FLOP/s, 'bfloat16': FLOP/s, 'per_size': {...}}: the best size per dtype."""
    import torch

    per_size = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        per_size[name] = {n: matmul_rate(n, dtype, seconds) for n in sizes}
    return {name: max(rates.values()) for name, rates in per_size.items()} | {"per_size": per_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes, 0.05 s each")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per size and dtype")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    threads = set_threads(args.threads)
    sizes, seconds = ((64, 128), 0.05) if args.quick else (SIZES, args.seconds)
    if args.quick:
        quick_mode()
    import torch

    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(
        f"machine limit: {ROWS} x n by n x n matmul, {threads} torch threads, "
        f"torch {torch.__version__}, CPU flags {' '.join(isa)}"
    )
    wait_for_quiet()
    limit = machine_limit(seconds, sizes)
    rows = [
        [n, *(f"{limit['per_size'][d][n] / 1e9:.0f}" for d in ("float32", "bfloat16"))]
        for n in sizes
    ]
    rows.append(["limit (best n)", *(f"**{limit[d] / 1e9:.0f}**" for d in ("float32", "bfloat16"))])
    print(table(rows, ["n", "fp32 GFLOP/s", "bf16 GFLOP/s"]))
    from cfs.modeling import compute_precision

    auto = compute_precision("auto", "cpu")
    print(f"bf16 / fp32: {limit['bfloat16'] / limit['float32']:.2f}x; precision auto here: {auto}")
    report(
        "machine_limit",
        {"threads": threads, "quick": args.quick, "auto": auto, **limit},
        args.json,
    )


if __name__ == "__main__":
    main()
