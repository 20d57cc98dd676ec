"""The ostquant LinearMethod (SPEC §8): int4 weights, per-token dynamic activation quantization.

Parameters (created with vLLM's parameter classes, so the fused QKV / gate_up loaders and TP
shard them): `qweight` int8 [out, in/2] (two signed nibbles a byte, low nibble = even input
column) and `weight_scale` fp16 [out] (or [out, in/group]). Every write goes through a counting
wrapper of the layer's weight loader: a missing, duplicated, mis-typed or mis-shaped tensor
raises a CheckpointError naming the checkpoint tensor. How TP splits them, and which TP degrees
a checkpoint can serve: tensor_parallel.py.
"""
from __future__ import annotations

import zlib

import torch

from . import compat, hadamard, ops, tensor_parallel
from .format import CheckpointError, QuantFormat

_L = compat.linear_classes()
from vllm.model_executor.parameter import (  # noqa: E402  (same in vLLM 0.26 and 0.32)
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
)


def _shards(layer) -> list:
    """Shard ids the model's loader passes for this layer (None: not fused)."""
    if isinstance(layer, _L.QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, _L.MergedColumnParallelLinear):
        return list(range(len(layer.output_sizes)))
    return [None]


def _full_out_sizes(layer) -> list[int]:
    """Checkpoint (unsharded) output sizes of each shard, in _shards order."""
    if isinstance(layer, _L.QKVParallelLinear):
        hv = getattr(layer, "v_head_size", layer.head_size)
        return [layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                layer.total_num_kv_heads * hv]
    if isinstance(layer, _L.MergedColumnParallelLinear):
        return list(layer.output_sizes)
    return [layer.output_size]


