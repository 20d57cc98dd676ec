"""A post-grad graph pass: the op before an ostquant linear's quantizer joins it in one kernel.

Our linears quantize their input with the opaque custom op `ostquant.quantize_act`, after a kernel Inductor wrote
for what comes before: two kernels where one would do, the second (a few KB a token) all latency. vLLM (0.26-0.33)
lets a plugin add one post-grad pass; it runs before vLLM lowers its IR ops. This one rewrites

    RMSNorm -> [no-op views] -> quantize_act(hadamard=0)   into  ostquant.rms_norm_quant      (q/k/v, gate/up inputs)
      (vLLM's IR ops vllm_ir.rms_norm / fused_add_rms_norm, whatever implementation vLLM would lower them to)
    SiluAndMul -> [views] -> quantize_act(hadamard=b)      into  ostquant.silu_mul_quantize_act  (down_proj input)
      (its native form: mul(silu(x[..., :d]), x[..., d:]); only where the CUDA kernel takes the shape)

where the first op's output feeds nothing else. The fused kernels compute the first op as vLLM's native code does
(an ulp of a rsqrt or an exp may differ from Inductor's) and quantize bit-exactly what they computed.
OSTQUANT_FUSE_NORM=0 turns the first off, OSTQUANT_FUSE_SILU=1 the second on.
"""
from __future__ import annotations

import logging
import operator
import os

import torch

from . import ops

logger = logging.getLogger("vllm.ostquant")  # under vLLM's logger: its handler, level and format

# H100, session 24 (benchmarks/NOTES_kernels.md): the norm's fusion is on by default (8B qkv chain at 64 tokens
# 15.3 -> 13.6 us; batch 64 end to end +2.5-6.6 %); the SiluAndMul one is a setting, off: its kernel is slower than
# the two it replaces (the down chain at 64 tokens 26.3 -> 29.8 us: the gated row was computed serially in the load;
# rebuilt after that measurement with both halves through cp.async and fast silu math, not yet timed).
FUSE_NORM = os.environ.get("OSTQUANT_FUSE_NORM", "1") not in ("", "0")
FUSE_SILU = os.environ.get("OSTQUANT_FUSE_SILU", "0") not in ("", "0")

_QUANT = "ostquant.quantize_act.default"
_RMS = "vllm_ir.rms_norm.default"                    # (x, weight, epsilon, variance_size=None)
_ADD_RMS = "vllm_ir.fused_add_rms_norm.default"      # (x, x_residual, weight, epsilon, variance_size=None)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _norm_args(norm: torch.fx.Node):
    """(x, residual | None, weight | None, eps) of a norm node, or None when it is not one this pass takes."""
    names = ("x", "weight", "epsilon", "variance_size") if str(norm.target) == _RMS else \
        ("x", "x_residual", "weight", "epsilon", "variance_size")
    a = dict(zip(names, norm.args))
    a.update(norm.kwargs)
    if a.get("variance_size") is not None or "epsilon" not in a:
        return None
    return a["x"], a.get("x_residual"), a["weight"], float(a["epsilon"])


def _producer(q: torch.fx.Node):
    """(the node that feeds quantize_act node q through no-op views, those views), or None unless q is a plain
    positional call whose outputs are read only by getitems (what the rewrites replace)."""
    if len(q.args) != 5 or q.kwargs or any(u.target is not operator.getitem for u in q.users):
        return None
    src, views = q.args[0], []
    while src.op == "call_function" and src.target in _VIEWS and len(src.users) == 1:
        views.append(src)
        src = src.args[0]
    return src, views


