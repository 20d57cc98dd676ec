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
        sc = d.get("seed_checks")
        if sc:
            gaps = [closed] + [(r["quarot"] - r["ostquant"]) / (r["quarot"] - fl) for r in sc["runs"]]
            out += ["", f"{sc['what']}: " + "; ".join(
                f"seed {r['seed']}: QuaRot {_fmt(r['quarot'])}, OSTQuant {_fmt(r['ostquant'])}, {100 * g:.0f}% closed"
                for r, g in zip(sc["runs"], gaps[1:])) + f". Mean over the {len(gaps)} seeds: {100 * sum(gaps) / len(gaps):.0f}%."]
    # rows, then experiments that kept their zero-shot scores (labelled with what they changed)
    zs = [r for r in d["rows"] if r.get("zeroshot")] + [
        {**e, "method": f"{e['method']} ({e['what'].split(' (')[0]})"} for e in d.get("experiments", []) if e.get("zeroshot")]
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
        graphs = "CUDA graphs" if r.get("cuda_graphs") else "eager"
        out.append(f"| {r['checkpoint']} | {r.get('kv_cache_dtype', 'bf16')} | {graphs}; {r['linear_calls'] or '—'} | "
                   f"{r['token_agreement']:.3f} | {r['noise_token_agreement']:.3f} |")
    for r in d["rows"]:
        s = r.get("vllm_serve")
        if s:
            out.append(f"- `{s['command']}`: up in {s.get('startup_s', 0):.0f} s; /v1/completions {s.get('completion_status')}"
                       f" (equal to offline greedy: {s.get('equals_offline')}), /v1/chat/completions "
                       f"{s.get('chat_status')}, streamed chat {s.get('stream_chunks')} chunks (equal to "
                       f"non-streamed: {s.get('stream_equals_chat')}){'; error: ' + s['error'] if s.get('error') else ''}")
    out += [f"- note: {n}" for n in d.get("notes", [])]
    out += [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


E2E_LABELS = {"bf16": "bf16", "fp8": "FP8 W8A8 + FP8 KV", "w4a16": "W4A16 (GPTQ config)",
              "ostquant_w4a8kv4": "ostquant W4A8KV4", "ostquant_w4a4kv4": "ostquant W4A4KV4",
              "ostquant_w4a4_fp8kv": "ostquant W4A4 + vLLM FP8 KV",
              "ostquant_w4a4kv4_vllm_attn": "ostquant W4A4KV4, vLLM's own int4 KV attention"}


def e2e_table(path: str) -> str:
    """Brackets against bf16 of the same run, or (a run without bf16, issue 7's) against the same
    W4A4 weights with vLLM's FP8 KV cache."""
    d = json.load(open(path))
    st = d["settings"]
    batches = sorted({x["batch"] for r in d["configs"] for x in r["decode"]})
    tp = d.get("tensor_parallel_size", 1)
    gpu = f"{tp} x {d['gpu']}, tensor parallel size {tp}" if tp > 1 else d["gpu"]
    out = [f"**vLLM {d['vllm']} end to end, {gpu}** ({os.path.basename(path)}; {d['shape']} shapes, dummy "
           f"weights, {st['input_len']}-token prompts, {st['output_len']} generated tokens, output tokens/s; "
           f"CUDA graphs {'on' if st['cuda_graphs'] else 'off'}; prefix caching off; ostquant's H_down in "
           f"{st.get('ostquant_hadamard_blocks', 1)} block(s); all configs in one run)", "",
           "| config | weights GiB | linear kernel | " + " | ".join(f"batch {b}" for b in batches)
           + f" | prefill {st['prefill_len']} ms | KV-cache tokens |",
           "| --- | --- | --- |" + " --- |" * (len(batches) + 2)]
    rat = d.get("ratios", {})
    names = {r["config"] for r in d["configs"]}
    base, kv_base = ("bf16", "fp8") if "bf16" in names else ("ostquant_w4a4_fp8kv", "ostquant_w4a4_fp8kv")
    for r in d["configs"]:
        dec = {x["batch"]: x["decode_tok_s"] for x in r["decode"]}
        rr = rat.get(r["config"], {})
        cells = []
        for b in batches:
            v = f"{dec[b]:,.0f}" if b in dec else "—"
            if f"decode_vs_{base}_b{b}" in rr:
                v += f" ({rr[f'decode_vs_{base}_b{b}']:.2f}x)"
            cells.append(v)
        kv = f"{r.get('kv_cache_tokens', 0):,}"
        if f"kv_tokens_vs_{kv_base}" in rr:
            kv += f" ({rr[f'kv_tokens_vs_{kv_base}']:.2f}x FP8)"
        kern = r.get("linear_kernel") or ("ours (csrc)" if r["config"].startswith("ostquant") else "vLLM default")
        out.append(f"| {E2E_LABELS.get(r['config'], r['config'])} | {_fmt(r.get('weights_gib'))} | {kern} | "
                   + " | ".join(cells) + f" | {_fmt(r.get('prefill_ms'), 1)} | {kv} |")
    out += ["", f"In brackets: against {E2E_LABELS[base]} of the same run (decode) and "
            f"{E2E_LABELS[kv_base]} (KV-cache tokens)."]
    if base == "bf16" and "fp8" in names:
        for r in d["configs"]:
            rr = rat.get(r["config"], {})
            vs = [f"batch {b} {rr[f'decode_vs_fp8_b{b}']:.2f}x" for b in batches if f"decode_vs_fp8_b{b}" in rr]
            if r["config"].startswith("ostquant") and vs:
                out.append(f"- {E2E_LABELS.get(r['config'], r['config'])} against FP8 (decode): {', '.join(vs)}")
    for r in d["configs"]:  # runs since session 16: the decode steps without the prompts' prefill
        rr = rat.get(r["config"], {})
        steps = []
        for x in r["decode"]:
            if x.get("decode_steps_tok_s"):
                vs = [f"{rr[k]:.2f}x {lab}" for lab, k in (("bf16", f"decode_steps_vs_bf16_b{x['batch']}"),
                                                           ("FP8", f"decode_steps_vs_fp8_b{x['batch']}")) if k in rr]
                steps.append(f"batch {x['batch']} {x['decode_steps_tok_s']:,.0f}" + (f" ({', '.join(vs)})" if vs else ""))
        if steps:
            out.append(f"- {E2E_LABELS.get(r['config'], r['config'])}, the decode steps alone (each run less a "
                       f"1-token run of the same batch): {'; '.join(steps)}")
    if tp > 1:
        out.append(f"- all-reduce: vLLM's custom all-reduce and NCCL; FlashInfer's all-reduce + RMSNorm fusion off for "
                   f"every config (its default backend uses NVLink multicast, which the lent machines forbid)")
    for c, p in d.get("profiles", {}).items():
        prof = p.get("profile", {})
        shares = ", ".join(f"{k} {v:.0%}" for k, v in prof.get("fraction_by_category", {}).items() if v >= 0.01)
        where = c if "batch" in c else f"{c} at batch {prof.get('batch')}"
        out.append(f"- GPU time of {where} (torch profiler): {shares}")
        if "decode_step_us" in prof:
            per = ", ".join(f"{k} {v:.0f}" for k, v in prof["decode_step_us_by_category"].items() if v >= 5)
            out.append(f"- its decode steps alone (the run minus its prefill, {prof['prefill_gpu_ms']:.1f} ms): "
                       f"{prof['decode_step_us']:.0f} µs of GPU time a step: {per}")
        if "prefill_ms_by_category" in prof:
            per = ", ".join(f"{k} {v:.1f}" for k, v in prof["prefill_ms_by_category"].items() if v >= 0.1)
            out.append(f"- its prefill ({prof['batch']} prompts, {prof['prefill_wall_ms']:.0f} ms wall under the profiler), "
                       f"ms of GPU time: {per}")
    out += [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{c}`" for c in d.get("commands", [])]
    return "\n".join(out)


MIDM_KINDS = {9: "dec_r2t32", 10: "dec_r2t64", 11: "dec_r4t32", 12: "dec_r4t64", 5: "wg5", 3: "wg3", 13: "wg13_t64",
              14: "wg14_t32", 15: "wg15_t64_n256", 16: "wg16_t32_n256", 17: "ws17_t64", 18: "ws18_t32",
              19: "ws19_t64_n256", 20: "ws20_t32_n256", 22: "wp22_t64", 23: "wp23_t32", 24: "wp24_t64_n256",
              25: "wp25_t32_n256"}
# the wgmma kinds' column labels in the 16-128-token table (tokens a tile, weight rows a CTA)
MIDM_WG_COLS = {5: "wgmma 5 (128 tokens)", 13: "13 (64, cluster)", 14: "14 (32, cluster)", 15: "15 (64, 256 rows)",
                16: "16 (32, 256 rows)", 17: "17 (13 warp-specialized)", 18: "18 (14 w.s.)", 19: "19 (15 w.s.)",
                20: "20 (16 w.s.)", 22: "22 (13 pipelined)", 23: "23 (14 p.)", 24: "24 (15 p.)", 25: "25 (16 p.)"}


def kv4_attention_table(path: str) -> str:
    d = json.load(open(path))
    sh = d["shape"]
    out = [f"**Decode attention over the KV cache, {d['gpu']}** ({os.path.basename(path)}; vLLM {d['vllm'] or '— (ours only)'}, "
           f"torch {d['torch']}; {sh['q_heads']} query / {sh['kv_heads']} KV heads of {sh['head_size']}, block "
           f"{sh['block']}; every sequence at the full context; µs per call in CUDA graphs over >= 256 MB of "
           f"caches; HBM read ceiling {d['hbm_tb_s']:.2f} TB/s measured in the same run)", "",
           "| batch | context | ours int4 µs | vLLM int4 (Triton) µs | FA3 bf16 µs | FA3 FP8 µs | ours TB/s on KV "
           "bytes | % of HBM | x vLLM int4 | x FA3 FP8 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in d["points"]:
        us = p["us"]
        out.append(f"| {p['batch']} | {p['context']} | {us['ostquant_int4']:.1f} | {_fmt(us.get('vllm_int4'), 1)} | "
                   f"{_fmt(us.get('fa3_bf16'), 1)} | {_fmt(us.get('fa3_fp8'), 1)} | {p['ostquant_tb_s']:.2f} | "
                   f"{100 * p['ostquant_frac_of_hbm']:.0f}% | {_fmt(p.get('speedup_vs_vllm_int4'))} | "
                   f"{_fmt(p.get('speedup_vs_fa3_fp8'))} |")
    errs = [p["rel_err_vs_reference"] for p in d["points"] if "rel_err_vs_reference" in p]
    if errs:
        out += ["", f"Ours against the float32 reference of the same cache (points up to 64K tokens): "
                f"||out - ref|| / ||ref|| <= {max(errs):.1e}."]
    out += [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d['command']}`"]
    return "\n".join(out)


def kv4_real_model_table(path: str) -> str:
    d = json.load(open(path))
    out = [f"**The int4 KV cache on the real default model, {d['gpu']}** ({os.path.basename(path)}; vLLM "
           f"{d['vllm']}; greedy, 32 prompts x 64 tokens; teacher-forced agreement with calibration's fake-quant "
           "model, its own 1e-6 noise floor in brackets)", "",
           "| checkpoint | attention | CUDA graphs | token agreement | identical sequences | first-token max "
           "logprob diff |", "| --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        cmp_ = r.get("kv4_kernels_vs_vllm_int4")
        runs = [("ostquant kernels", r)] + ([("vLLM int4_per_token_head", cmp_["vllm_int4_vs_calibration"])]
                                            if cmp_ else [])
        for name, x in runs:
            out.append(f"| {r['checkpoint']} | {name} | {'on' if r['cuda_graphs'] else 'off'} | "
                       f"{x['token_agreement']:.3f} ({x['noise_token_agreement']:.3f}) | "
                       f"{x['identical']:.2f} ({x['noise_identical']:.2f}) | {x['first_logprob_max_diff']:.2f} |")
        if cmp_:
            out += ["", f"Free-running greedy, ours against vLLM's path: {cmp_['identical_sequences']} of "
                    f"{cmp_['prompts']} sequences identical; first divergence at tokens {cmp_['first_divergence']}."]
    return "\n".join(out)


def kernels_midm_table(path: str) -> str:
    """Batches of 16-128 tokens: the run's automatic choice against each kernel family (the best decode kernel,
    kinds 9-12; wgmma with 128-, 64- and 32-token tiles, kinds 5, 13-16) and torch bf16 / fp8."""
    d = json.load(open(path))
    by, auto = {}, {}
    for r in d["rows"]:
        if r.get("kind") == "gemm":
            by.setdefault((r["layer"], r["M"], r["N"], r["K"]), {})[r["kernel"]] = r["us"]
            if r["kernel"] == "ostquant_w4a4":  # older runs: the kinds were added afterwards as dispatch_kinds
                old = d.get("dispatch_kinds", {}).get(f"{r['layer']},{r['M']}", "?")
                auto[(r["layer"], r["M"])] = r.get("auto_kind", old)
    f = "ostquant_w4a4_force_"
    wg = [k for k in MIDM_WG_COLS if any(f + MIDM_KINDS[k] in ks for ks in by.values())]  # the kinds this run timed
    out = [f"**Int4 GEMM at 16-128 tokens, µs, {d['gpu']}** ({os.path.basename(path)}; Llama-3-8B layers; "
           "ours = the automatic choice of the run; last columns: its speedup)", "",
           "| layer | M | ours (kind) | decode 9-12, best | " + " | ".join(MIDM_WG_COLS[k] for k in wg)
           + " | torch bf16 | torch fp8 | vs bf16 | vs fp8 |", "| --- | --- |" + " --- |" * (len(wg) + 6)]
    for (layer, M, N, K), ks in sorted(by.items(), key=lambda t: (t[0][2] * t[0][3], t[0][1])):
        if "ostquant_w4a4" not in ks:
            continue
        ours = ks["ostquant_w4a4"]
        dec = [ks[f + MIDM_KINDS[k]] for k in (9, 10, 11, 12) if f + MIDM_KINDS[k] in ks]
        cells = [_fmt(min(dec) if dec else None, 1)] + [_fmt(ks.get(f + MIDM_KINDS[k]), 1) for k in wg]
        out.append(f"| {layer} {N}x{K} | {M} | {ours:.1f} ({auto[(layer, M)]}) | "
                   + " | ".join(cells) + f" | {ks['torch_bf16']:.1f} | {ks['torch_fp8']:.1f} | "
                   f"{ks['torch_bf16'] / ours:.2f}x | {ks['torch_fp8'] / ours:.2f}x |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def _quantize_table(path: str, ms: tuple, cols: list, title: str, extra: str = "") -> str:
    """Quantize rows of a kernels JSON at token counts `ms`: µs (fraction of copy bandwidth), one column per
    (kernel, label) of `cols`."""
    d = json.load(open(path))
    by = {}
    for r in d["rows"]:
        if r.get("kind") == "quantize" and r["M"] in ms:
            by.setdefault((r["K"], r["M"]), {})[r["kernel"]] = r
    cols = [c for c in cols if any(c[0] in ks for ks in by.values())]  # the kernels this run timed
    out = [f"**{title} µs (fraction of copy bandwidth), {d['gpu']}** ({os.path.basename(path)}; "
           f"copy {d['hbm_copy_tbps']:.2f} TB/s; bar: 0.80{extra})", "",
           "| K | M | " + " | ".join(c for _, c in cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    for (K, M), ks in sorted(by.items()):
        cells = [f"{ks[k]['us']:.1f} ({ks[k]['frac_of_copy']:.2f})" if k in ks else "—" for k, _ in cols]
        out.append(f"| {K} | {M} | " + " | ".join(cells) + " |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def kernels_quant_table(path: str) -> str:
    """The activation quantizers: µs and fraction of the run's own copy bandwidth, many tokens."""
    kernels = ["ostquant_quant_a4", "ostquant_quant_a8", "ostquant_quant_a4_had", "torch_copy"]
    return _quantize_table(path, (2048, 8192), [(k, k) for k in kernels], "Activation quantize")


def kernels_hadamard_table(path: str) -> str:
    """The fused Hadamard + 4-bit quantize of down_proj's input, every kernel version, b = 1 and 8 blocks."""
    cols = [("ostquant_quant_a4_had", "H, dispatch"), ("ostquant_quant_a4_had_v3", "H, v3"),
            ("ostquant_quant_a4_had_v4", "H, v4"), ("ostquant_quant_a4_had_v4half", "H, v4 half"),
            ("ostquant_quant_a4_had_v5", "H, v5"),
            ("ostquant_quant_a4_had8", "I_8 (x) H, dispatch"), ("ostquant_quant_a4_had8_v3", "I_8 (x) H, v3"),
            ("ostquant_quant_a4_had8_v4", "I_8 (x) H, v4"), ("ostquant_quant_a4_had8_v4half", "I_8 (x) H, v4 half"),
            ("ostquant_quant_a4_had8_v4r1", "I_8 (x) H, v4 R = 1"), ("ostquant_quant_a4_had8_v5", "I_8 (x) H, v5"),
            ("ostquant_quant_a4_had8_v6", "I_8 (x) H, v6"), ("ostquant_quant_a4", "no Hadamard"), ("torch_copy", "torch copy")]
    return _quantize_table(path, (1, 64, 2048, 8192), cols, "Fused Hadamard + 4-bit quantize",
                           "; H = the full H_K, I_8 (x) H = calibration's default blocks; M = 64 is batch-64 decode")


def kernels_decode_table(path: str) -> str:
    """Decode-size GEMMs (8B layers): each decode kind with 4, 8 (and 16) warps a CTA, K over a 2-CTA cluster, 6 weight
    blocks a warp: the columns of the kinds the file's run timed."""
    d = json.load(open(path))
    by = {}
    for r in d["rows"]:
        if r.get("kind", "gemm") == "gemm":
            by.setdefault((r.get("model", "llama3-8b"), r["layer"], r["N"], r["K"], r["M"]), {})[r["kernel"]] = r
    f = "ostquant_w4a4_force_"
    cols = [("dec", "kind 7/8, 4 warps"), ("dec8w", "27/28, 8 warps"), ("dec_r4t32", "kind 11, 4 warps"),
            ("dec8w_r4t32", "31, 8 warps"), ("dec_r4t64", "kind 12, 4 warps"), ("dec8w_r4t64", "32, 8 warps"),
            ("dec_r4t64_cl2", "33 (12, 2-CTA cluster)"), ("dec8w_r4t64_cl2", "34 (32, cluster)"),
            ("dec_r6t32", "36 (11, 6 blocks a warp)"), ("dec8w_r6t32", "35 (31, 6 blocks a warp)"),
            ("dec16w_r4t32", "37 (11, 16 warps)"), ("dec8w_r6t16", "38 (35, 16 tokens a CTA)"),
            ("dec8w_r4t16", "39 (31, 16 tokens a CTA)"), ("cutlass40", "40 (CUTLASS)"),
            ("cutlass43_sk32", "43 (CUTLASS stream-K, 32 tokens)"), ("cutlass41_sk64", "41 (stream-K, 64)"),
            ("cutlass42_sk128", "42 (stream-K, 128)")]
    cols = [c for c in cols if any(f + c[0] in ks for ks in by.values())]  # the kinds this run timed
    out = [f"**Decode GEMMs by warps a CTA and weight blocks a warp, µs, {d['gpu']}** ({os.path.basename(path)}; Llama-3 layers; "
           "ours = the automatic choice at the time of the run, its kind in brackets)", "",
           "| layer N x K | M | ours (kind) | " + " | ".join(c for _, c in cols) + " | torch bf16 | torch fp8 |",
           "| --- | --- | --- |" + " --- |" * (len(cols) + 2)]
    for (model, layer, N, K, M), ks in sorted(by.items(), key=lambda t: (t[0][2] * t[0][3], t[0][4])):
        ours = ks.get("ostquant_w4a4")
        if ours is None:
            continue
        cells = [_fmt(ks[f + c]["us"], 1) if f + c in ks else "—" for c, _ in cols]
        name = layer if model == "llama3-8b" else f"{model} {layer}"
        out.append(f"| {name} {N}x{K} | {M} | {ours['us']:.1f} ({ours.get('auto_kind', '?')}) | " + " | ".join(cells)
                   + f" | {_fmt(ks.get('torch_bf16', {}).get('us'), 1)} | {_fmt(ks.get('torch_fp8', {}).get('us'), 1)} |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


# kind: (benchmarks/kernels.py's row tag, column label)
LARGEM_KINDS = {3: ("wg3", "kind 3"), 5: ("wg5", "kind 5"), 6: ("wg6", "kind 6 (pipelined)"),
                21: ("ws21", "kind 21 (warp-specialized)"), 26: ("wp26_n256", "kind 26 (6 with 256 rows)"),
                37: ("wp37_cl", "kind 37 (6, K over a cluster)"), 40: ("cutlass40", "kind 40 (CUTLASS mainloop)")}


def kernels_largem_table(path: str) -> str:
    """Large-M GEMMs (the compute-bound bar: >= 1.6x torch bf16 at M >= 2048): the dispatch of the run, each
    wgmma kind it timed, and the kind the current dispatch (kernels._auto_kind) takes, looked up in the rows."""
    from ostquant_vllm.kernels import CUTLASS_MANY_TOKENS, _auto_kind

    d = json.load(open(path))
    by = {}
    for r in d["rows"]:
        if r.get("kind", "gemm") == "gemm" and r["M"] >= 256:
            by.setdefault((r["model"], r["layer"], r["N"], r["K"], r["M"]), {})[r["kernel"]] = r
    cols = ([("ostquant_w4a4", "ours W4A4 (dispatch of the run)")]
            + [(f"ostquant_w4a4_force_{tag}", label) for tag, label in LARGEM_KINDS.values()]
            + [("torch_bf16", "torch bf16"), ("torch_fp8", "torch fp8"), ("torch_int8", "torch int8")])
    cols = [c for c in cols if any(c[0] in ks for ks in by.values())]  # the kernels this run timed

    sched = path.replace("largem", "sched")  # kind 40 from 1024 tokens: 128 x 256 tiles along the tokens
    sched = {(r["model"], r["layer"], r["M"]): r for r in json.load(open(sched))["rows"]
             if r["setting"] == "2:4:1"} if sched != path and os.path.exists(sched) else {}
    nan = float("nan")

    def now(ks, M, N, K, bf):  # the current dispatch's kind and its µs and speedup in the run that timed it
        kind = _auto_kind(M, N, K)
        if kind == 40 and M >= CUTLASS_MANY_TOKENS:  # the sched run, against its own torch bf16
            r0 = next(iter(ks.values()))
            r = sched.get((r0["model"], r0["layer"], M), {})
            return kind, r.get("us", nan), r.get("x_bf16", nan)
        run = ks.get("ostquant_w4a4", {})
        r = run if run.get("auto_kind") == kind else ks.get(f"ostquant_w4a4_force_{LARGEM_KINDS.get(kind, ('',))[0]}")
        us = r["us"] if r else nan
        return kind, us, bf / us

    out = [f"**Large-M GEMM µs, {d['gpu']}** ({os.path.basename(path)}; the dispatch now: the kind the current code "
           "takes, its µs and speedup from this run, from 1024 tokens (kind 40's automatic order and tile) from "
           f"{os.path.basename(path).replace('largem', 'sched')} against its own torch bf16; speedups over torch "
           "bf16, bar 1.6x at M >= 2048)", "",
           "| layer N x K | M | " + " | ".join(c for _, c in cols) + " | speedup, run | dispatch now | speedup, now |",
           "| --- | --- |" + " --- |" * (len(cols) + 3)]
    for (model, layer, N, K, M), ks in by.items():
        cells = [f"{ks[k]['us']:.1f}" if k in ks else "—" for k, _ in cols]
        bf = ks.get("torch_bf16", {}).get("us", nan)
        sp = bf / ks["ostquant_w4a4"]["us"] if "ostquant_w4a4" in ks else nan
        kind, us, x = now(ks, M, N, K, bf)
        out.append(f"| {model} {layer} {N}x{K} | {M} | " + " | ".join(cells)
                   + f" | {sp:.2f}x | kind {kind}, {us:.1f} | {x:.2f}x |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def kernels_sched_table(path: str) -> str:
    """Kind 40 under each scheduler order and tile shape (benchmarks/cutlass_sched.py): µs, x torch bf16."""
    d = json.load(open(path))
    by, settings = {}, []
    for r in d["rows"]:
        by.setdefault((r["model"], r["layer"], r["N"], r["K"], r["M"]), {}).setdefault(r["setting"], r)
        if r["setting"] not in settings:
            settings.append(r["setting"])
    out = [f"**Kind 40's scheduler order and tile, µs (x torch bf16), {d['gpu']}** ({os.path.basename(path)}; "
           "raster:swizzle:tile[:kind], raster 0 CUTLASS's heuristic / 1 along the weight rows / 2 along the tokens, "
           "tile 0 128 x 128, 1 128 x 256, kind 42 stream-K; the library takes 2:4:1 from 1024 tokens)", "",
           "| layer N x K | M | " + " | ".join(settings) + " |", "| --- | --- |" + " --- |" * len(settings)]
    for (model, layer, N, K, M), ks in by.items():
        out.append(f"| {model} {layer} {N}x{K} | {M} | "
                   + " | ".join(f"{ks[s]['us']:.1f} ({ks[s]['x_bf16']:.2f}x)" if s in ks else "—" for s in settings)
                   + " |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


def kernels_table(path: str) -> str:
    d = json.load(open(path))
    gemm = [r for r in d["rows"] if r.get("kind", "gemm") == "gemm"]
    by = {}
    for r in gemm:
        by.setdefault((r["M"], r["N"], r["K"]), {})[r["kernel"]] = r
    kernels = ["ostquant_w4a4", "ostquant_w4a8", "torch_bf16", "torch_fp8", "torch_int8"]
    kernels += [k for k in ("vllm_cutlass_w8a8_int8", "vllm_machete_w4a16", "vllm_cutlass_w4a8_fp8")
                if any(r["kernel"] == k for r in gemm)]  # benchmarks/kernels.py --vllm
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
    for p, a in d.get("agreement", {}).items():
        if "calibration" in a:  # a checkpoint of `ostquant calibrate` rather than the fast RTN exports
            out.append(f"- {p}: `{a.get('calibrate_command')}` (perplexity {_fmt(a['calibration']['ppl'])}, "
                       f"float {_fmt(a['calibration']['ppl_float'])}), then `{a['command']}`")
    return "\n".join(out)


def vllm_tp_table(path: str) -> str:
    d = json.load(open(path))
    out = [f"**Tensor parallelism, the default model in vLLM {d['vllm']} on {d['gpu_count']} x {d['gpu']}** "
           f"({os.path.basename(path)}; 32 prompts x 64 greedy tokens; int4 KV cache; eager; heads widened "
           f"2x by an exact transform because vLLM cannot split 9 query / 3 KV heads over 2 ranks: "
           f"tests/gpu/vllm_tp.py)", "",
           "| checkpoint | widened TP 1 = original TP 1 | TP 2 vs TP 1: same tokens | identical sequences | "
           "agreement with calibration's model, TP 1 / TP 2 (reference built for TP) | its own 1e-6 noise floor |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        q, w, t = r["quantization_config"], r.get("widened_tp1_vs_original_tp1"), r["tp2_vs_tp1"]
        runs = r["runs"]
        name = (f"QuaRot W4A{q['act_bits']}KV{q['kv_bits']}, H_down in {q['hadamard_blocks']} blocks")
        same = f"{w['identical_sequences']}/{w['prompts']} sequences" if w else "not run"
        out.append(f"| {name} | {same} | {t['same_token_fraction']:.3f} | "
                   f"{t['identical_sequences']}/{t['prompts']} | {runs['widened_tp1']['token_agreement']:.3f} / "
                   f"{runs['widened_tp2']['token_agreement']:.3f} "
                   f"({runs['widened_tp2'].get('reference_tensor_parallel_size', 1)}) | "
                   f"{runs['widened_tp2']['noise_token_agreement']:.3f} |")
    out += ["- greedy tokens are compared free-running: after the first token that differs the two runs continue from "
            "different text. How far a 4-bit checkpoint's own round-off moves its greedy choices is the noise floor "
            "(calibration's model against itself with its inputs perturbed by 1e-6, teacher-forced); TP changes "
            "o_proj's and down_proj's activation quantizer by design (each rank quantizes its slice), so a TP 2 "
            "run is judged by its agreement with calibration's model against TP 1's and that floor. In brackets: "
            "the TP degree the reference was built for (load_fake_quant_model(tensor_parallel_size=...); 1: the "
            "full-row quantizer of calibration).",
            f"- command: `{d['command']}`"]
    return "\n".join(out)


def experiment_table(path: str) -> str:
    d = json.load(open(path))
    out = [f"**Experiment** ({os.path.basename(path)}): {d['what']}", ""]
    for name, r in d["runs"].items():
        ppl = ", ".join(f"{x['method']} {_fmt(x['ppl'])}" for x in r["rows"])
        out.append(f"- {name}: perplexity {ppl} (`{r['commands'][-1]}`)")
    return "\n".join(out)


def cpu_default_table(path: str) -> str:
    d = json.load(open(path))
    return "\n".join([f"**The default CPU run** ({os.path.basename(path)}; {d['machine']})", "",
                      f"- calibrate: {d['calibrate_wall_s'] / 60:.1f} min wall (bar: 15), perplexity {_fmt(d['ppl'])} "
                      f"(float {_fmt(d['ppl_float'])}; {d['eval']}); generate with vLLM: {d['generate_wall_s']:.0f} s"]
                     + [f"- command: `{c}`" for c in d["commands"]]
                     + [f"- experiment: {e['what']}: perplexity {_fmt(e['ppl'])} (`{e['command']}`)"
                        for e in d.get("experiments", [])])


def kernels_vllm_table(path: str) -> str:
    """Ours against vLLM's own low-bit GEMMs (benchmarks/kernels.py --vllm), every layer and M of one run."""
    d = json.load(open(path))
    by = {}
    for r in d["rows"]:
        if r.get("kind", "gemm") == "gemm":
            by.setdefault((r["model"], r["layer"], r["N"], r["K"], r["M"]), {})[r["kernel"]] = r
    cols = [("vllm_cutlass_w4a8_fp8", "vLLM CUTLASS W4A8 (fp8 act.)"), ("vllm_machete_w4a16", "vLLM Machete W4A16"),
            ("vllm_cutlass_w8a8_int8", "vLLM CUTLASS W8A8 int8"), ("torch_fp8", "torch fp8"), ("torch_bf16", "torch bf16")]
    four_bit = ("vllm_cutlass_w4a8_fp8", "vllm_machete_w4a16")
    out = [f"**Ours against vLLM {d.get('vllm', '?')}'s GEMM kernels, µs, {d['gpu']}** ({os.path.basename(path)}; copy "
           f"bandwidth {d['hbm_copy_tbps']:.2f} TB/s; ours: the automatic kind in brackets, TB/s on int4 weight bytes after it; "
           "last column: the faster of vLLM's two 4-bit kernels over ours W4A4)", "",
           "| layer N x K | M | ours W4A4 (kind) | ours W4A8 | " + " | ".join(c for _, c in cols) + " | speedup |",
           "| --- | --- | --- | --- |" + " --- |" * (len(cols) + 1)]
    for (model, layer, N, K, M), ks in sorted(by.items(), key=lambda t: (t[0][0], t[0][2] * t[0][3], t[0][4])):
        ours = ks.get("ostquant_w4a4")
        if ours is None:
            continue
        w8 = ks.get("ostquant_w4a8")
        cells = [_fmt(ks[k]["us"], 1) if k in ks else "—" for k, _ in cols]
        best = min((ks[k]["us"] for k in four_bit if k in ks), default=float("nan"))
        out.append(f"| {model} {layer} {N}x{K} | {M} | {ours['us']:.1f} ({ours.get('auto_kind', '?')}; "
                   f"{ours['weight_tbps']:.2f}) | {_fmt(w8['us'] if w8 else None, 1)} | " + " | ".join(cells)
                   + f" | {best / ours['us']:.2f}x |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{c}`" for c in d.get("commands", [])]
    return "\n".join(out)


def mma_probe_table(path: str) -> str:
    d = json.load(open(path))
    ws = sorted({r["warps_per_cta"] for r in d["rows"]})
    cps = sorted({r["ctas_per_sm"] for r in d["rows"]})
    out = [f"**int8 mma.sync rate without memory traffic, TOP/s, {d['gpu']}** ({os.path.basename(path)}; m16n8k32, "
           f"8 accumulators a warp; rows: CTAs an SM x warps a CTA)", "",
           "| widening between the mma | CTAs/SM | " + " | ".join(f"{w} warps" for w in ws) + " |",
           "| --- | --- |" + " --- |" * len(ws)]
    for widen in (0, 1):
        for c in cps:
            cells = [next((f"{r['tops']:,.0f}" for r in d["rows"] if (r["widen"], r["ctas_per_sm"], r["warps_per_cta"])
                           == (widen, c, w)), "—") for w in ws]
            what = "the decode kernels' (2 widen a round of 8 mma)" if widen else "none"
            out.append(f"| {what} | {c} | " + " | ".join(cells) + " |")
    out += [""] + [f"- {n}" for n in d.get("notes", [])] + [f"- command: `{d.get('command')}`"]
    return "\n".join(out)


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
    for p in sorted(glob.glob(os.path.join(res, "experiment_*.json"))):
        parts.append(experiment_table(p))
    for p in sorted(glob.glob(os.path.join(res, "vllm_tp_*.json"))):
        parts.append(vllm_tp_table(p))
    for p in sorted(glob.glob(os.path.join(res, "e2e_vllm_*.json"))):
        parts.append(e2e_table(p))
    for name in ("kv4_attention_h100.json",):
        if os.path.exists(os.path.join(res, name)):
            parts.append(kv4_attention_table(os.path.join(res, name)))
    if os.path.exists(os.path.join(res, "kv4_real_model_h100.json")):
        parts.append(kv4_real_model_table(os.path.join(res, "kv4_real_model_h100.json")))
    for p in sorted(glob.glob(os.path.join(res, "mma_probe_*.json"))):
        parts.append(mma_probe_table(p))
    for p in sorted(glob.glob(os.path.join(res, "kernels_*.json"))):
        if "vllm" in p:
            parts.append(kernels_vllm_table(p))
        elif "midm" in p:
            parts.append(kernels_midm_table(p))
        elif "decode" in p:
            parts.append(kernels_decode_table(p))
        elif "largem" in p:
            parts.append(kernels_largem_table(p))
        elif "sched" in p:
            parts.append(kernels_sched_table(p))
        elif "quant" in p:
            parts.append(kernels_quant_table(p))
        elif "hadamard" in p:
            parts.append(kernels_hadamard_table(p))
        elif "run1" not in p:
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
