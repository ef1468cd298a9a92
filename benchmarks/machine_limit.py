"""The limit of this machine: sustained matrix-product FLOP/s in fp32 and bf16.

A (512 x n) by (n x n) product, n in 576 / 1024 / 1536 / 2048 (576 and 1536 are SmolLM2's
hidden and MLP widths), timed by torch.utils.benchmark for about --seconds each on the
threads a stage uses (one per core, as a stage given --cores all). A dtype's limit is its
best n's best block: the most the model's matrix products could reach here. eval_speed.py
and precision.py divide a stage's matrix-product FLOP/s by it. It also prints the precision
`train.precision: auto` and `evaluation.precision: auto` pick here (bf16 where the CPU has
AVX-512 BF16 or AMX). --quick: n 64 and 128, 0.05 s each.
"""

from __future__ import annotations

from pathlib import Path

from _common import arguments, report, setup, table, timed

SIZES = (576, 1024, 1536, 2048)
ROWS = 512


def machine_limit(seconds: float = 2.0, quick: bool = False) -> dict:
    """{'float32': FLOP/s, 'bfloat16': FLOP/s, 'per_size': {dtype: {n: FLOP/s}}}."""
    import torch
    from torch.utils.benchmark import Timer

    sizes, seconds = ((64, 128), 0.05) if quick else (SIZES, seconds)
    threads = torch.get_num_threads()  # torch.utils.benchmark's default is one
    per_size = {}
    for name in ("float32", "bfloat16"):
        dtype, per_size[name] = getattr(torch, name), {}
        for n in sizes:
            a, b = torch.randn(ROWS, n).to(dtype), torch.randn(n, n).to(dtype)
            operands = {"mm": torch.mm, "a": a, "b": b, "out": torch.empty(ROWS, n, dtype=dtype)}
            timer = Timer("mm(a, b, out=out)", globals=operands, num_threads=threads)
            best = min(timer.blocked_autorange(min_run_time=seconds).times)
            per_size[name][n] = 2 * ROWS * n * n / best
    return {name: max(rates.values()) for name, rates in per_size.items()} | {"per_size": per_size}


def main() -> None:
    parser = arguments(__doc__, "--threads")
    parser.add_argument("--seconds", type=float, default=2.0, help="per size and dtype")
    args = parser.parse_args()
    threads = setup(args)
    from cfs.modeling import compute_precision

    flags = Path("/proc/cpuinfo").read_text()
    isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {flag}" in flags]
    print(f"{ROWS} x n by n x n matmul, {threads} torch threads, CPU flags {' '.join(isa)}")
    limit = timed(lambda: machine_limit(args.seconds, args.quick))
    dtypes = ("float32", "bfloat16")
    rows = [
        [n, *(f"{limit['per_size'][d][n] / 1e9:.0f}" for d in dtypes)]
        for n in limit["per_size"]["float32"]
    ]
    rows.append(["limit (best n)", *(f"**{limit[d] / 1e9:.0f}**" for d in dtypes)])
    print(table(rows, ["n", "fp32 GFLOP/s", "bf16 GFLOP/s"]))
    auto = compute_precision("auto", "cpu")
    print(f"bf16 / fp32: {limit['bfloat16'] / limit['float32']:.2f}x; precision auto here: {auto}")
    report("machine_limit", {"threads": threads, "auto": auto, **limit}, args.json)


if __name__ == "__main__":
    main()
