"""The quantization_config as the plugin reads it; registration; the serve launcher's argv."""
import json

import pytest

pytest.importorskip("vllm")

from ostquant_vllm.format import CheckpointError, QuantFormat  # noqa: E402


def good(**kw):
    d = QuantFormat().to_dict()
    d.update(kw)
    return d


def test_register_idempotent():
    import ostquant_vllm
    from vllm.model_executor.layers import linear as L
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    ostquant_vllm.register()
    ostquant_vllm.register()
    from ostquant_vllm.config import OstQuantConfig

    assert get_quantization_config("ostquant") is OstQuantConfig
    assert QUANTIZATION_METHODS.count("ostquant") == 1
    assert L.WEIGHT_LOADER_V2_SUPPORTED.count("OstQuantLinearMethod") == 1


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, ostquant_vllm, ostquant_vllm.format, ostquant_vllm.ops; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("field,value,needle", [
    ("act_bits", 3, "act_bits=3"),
    ("weight_bits", 8, "weight_bits=8"),
    ("act_clip", 1.5, "act_clip=1.5"),
    ("kv_bits", 2, "kv_bits=2"),
    ("format_version", 2, "format_version=2"),
    ("quant_method", "gptq", "quant_method='gptq'"),
    ("online_hadamard", {"down_proj": True}, "online_hadamard"),
    ("kv_group_size", 32, "kv_group_size=32"),
    ("weight_group_size", 0, "weight_group_size=0"),
])
def test_bad_values_name_themselves(field, value, needle):
    from ostquant_vllm.config import OstQuantConfig

    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        OstQuantConfig.from_config(good(**{field: value}))


def test_unknown_field():
    from ostquant_vllm.config import OstQuantConfig

    with pytest.raises(CheckpointError, match="unknown field"):
        OstQuantConfig.from_config(good(bogus=1))


def test_kv8_refused():
    from ostquant_vllm.config import OstQuantConfig

    with pytest.raises(CheckpointError, match="kv_bits=8.*calibration-only"):
        OstQuantConfig.from_config(good(kv_bits=8))


def test_methods_and_names():
    from ostquant_vllm.config import OstQuantConfig

    qc = OstQuantConfig.from_config(good())
    assert qc.get_name() == "ostquant"
    assert qc.override_quantization_method(good(), None) == "ostquant"
    assert qc.override_quantization_method({"quant_method": "gptq"}, None) is None
    assert qc.checkpoint_names("model.layers.3.self_attn.qkv_proj") == [
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    assert qc.checkpoint_names("model.layers.3.mlp.gate_up_proj") == [
        "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    assert qc.is_ignored("lm_head", ["lm_head"])
    qc2 = OstQuantConfig.from_config(good(ignore=["lm_head", "model.layers.0.mlp.down_proj"]))
    assert qc2.is_ignored("model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj"])
    assert not qc2.is_ignored("model.layers.1.mlp.down_proj", ["model.layers.1.mlp.down_proj"])


def test_serve_argv(tmp_path):
    from ostquant_vllm.serve import build_argv

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"quantization_config": good(kv_bits=16)}))
    assert build_argv([str(ck), "--port", "1"]) == ["vllm", "serve", str(ck), "--port", "1", "--quantization",
                                                    "ostquant"]
    assert "--quantization" not in build_argv(["/nonexistent", "--port", "1"])
    assert build_argv([str(ck), "--quantization=ostquant"]).count("--quantization=ostquant") == 1
