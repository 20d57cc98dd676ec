"""README tables from the committed JSON under benchmarks/results/ (never hand-written numbers).

    python -m benchmarks.make_tables            # print the tables
    python -m benchmarks.make_tables --readme   # rewrite the block between the README markers
"""
from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SETTINGS = ["w4a16", "w4a4kv16", "w4a4kv4", "w4a8kv4"]


def _fmt(x, nd=2):
    return "—" if x is None else f"{x:,.{nd}f}"


def accuracy_table(path: str) -> str:
    d = json.load(open(path))
    rows = {(r["method"], r["setting"]): r for r in d["rows"]}
    fl = rows.get(("float", "w16a16kv16"), {}).get("ppl")
    out = [f"**Perplexity, {d['model']}** ({os.path.basename(path)}; recipe `{d['recipe']}` on {d['device']}; "
           f"float {_fmt(fl)}; lower is better; — = not run yet)", "",
           "| method | " + " | ".join(SETTINGS) + " |", "| --- |" + " --- |" * len(SETTINGS)]
    for m in ("rtn", "quarot", "ostquant"):
        out.append(f"| {m} | " + " | ".join(_fmt(rows.get((m, s), {}).get("ppl")) for s in SETTINGS) + " |")
    q, o = rows.get(("quarot", "w4a4kv4")), rows.get(("ostquant", "w4a4kv4"))
    if q and o and fl:
        closed = (q["ppl"] - o["ppl"]) / (q["ppl"] - fl)
        out += ["", f"W4A4KV4: OSTQuant closes {100 * closed:.0f}% of the QuaRot-to-float gap (bar: 30%)."]
    zs = [r for r in d["rows"] if r.get("zeroshot")]
    if zs:
        tasks = list(zs[0]["zeroshot"])
        out += ["", f"**Zero-shot accuracy** (acc; first {zs[0]['zeroshot'][tasks[0]]['n']} documents of each task at most)",
                "", "| method | setting | " + " | ".join(tasks) + " | mean |", "| --- | --- |" + " --- |" * (len(tasks) + 1)]
        for r in zs:
            accs = [r["zeroshot"][t]["acc"] for t in tasks]
            out.append(f"| {r['method']} | {r['setting']} | " + " | ".join(f"{a:.3f}" for a in accs)
                       + f" | {sum(accs) / len(accs):.3f} |")
    if d.get("experiments"):
        out += [""] + [f"- experiment ({e['method']} {e['setting']}): {e['what']}: perplexity {_fmt(e['ppl'])}"
                       for e in d["experiments"]]
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{c}`" for c in d.get("commands", [])]
    return "\n".join(out)


def vllm_gpu_table(path: str) -> str:
    d = json.load(open(path))
    out = [f"**vLLM {d['vllm']} on the {d['gpu']} vs calibration's fake-quant model** ({os.path.basename(path)}; "
           f"bf16 vLLM with our kernels, fp32 reference with a bf16-rounded cache)", "",
           "| checkpoint | KV cache | linear path (calls) | token agreement | reference vs its 1e-6-perturbed self |",
           "| --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        out.append(f"| {r['checkpoint']} | {r.get('kv_cache_dtype', 'bf16')} | {r['linear_calls']} | "
                   f"{r['token_agreement']:.3f} | {r['noise_token_agreement']:.3f} |")
    out += ["", f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def kernels_table(path: str) -> str:
    d = json.load(open(path))
    gemm = [r for r in d["rows"] if r.get("kind", "gemm") == "gemm"]
    by = {}
    for r in gemm:
        by.setdefault((r["M"], r["N"], r["K"]), {})[r["kernel"]] = r
    kernels = ["ostquant_w4a4", "ostquant_w4a8", "torch_bf16", "torch_fp8", "torch_int8"]
    out = [f"**GEMM µs, {d['gpu']}** ({os.path.basename(path)}; copy bandwidth {d['hbm_copy_tbps']:.2f} TB/s; "
           f"in brackets: TB/s on int4 weight bytes)", "",
           "| M | N | K | " + " | ".join(kernels) + " |", "| --- | --- | --- |" + " --- |" * len(kernels)]
    for (M, N, K), ks in sorted(by.items(), key=lambda t: (t[0][1] * t[0][2], t[0][0])):
        if M not in (1, 16, 2048):
            continue
        cells = []
        for k in kernels:
            r = ks.get(k)
            cells.append("—" if r is None else (f"{r['us']:.1f} ({r.get('weight_tbps', 0):.2f})" if k.startswith("ostquant")
                                                else f"{r['us']:.1f}"))
        out.append(f"| {M} | {N} | {K} | " + " | ".join(cells) + " |")
    out += ["", f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def vllm_cpu_table(path: str) -> str:
    d = json.load(open(path))
    out = [f"**vLLM {d.get('vllm')} on the CPU vs calibration's fake-quant model**, {d['model']} "
           f"({os.path.basename(path)}; {d['prompts']} prompts x {d['tokens_per_prompt']} greedy tokens, float32 both sides)",
           "", "| preset | token agreement | identical sequences | reference vs its 1e-6-perturbed self |",
           "| --- | --- | --- | --- |"]
    for p, a in d.get("agreement", {}).items():
        out.append(f"| {p} | {_fmt(a['token_agreement'], 3)} | {_fmt(a['identical'], 3)} | "
                   f"{_fmt(a.get('noise_token_agreement'), 3)} |")
    out += ["", f"- server start {d.get('server_start_s')} s; tokens/s (context only, noisy): {d.get('tokens_per_s')}",
            f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def cpu_default_table(path: str) -> str:
    d = json.load(open(path))
    return "\n".join([f"**The default CPU run** ({os.path.basename(path)}; {d['machine']})", "",
                      f"- calibrate: {d['calibrate_wall_s'] / 60:.1f} min wall (bar: 15), perplexity {_fmt(d['ppl'])} "
                      f"(float {_fmt(d['ppl_float'])}; {d['eval']}); generate with vLLM: {d['generate_wall_s']:.0f} s"]
                     + [f"- command: `{c}`" for c in d["commands"]])


def all_tables() -> str:
    parts = []
    res = os.path.join(HERE, "results")
    if os.path.exists(os.path.join(res, "cpu_default_run.json")):
        parts.append(cpu_default_table(os.path.join(res, "cpu_default_run.json")))
    for p in sorted(glob.glob(os.path.join(res, "accuracy_*.json"))):
        parts.append(accuracy_table(p))
    for p in sorted(glob.glob(os.path.join(res, "vllm_cpu_*.json"))):
        parts.append(vllm_cpu_table(p))
    for p in sorted(glob.glob(os.path.join(res, "vllm_gpu_*.json"))):
        parts.append(vllm_gpu_table(p))
    for p in sorted(glob.glob(os.path.join(res, "kernels_*.json"))):
        if "run1" not in p:
            parts.append(kernels_table(p))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tables = all_tables()
    if "--readme" in argv:
        path = os.path.join(HERE, "..", "README.md")
        text = open(path).read()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        open(path, "w").write(f"{head}{BEGIN}\n{tables}\n{END}{tail}")
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
