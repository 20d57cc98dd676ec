"""What vLLM's tensor parallelism (TP) does to an ostquant checkpoint, and the check that it can.

vLLM's weight loaders do the splitting (the plugin's parameters are vLLM's ModelWeightParameter /
ChannelQuantScaleParameter / GroupQuantScaleParameter); this module says what that means and
refuses, at load, a TP degree the checkpoint cannot serve. vLLM-free.

- q/k/v and gate/up are column-parallel (QKVParallelLinear, MergedColumnParallelLinear): a rank
  holds a slice of the output rows of `qweight` [out, in/2] and `weight_scale` ([out] or
  [out, in/group]). Its input is the whole (replicated) hidden state, so the per-token activation
  quantizer sees the same row as in calibration: the gathered output is the unsharded one.
- o_proj and down_proj are row-parallel (RowParallelLinear, input_is_parallel=True): a rank holds
  a slice of the input columns, i.e. whole packed bytes of `qweight` (in/2 splits) and whole groups
  of a group `weight_scale`; a per-channel `weight_scale` [out] is whole on every rank. The rank's
  input is its slice of the activation, which `apply` quantizes per token on its own (its own scale
  and zero point); the partial outputs are summed (all-reduce). Calibration quantizes the full row,
  so at TP > 1 these two layers differ from the calibrated model by that quantizer (and only that).
- down_proj's online H_down = I_b (x) H_{m/b} (quantization_config.hadamard_blocks = b): rank r's
  slice of x H_down is its own slice times I_{b/tp} (x) H_{m/b}, so tp must divide b.
- The int4 KV cache quantizes per (token, head) after a per-head rotation: heads are whole on a
  rank (or replicated), so it needs nothing here.
"""
from __future__ import annotations

from .format import QUANTIZED_LINEARS, CheckpointError, QuantFormat, linear_shape, quantized_linear_names
from .hadamard import block_size

ROW_PARALLEL = ("o_proj", "down_proj")   # input columns split; every other quantized linear: output rows


def partition(fmt: QuantFormat, name: str, in_features: int, tp: int) -> int:
    """Check that vLLM can split the quantized linear `name` (`in_features` in the checkpoint) over
    `tp` ranks. Returns the number of H_down blocks one rank applies to its input (0: none).
    Raises CheckpointError naming the checkpoint field and the TP degree."""
    proj = name.rsplit(".", 1)[-1]
    row = proj in ROW_PARALLEL
    if row and in_features % tp:
        raise CheckpointError(f"{name}: in_features {in_features} cannot be split over tensor parallel size {tp}")
    k = in_features // tp if row else in_features
    if k % 2:
        raise CheckpointError(f"{name}.qweight: tensor parallel size {tp} gives each rank {k} input columns, "
                              f"an odd number, which cuts a packed int4 byte")
    gs = fmt.weight_group_size
    if gs > 0 and k % gs:
        raise CheckpointError(f"quantization_config.weight_group_size={gs}: tensor parallel size {tp} gives each "
                              f"rank {k} input columns of {name}, which cuts a scale group of {name}.weight_scale")
    if proj != "down_proj" or not fmt.online_hadamard["down_proj"]:
        return 0
    b = fmt.hadamard_blocks
    if b % tp:
        raise CheckpointError(f"quantization_config.hadamard_blocks={b}: tensor parallel size {tp} cannot split "
                              f"the online Hadamard of {name} (I_{b} (x) H_{in_features // b}) across ranks; serve "
                              f"with a tensor parallel size that divides {b}, or calibrate with --hadamard-blocks "
                              f"a multiple of {tp}")
    try:
        block_size(k, b // tp)
    except ValueError as e:
        raise CheckpointError(f"quantization_config.hadamard_blocks={b}: {name}: {e}") from None
    return b // tp


def check_tensor_parallel(hf_config, fmt: QuantFormat, tp: int) -> None:
    """`partition` for the quantized linears of one decoder layer (every layer has the same shapes)."""
    for name in quantized_linear_names(hf_config)[:len(QUANTIZED_LINEARS)]:
        partition(fmt, name, linear_shape(hf_config, name)[1], tp)
