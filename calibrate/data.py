"""Token windows: held-out evaluation text (wiki) and calibration text (c4 by default), never overlapping:
calibrating on the evaluation text itself (as the official code does with WikiText-2's train split)
draws only from the tokens after the evaluation windows."""
from __future__ import annotations

import torch

from .assets import read_documents


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """All documents of a text joined by blank lines, tokenized once (no special tokens)."""
    docs = read_documents(text)
    return torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"], dtype=torch.long)


def eval_windows(tokenizer, text: str = "wiki", seqlen: int = 1024, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seqlen] from the start of the text (perplexity protocol)."""
    ids = token_stream(tokenizer, text)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text {text!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calib_windows(tokenizer, text: str = "c4", seqlen: int = 512, n: int = 32, seed: int = 0,
                  skip_tokens: int = 0) -> torch.Tensor:
    """n random windows [n, seqlen] of the calibration text after its first `skip_tokens` tokens
    (the held-out part when it is also the evaluation text), reproducible from the seed."""
    ids = token_stream(tokenizer, text)[skip_tokens:]
    if ids.numel() <= seqlen:
        raise ValueError(f"text {text!r} has {ids.numel()} tokens after the {skip_tokens} held out for evaluation, "
                         f"too few for calibration windows of {seqlen}: evaluate on fewer windows or calibrate on c4")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