def _match(q: torch.fx.Node):
    """For a quantize_act node: (norm node, its output node, the views between, norm args) or None."""
    p = _producer(q)
    if p is None or q.args[4]:  # the Hadamard quantizer has its own kernel
        return None
    src, views = p
    if len(src.users) != 1 or src.op != "call_function":
        return None
    if str(src.target) == _RMS:
        norm = src
    elif (src.target is operator.getitem and src.args[1] == 0 and isinstance(src.args[0], torch.fx.Node)
          and str(src.args[0].target) == _ADD_RMS):
        norm = src.args[0]
    else:
        return None
    args = _norm_args(norm)
    if args is None:
        return None
    x, res, w = args[:3]
    vx, vq, vs = _val(x), _val(q.args[0]), _val(src)
    if vx is None or vq is None or vs is None or vx.dtype != torch.bfloat16 or tuple(vq.shape) != tuple(vs.shape):
        return None
    if any(t is not None and (_val(t) is None or _val(t).dtype != torch.bfloat16) for t in (res, w)):
        return None
    if src is not norm and any(u is not src and not (u.target is operator.getitem and u.args[1] == 1)
                               for u in norm.users):
        return None  # the norm's output read elsewhere too (the residual, output 1, moves to the fused op)
    return norm, src, views, args


def _fake_val(node: torch.fx.Node, args, outs) -> None:
    """node.meta["val"] (and its getitems') from the op's fake implementation, as Inductor expects."""
    fake = torch._guards.detect_fake_mode([_val(a) for a in args if isinstance(a, torch.fx.Node)])
    if fake is None:
        return
    with fake:
        val = node.target(*[_val(a) if isinstance(a, torch.fx.Node) else a for a in args])
    node.meta["val"] = val
    for i, o in enumerate(outs):
        o.meta["val"] = val[i]


def _replace_quant_outputs(graph: torch.fx.Graph, q: torch.fx.Node, outs) -> None:
    for u in list(q.users):  # getitems of (q, scale, zero)
        u.replace_all_uses_with(outs[u.args[1]])
        graph.erase_node(u)
    graph.erase_node(q)


def _quant_nodes(graph: torch.fx.Graph) -> list:
    return [q for q in graph.nodes if q.op == "call_function" and str(q.target) == _QUANT]


def fuse_norm_quant(graph: torch.fx.Graph) -> int:
    """Rewrite every norm -> quantize_act pair of `graph` (see the module doc); returns how many."""
    op = torch.ops.ostquant.rms_norm_quant.default
    done = 0
    for q in _quant_nodes(graph):
        m = _match(q)
        if m is None:
            continue
        norm, src, views, (x, res, w, eps) = m
        args = (x, res, w, eps, *q.args[1:4])
        with graph.inserting_after(norm):  # every input is defined before the norm
            fused = graph.call_function(op, args)
        with graph.inserting_after(fused):
            outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(4)]
        _fake_val(fused, args, outs)
        _replace_quant_outputs(graph, q, outs)
        for v in views:
            graph.erase_node(v)
        if src is not norm:                          # fused_add_rms_norm: its residual output is ours now
            graph.erase_node(src)
            for u in list(norm.users):
                u.replace_all_uses_with(outs[3])
                graph.erase_node(u)
        graph.erase_node(norm)
        done += 1
    if done:
        ops.CALLS["fused_rms_norm_quant"] += done  # at compile time: the proof that the rewrite happened
        logger.debug("ostquant: %d RMSNorm + quantize pairs fused into one kernel each", done)
    return done


def _slice_of(n, x: torch.fx.Node):
    """(start, stop) when n is x[..., start:stop] on x's last dim with step 1 and one user, else None."""
    if not (isinstance(n, torch.fx.Node) and n.target is torch.ops.aten.slice.Tensor and n.args[0] is x
            and not n.kwargs and len(n.users) == 1):
        return None
    dim, lo, hi, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    nd = _val(x).dim()
    return (lo or 0, hi) if dim % nd == nd - 1 and step == 1 else None


