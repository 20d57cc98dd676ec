"""benchmarks/e2e_vllm.py: the configs it builds, what it reads from vLLM's log, and one real run
on the CPU (tiny Llama shapes, dummy weights) through vLLM with the plugin's int4 parameters."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import e2e_vllm

LOG = """(EngineCore pid=1) INFO [auto_gptq.py:357] Using MacheteLinearKernel for AutoGPTQLinearMethod
(EngineCore pid=1) INFO [model_runner.py:305] Model loading took 5.35 GiB and 3.1 seconds
(EngineCore pid=1) INFO [cuda.py:482] Using TRITON_ATTN attention backend out of potential backends: ['TRITON_ATTN'].
(EngineCore pid=1) INFO [kv_cache_utils.py:2177] GPU KV cache size: 1,995,440 tokens
"""


def test_parse_log_reads_vllms_own_numbers():
    facts = e2e_vllm.parse_log(LOG)
    assert facts == {"kv_cache_tokens": 1995440, "weights_gib": 5.35,
                     "linear_kernel": "MacheteLinearKernel for AutoGPTQLinearMethod", "attention_backend": "TRITON_ATTN"}


def test_profile_categories_tell_our_gemms_from_vllms():
    """Kind 40 is CUTLASS's device_kernel like vLLM's FP8 GEMM; only our epilogue functor tells them apart
    (names as the torch profiler gave them on the H100, shortened)."""
    ours = ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalIN4cute5tupleIJiiiiEEENS1_10collective13Collective"
            "MmaINS1_49MainloopSm90TmaGmmaRmemAWarpSpecializedMixedInputILi8E...NS25_I11ShiftRight4iiLS27_2EvEE...")
    vllm_fp8 = ("void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8<cutlass::float_e4m3_t, cutlass::bfloat16_t, "
                "vllm::c3x::ScaledEpilogue>::GemmKernel>(...)")
    assert e2e_vllm.kernel_category(ours) == "ostquant_int4_gemm"
    assert e2e_vllm.kernel_category("void (anonymous namespace)::gemm_dec_kernel<4, 4, 8, 4, __nv_bfloat16, 1>(...)") \
        == "ostquant_int4_gemm"
    assert e2e_vllm.kernel_category(vllm_fp8) == "dense_gemm"
    assert e2e_vllm.kernel_category("nvjet_sm90_tst_512x64_64x2_2x1_v_bz_coopB_TNN") == "dense_gemm"


def test_configs():
    q, kw = e2e_vllm.engine_args("w4a16", True, "llama3-8b")
    # without the module list vLLM looks for safetensors files to learn which layers are quantized,
    # finds none in a dummy folder and leaves every layer bf16
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and "self_attn.o_proj" in q["modules_in_block_to_quantize"][0]
    q, kw = e2e_vllm.engine_args("ostquant_w4a4kv4", True, "llama3-8b")
    assert q["quant_method"] == "ostquant" and q["act_bits"] == 4 and q["kv_bits"] == 4
    assert kw == {"quantization": "ostquant", "kv_cache_dtype": "int4_per_token_head"}
    assert e2e_vllm.engine_args("ostquant_w4a8kv4", False, "llama3-8b")[1] == {"quantization": "ostquant"}  # CPU: emulated KV4
    assert e2e_vllm.engine_args("fp8", True, "llama3-8b")[1] == {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    with pytest.raises(SystemExit, match="unknown config 'int3'"):
        e2e_vllm.engine_args("int3", True, "llama3-8b")


def test_ratios_against_the_same_run():
    rows = [{"config": "bf16", "decode": [{"batch": 64, "decode_tok_s": 100.0, "decode_steps_tok_s": 120.0}],
             "kv_cache_tokens": 10},
            {"config": "fp8", "decode": [{"batch": 64, "decode_tok_s": 150.0}], "kv_cache_tokens": 20},
            {"config": "ostquant_w4a4kv4", "decode": [{"batch": 64, "decode_tok_s": 210.0, "decode_steps_tok_s": 300.0}],
             "kv_cache_tokens": 40}]
    r = e2e_vllm.ratios(rows)["ostquant_w4a4kv4"]
    assert r["decode_vs_bf16_b64"] == pytest.approx(2.1) and r["decode_vs_fp8_b64"] == pytest.approx(1.4)
    assert r["decode_steps_vs_bf16_b64"] == pytest.approx(2.5) and "decode_steps_vs_fp8_b64" not in r  # fp8 has none
    assert r["kv_tokens_vs_fp8"] == pytest.approx(2.0)
    assert [x["config"] for x in e2e_vllm.flat_rows(rows)] == ["bf16", "fp8", "ostquant_w4a4kv4"]


def test_cpu_run_with_dummy_int4_weights(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "e2e.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "benchmarks.e2e_vllm", "--shape", "tiny", "--configs", "bf16,ostquant_w4a4kv4",
           "--batches", "1,2", "--input-len", "16", "--output-len", "8", "--prefill-len", "64", "--repeats", "1",
           "--prefill-repeats", "1", "--out", str(out), "--work", str(tmp_path / "models")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert {r["config"] for r in d["configs"]} == {"bf16", "ostquant_w4a4kv4"} and not d.get("failures")
    for r in d["rows"]:
        assert r["decode_tok_s"] > 0 and r["prefill_ms_2048"] > 0 and r["kv_cache_tokens"] > 0
    for c in d["configs"]:
        for x in c["decode"]:
            assert x["decode_steps_tok_s"] > 0 and len(x["first_token_runs_s"]) == len(x["runs_tok_s"]), x
    ost = next(r for r in d["configs"] if r["config"] == "ostquant_w4a4kv4")
    # the plugin's int4 layers really ran (dummy nibbles, reference path on the CPU) with KV4 emulated
    calls = ost["ostquant_linear_calls"]
    assert calls["prepared_reference_int"] == 2 * 4 and calls["reference_int"] > 0 and calls["kv4_emulated"] > 0
    assert "decode_vs_bf16_b1" in d["ratios"]["ostquant_w4a4kv4"]
