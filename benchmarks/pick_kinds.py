"""An OSTQUANT_KIND_MAP from a kernels.py result: per layer shape, the automatic kind at the given token
counts replaced by the fastest CUTLASS kind (40-43) where that is at least `--gain` faster (a measurement
setting for an end-to-end A/B in the same device session, e.g. PART=tuned of tests/gpu/run_session17.sh).

    python3 benchmarks/pick_kinds.py /tmp/kernels_dispatch.json --ms 64,16 [--gain 0.05]

Earlier token counts in --ms win where two want different kinds for one (kind, shape). Kind 40 itself is
never remapped (it also runs the prefill's large M).
"""
from __future__ import annotations

import argparse
import json


def pick(rows, ms, gain):
    auto = {(r["M"], r["N"], r["K"]): r for r in rows if r["kernel"] == "ostquant_w4a4" and "auto_kind" in r}
    out = {}
    for m in ms:
        for (mm, n, k), r in auto.items():
            if mm != m or r["auto_kind"] == 40:
                continue
            alts = [x for x in rows if x["M"] == m and x["N"] == n and x["K"] == k
                    and x["kernel"].startswith("ostquant_w4a4_force_cutlass")]
            if not alts:
                continue
            best = min(alts, key=lambda x: x["us"])
            key = f"{r['auto_kind']}@{n}x{k}"
            if best["us"] < (1 - gain) * r["us"] and key not in out:
                out[key] = int(best["kernel"].split("cutlass")[1].split("_")[0])
    return ",".join(f"{k}:{v}" for k, v in out.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result")
    ap.add_argument("--ms", default="64,16")
    ap.add_argument("--gain", type=float, default=0.05)
    args = ap.parse_args()
    rows = json.load(open(args.result))["rows"]
    print(pick(rows, [int(m) for m in args.ms.split(",")], args.gain))


if __name__ == "__main__":
    main()