def _match_silu(q: torch.fx.Node):
    """For a Hadamard quantize_act node fed by vLLM's native SiluAndMul: (x, the nodes to drop) or None."""
    from . import kernels

    p = _producer(q)
    if p is None or not q.args[4]:
        return None
    src, dead = p
    if src.op != "call_function" or src.target is not torch.ops.aten.mul.Tensor or len(src.users) != 1:
        return None
    a, b = src.args[:2]
    silu, up = (a, b) if getattr(a, "target", None) is torch.ops.aten.silu.default else (b, a)
    if getattr(silu, "target", None) is not torch.ops.aten.silu.default or len(silu.users) != 1:
        return None
    gate = silu.args[0]
    x = gate.args[0] if isinstance(gate, torch.fx.Node) and gate.args else None
    vx, vq = _val(x), _val(q.args[0])
    if vx is None or vq is None or vx.dtype != torch.bfloat16 or vx.shape[-1] % 2:
        return None
    d = vx.shape[-1] // 2
    gs, us = _slice_of(gate, x), _slice_of(up, x)
    if gs != (0, d) or us is None or us[0] != d or (us[1] is not None and us[1] < 2 * d):
        return None
    if tuple(vq.shape) != (*vx.shape[:-1], d) or not kernels.silu_mul_quant_fusable(d, q.args[4]):
        return None
    return x, [*dead, src, silu, gate, up]


def fuse_silu_quant(graph: torch.fx.Graph) -> int:
    """Rewrite every SiluAndMul -> Hadamard quantize_act pair of `graph` (see the module doc); returns how many."""
    op = torch.ops.ostquant.silu_mul_quantize_act.default
    done = 0
    for q in _quant_nodes(graph):
        m = _match_silu(q)
        if m is None:
            continue
        x, dead = m
        args = (x, *q.args[1:5])
        with graph.inserting_before(q):
            fused = graph.call_function(op, args)
            outs = [graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        _fake_val(fused, args, outs)
        _replace_quant_outputs(graph, q, outs)
        for n in dead:  # users first: the views, the mul, silu, then the slices
            graph.erase_node(n)
        done += 1
    if done:
        ops.CALLS["fused_silu_mul_quant"] += done
        logger.debug("ostquant: %d SiluAndMul + quantize pairs fused into one kernel each", done)
    return done


_logged = False


def fuse(graph: torch.fx.Graph) -> None:
    """The pass: both rewrites, as configured."""
    global _logged
    n = fuse_norm_quant(graph) if FUSE_NORM else 0
    m = fuse_silu_quant(graph) if FUSE_SILU else 0
    if (n or m) and not _logged:  # once a process: vLLM compiles every piece of the model and every size range
        _logged = True
        logger.info("ostquant: fused %d RMSNorm + quantize and %d SiluAndMul + quantize pairs in a graph piece", n, m)


def _pass_class():
    from vllm.compilation.passes.inductor_pass import InductorPass

    class OstQuantFusionPass(InductorPass):
        """fuse() as a vLLM post-grad pass (its uuid: the rewrites' source and settings, for Inductor's cache)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            fuse(graph)

        def uuid(self) -> str:
            return InductorPass.hash_source(f"norm={FUSE_NORM} silu={FUSE_SILU}", fuse, _quant_nodes, _producer,
                                            fuse_norm_quant, _match, _norm_args, fuse_silu_quant, _match_silu,
                                            _slice_of)

    return OstQuantFusionPass


def install(vllm_config, fmt) -> bool:
    """Hand the pass to vLLM's compiler (its inductor_compile_config slot for one custom post-grad pass) when the
    kernels serve this checkpoint's linears; called while the model is built, before vLLM creates its backend."""
    if not (FUSE_NORM or FUSE_SILU) or vllm_config is None or not torch.cuda.is_available():
        return False
    if not ops.kernels_usable(torch.device("cuda"), fmt.weight_group_size, fmt.act_bits):
        return False
    from vllm.platforms import current_platform

    cls = _pass_class()
    icc = vllm_config.compilation_config.inductor_compile_config
    key = current_platform.pass_key
    have = icc.get(key)
    if have is not None:
        if type(have).__name__ != cls.__name__:
            logger.warning("ostquant: %s already holds %r; the quantizer fusions stay off", key, have)
            return False
        return True
    icc[key] = cls()
    logger.info("ostquant: the activation quantizers fused with RMSNorm (%s) and SiluAndMul (%s) before them "
                "(OSTQUANT_FUSE_NORM / OSTQUANT_FUSE_SILU)", FUSE_NORM, FUSE_SILU)
    return True
