// Programmatic dependent launch (PDL), shared by the decode GEMMs (OSTQUANT_PDL, on by default) and the KV4 decode
// (OSTQUANT_KV4_PDL, a setting, off): a kernel launched with launch_pdl (the attribute
// cudaLaunchAttributeProgrammaticStreamSerialization) may start while the kernel before it in the stream still
// runs, once that kernel's CTAs have all run pdl_trigger() or exited. Every CTA of such a kernel runs pdl_wait()
// before it reads anything the previous kernel wrote and before any early return (a grid whose CTAs all returned
// early would complete before its predecessor, and the next, normally launched kernel could read stale data).
// Without the attribute both are no-ops.
#pragma once
#include <cuda_runtime.h>

#include <utility>

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

template <typename... Params, typename... Args>
inline cudaError_t launch_pdl(void (*kern)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                              Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kern, std::forward<Args>(args)...);
}
