"""The int8 mma.sync rate of this GPU, without memory traffic (csrc: probe_mma_kernel).

Session 16 found that neither more warps a scheduler (kind 37) nor fewer L2 bytes (kinds 33/34) speed up
the 64-token decode GEMMs, which run at ~376 int8 TOP/s (8B down: 7.5 GOP in 20 us). If mma.sync itself
tops out near that on Hopper, the decode kernels are bound by their tensor math and only wgmma can go
faster at 64 tokens; if it runs well above, the limit is elsewhere. Rows: with and without the decode
kernels' widening work, over warps a CTA and CTAs an SM.

    python3 benchmarks/mma_probe.py [--out FILE]      (needs the built kernel library and a GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ostquant_vllm import kernels  # noqa: E402
from ostquant_vllm.kernels import _lib  # noqa: E402

MACS = 16 * 8 * 32  # one m16n8k32


def time_us(fn, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=4096, help="rounds of 8 mma a warp")
    ap.add_argument("--out", help="JSON file for the rows")
    args = ap.parse_args(argv)
    lib = _lib.load()
    if lib is None:
        sys.exit(f"kernel library: {_lib.load_error()}")
    dev = torch.device("cuda", 0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    sink = torch.zeros(1, dtype=torch.int32, device=dev)
    rows = []
    for widen in (0, 1):
        for warps in (4, 8, 16):
            for per_sm in (1, 2, 4):
                if warps * per_sm > 64:
                    continue
                blocks = sms * per_sm
                us = time_us(lambda: _lib.check(lib.ostq_probe_mma(widen, blocks, warps * 32, args.iters,
                                                                   kernels._ptr(sink), kernels._stream(dev)),
                                                "mma probe"))
                tops = blocks * warps * args.iters * 8 * MACS * 2 / us / 1e6
                rows.append({"widen": widen, "warps_per_cta": warps, "ctas_per_sm": per_sm, "us": us, "tops": tops})
                print(f"[mma] widen={widen} warps/CTA={warps:2d} CTAs/SM={per_sm}: {tops:7.1f} int8 TOP/s ({us:.1f} us)")
    res = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "sms": sms, "iters": args.iters,
           "command": "python3 benchmarks/mma_probe.py" + (f" --out {args.out}" if args.out else ""), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