class OstQuantLinearMethod(_L.LinearMethodBase):
    """q/k/v/o/gate/up/down of an ostquant checkpoint."""

    def __init__(self, fmt: QuantFormat, prefix: str, ckpt_names: list[str]):
        super().__init__()
        self.fmt = fmt
        self.prefix = prefix
        self.ckpt_names = ckpt_names          # checkpoint module name of each shard

    # ------------------------------------------------------------------ weights
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        fmt = self.fmt
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        gs = fmt.weight_group_size
        # Refuse a TP degree this checkpoint cannot serve (a packed byte, a scale group or the
        # H_down blocks cut across ranks) before any tensor is read; down_proj: its blocks per rank.
        tp = getattr(layer, "tp_size", 1) or 1
        layer.ostq_hadamard_blocks = tensor_parallel.partition(fmt, self.prefix, input_size, tp)
        loader = extra_weight_attrs.get("weight_loader")
        qweight = ModelWeightParameter(data=torch.zeros(n, k // 2, dtype=torch.int8), input_dim=1,
                                       output_dim=0, weight_loader=self._counting(layer, "qweight", loader))
        if gs > 0:
            scale = GroupQuantScaleParameter(data=torch.zeros(n, k // gs, dtype=torch.float16), output_dim=0,
                                             input_dim=1,
                                             weight_loader=self._counting(layer, "weight_scale", loader))
        else:
            scale = ChannelQuantScaleParameter(data=torch.zeros(n, dtype=torch.float16), output_dim=0,
                                               weight_loader=self._counting(layer, "weight_scale", loader))
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("weight_scale", scale)
        layer.ostq_loaded = set()
        layer.ostq_params_dtype = params_dtype
        vc = compat.current_vllm_config()
        load_format = getattr(getattr(vc, "load_config", None), "load_format", None) if vc else None
        layer.ostq_dummy = str(load_format) in ("dummy", "LoadFormat.DUMMY")

    def _ckpt_tensor(self, shard_index: int, pname: str) -> str:
        return f"{self.ckpt_names[shard_index]}.{pname}"

    def _counting(self, layer, pname, loader):
        """Wrap the layer's weight loader: check dtype/shape, record which tensors were written."""
        method = self

        def weight_loader(param, loaded_weight, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id", kwargs.get("shard_id"))
            shards = _shards(layer)
            if shard not in shards:
                raise CheckpointError(f"{method.prefix}.{pname}: unexpected shard id {shard!r} "
                                      f"(expected one of {shards})")
            i = shards.index(shard)
            name = method._ckpt_tensor(i, pname)
            want_dtype = torch.int8 if pname == "qweight" else torch.float16
            if loaded_weight.dtype != want_dtype:
                raise CheckpointError(f"tensor {name} has dtype {loaded_weight.dtype}, expected {want_dtype}")
            out_full = _full_out_sizes(layer)[i]
            in_full = layer.input_size
            gs = method.fmt.weight_group_size
            if pname == "qweight":
                want = (out_full, in_full // 2)
            elif gs > 0:
                want = (out_full, in_full // gs)
            else:
                want = (out_full,)
            if tuple(loaded_weight.shape) != want:
                raise CheckpointError(f"tensor {name} has shape {list(loaded_weight.shape)}, expected {list(want)}")
            if (pname, shard) in layer.ostq_loaded:
                raise CheckpointError(f"tensor {name} was loaded twice")
            layer.ostq_loaded.add((pname, shard))
            return loader(param, loaded_weight, *args, **kwargs)

        return weight_loader

    def process_weights_after_loading(self, layer) -> None:
        fmt = self.fmt
        if getattr(layer, "ostq_dummy", False):
            _fill_dummy(layer, self.prefix)
        else:
            for i, shard in enumerate(_shards(layer)):
                for pname in ("qweight", "weight_scale"):
                    if (pname, shard) not in layer.ostq_loaded:
                        raise CheckpointError(f"tensor {self._ckpt_tensor(i, pname)} is missing from the checkpoint "
                                              f"(never loaded into {self.prefix})")
        p = ops.prepare_weights(layer.qweight.data, layer.weight_scale.data, fmt.act_bits,
                                fmt.weight_group_size, layer.ostq_params_dtype)
        if not torch.isfinite(p.w_scale).all():
            bad = (~torch.isfinite(p.w_scale)).nonzero()[0].tolist()
            raise CheckpointError(f"{self.prefix}.weight_scale has a non-finite value at {bad}")
        layer.ostq_prepared = p
        if layer.ostq_hadamard_blocks:  # H_b on the device now (the reference path and the kernels' fallback)
            hadamard.warm(p.in_features, layer.ostq_hadamard_blocks, p.w_scale.device)
        # The forward reads only the prepared copy: drop the checkpoint layout, or the int4 weights
        # sit in GPU memory twice (8B: 3.1 GiB that vLLM would otherwise not give to the KV cache).
        layer.qweight.data = layer.qweight.data.new_empty(0)
        ops.count(f"prepared_{p.path}")  # load-time proof of the path (forward calls are not counted
        #                                   inside torch.compile / CUDA graphs)

    # ------------------------------------------------------------------ forward
    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        fmt = self.fmt
        return ops.linear(x, layer.ostq_prepared, fmt.act_bits, fmt.act_sym, float(fmt.act_clip),
                          hadamard_blocks=layer.ostq_hadamard_blocks, bias=bias)


def _fill_dummy(layer, prefix: str) -> None:
    """load_format='dummy': integer params are left as allocated by vLLM's dummy loader (zeros
    here); give them reproducible random nibbles, and keep the dummy scales small and finite."""
    qw = layer.qweight.data
    g = torch.Generator(device=qw.device)  # on the weight's device: 8B-model shapes fill in ms, not minutes
    g.manual_seed(zlib.crc32(prefix.encode()))
    qw.copy_(torch.randint(-128, 128, tuple(qw.shape), generator=g, dtype=torch.int16, device=qw.device)
             .to(torch.int8))
    ws = layer.weight_scale.data
    ws.copy_(torch.nan_to_num(ws.float().abs(), nan=1e-3, posinf=1e-3).clamp(1e-4, 1e-2).to(ws.dtype))
