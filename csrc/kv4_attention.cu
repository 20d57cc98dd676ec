// 4-bit KV cache on Hopper: write, decode attention and dequantize (for prefill) on vLLM 0.26's
// `int4_per_token_head` paged cache.
//
// Cache record per (block, slot, kv head), bytes:  [K nibbles D/2 | K scale 4 | V nibbles D/2 | V scale 4]
// (vLLM's TritonAttentionBackend layout; strides come from the tensor, NHD or HND). A nibble pair
// byte holds dim 2j in its low and dim 2j+1 in its high nibble, unsigned levels 0..15; the fp32
// scale hides the zero point in its low 4 mantissa bits and is read with them cleared.
//
// Numerics (one definition with ostquant_vllm/numerics.py: fake_quant_kv_int4 / int4_kv_quantize):
//   write:  y = bf16(FWHT(signs * x)) in fp32 butterflies in the same order as _sylvester_fwht;
//           scale = max((max - min) / 15, 1e-6); zero = clamp(rha(-min / scale)); q = clamp(rha(y * (1/scale) + zero))
//           with every op correctly rounded (no FMA contraction), so the bytes equal the reference's.
//   decode: q_rot = bf16(FWHT(signs * q)); s = scale/D * k_scale * (q_rot . k_level - zero_k * sum(q_rot));
//           softmax; o = sum p * v_scale * (v_level - zero_v); out = FWHT(o) * signs / D.
//   dequantize: bf16(FWHT((level - zero) * scale) * signs / D), fake_quant_kv_int4's value.
//
// Decode kernel: one CTA per (kv head, split, sequence), 4 warps, 16-token tiles per warp, the
// request's last query token. Tensor cores (m16n8k16) with the 16 tokens of a tile as the M rows
// and the GQA group's queries as the N columns (see decode_kernel); nibbles are widened to bf16 /
// fp16 in registers by the lop3 magic-number trick (exact). Notes and measurements:
// benchmarks/NOTES_kv4.md.
// Splits: the context is cut into ceil(tiles / num_splits) tiles (at least min_tiles) per CTA,
// computed on the device from seq_lens, so a CUDA graph captured at one length is right at any other;
// the last split to finish combines them (combine_splits): one kernel a call.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cp_async.cuh"
#include "pdl.cuh"

#define KV4_API extern "C" __attribute__((visibility("default")))

namespace kv4 {

constexpr int NW = 4;          // warps per decode CTA
#define KV4_MAX_SPLITS 256     // the split combine's weights (G x splits floats) fit in the partial-output buffer
// The least context a split is given, in 16-token tiles (OSTQUANT_KV4_MIN_TILES / ostq_kv4_set_min_tiles
// for measurements). H100, session 11, batch 1: 16 (256 tokens) 14.6 µs at 4k context against 4's 19.1
// (64 splits made the separate reduce kernel of that time the chain), 4 ahead at 1k (10.5 against 12.1).
int g_min_tiles = 16;
// Tiles in flight per warp for groups of <= 8 queries a KV head: 1 (held in registers) or 2 (cp.async into a
// warp's 3 shared-memory slots: twice the bytes in flight an SM at the same 4 CTAs an SM; session 13's
// register version of 2 lost, needing 3 CTAs an SM); OSTQUANT_KV4_PREFETCH / ostq_kv4_set_prefetch. H100,
// session 22: 2 equal or faster at every point (batch 256, 4k: 545 -> 502 µs; batch 1, 256: 12.8 -> 11.8).
int g_prefetch = 2;
// Programmatic dependent launch of the decode after the cache write (pdl.cuh; OSTQUANT_KV4_PDL / ostq_kv4_set_pdl;
// session 23, a measurement setting, off): the write kernel lets the decode launch at once, and the decode's
// block-table entries, Q rotation and first tiles (those before the request's new tokens) are in flight while the
// write still runs; it passes pdl_wait before it reads a tile with a new token and before any return.
int g_pdl = 0;

__device__ __forceinline__ float rha(float x) {  // round half away from zero (numerics._round_half_away)
  return x >= 0.f ? floorf(__fadd_rn(x, 0.5f)) : ceilf(__fsub_rn(x, 0.5f));
}

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// Nibbles 0 and 4 of x (bits 0-3, 16-19; or those of `mask`) under a 16-bit float's magic exponent: (x & mask) | magic.
__device__ __forceinline__ uint32_t nib_pair(uint32_t x, uint32_t magic, uint32_t mask = 0x000F000Fu) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));  // (a & b) | c
  return r;
}
__device__ __forceinline__ uint32_t nib_bf16(uint32_t x) {  // 128 + n - 128, exact in bf16
  uint32_t p = nib_pair(x, 0x43004300u);
  __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&p), __floats2bfloat162_rn(128.f, 128.f));
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t nib_f16(uint32_t x) {  // 1024 + n - 1024, exact in fp16
  uint32_t p = nib_pair(x, 0x64006400u);
  __half2 r = __hsub2(*reinterpret_cast<__half2*>(&p), __floats2half2_rn(1024.f, 1024.f));
  return *reinterpret_cast<uint32_t*>(&r);
}
// Nibbles 1 and 5 (bits 4-7, 20-23) without a shift: (1024 + 16 n) / 16 - 64, exact in fp16 (one rounding, of n).
__device__ __forceinline__ uint32_t nib_f16_hi(uint32_t x) {
  uint32_t p = nib_pair(x, 0x64006400u, 0x00F000F0u);
  __half2 r = __hfma2(*reinterpret_cast<__half2*>(&p), __floats2half2_rn(0.0625f, 0.0625f),
                      __floats2half2_rn(-64.f, -64.f));
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
  __half2 r = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}
__device__ __forceinline__ float2 unpack_f16(uint32_t x) { return __half22float2(*reinterpret_cast<__half2*>(&x)); }

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Loads of the read-only cache, through the non-coherent path, or from a shared-memory copy of it (SHARED).
template <bool SHARED>
__device__ __forceinline__ uint32_t ld32(const uint8_t* p) {
  return SHARED ? *reinterpret_cast<const uint32_t*>(p) : __ldg(reinterpret_cast<const uint32_t*>(p));
}
template <bool SHARED>
__device__ __forceinline__ uint2 ld64(const uint8_t* p) {
  return SHARED ? *reinterpret_cast<const uint2*>(p) : __ldg(reinterpret_cast<const uint2*>(p));
}

// In-place unnormalised FWHT of one D-vector spread over a warp, lane holding elements
// [lane*E, lane*E + E): in-register butterflies below E, shuffles above; _sylvester_fwht's order.
template <int D>
__device__ __forceinline__ void warp_fwht(float (&x)[D / 32], int lane) {
  constexpr int E = D / 32;
#pragma unroll
  for (int h = 1; h < D; h <<= 1) {
    if (h < E) {
#pragma unroll
      for (int i = 0; i < E; ++i)
        if (!(i & h)) {
          const float a = x[i], b = x[i + h];
          x[i] = __fadd_rn(a, b);
          x[i + h] = __fsub_rn(a, b);
        }
    } else {
      const int lm = h / E;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float o = __shfl_xor_sync(0xffffffffu, x[e], lm);
        const float sum = __fadd_rn(x[e], o), diff = __fsub_rn(o, x[e]);  // both, then a select: no branch
        x[e] = (lane & lm) ? diff : sum;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// cache write: one warp per (token, kv head), K then V; lane holds dims [lane*E, lane*E + E)
// ------------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(128) write_kernel(const __nv_bfloat16* __restrict__ key,
                                                    const __nv_bfloat16* __restrict__ value,
                                                    uint8_t* __restrict__ cache,
                                                    const int64_t* __restrict__ slot_mapping, int num_tokens,
                                                    int nkv, int64_t k_tok, int64_t k_head, int64_t v_tok,
                                                    int64_t v_head, int64_t c_blk, int64_t c_slot, int64_t c_head,
                                                    int block_size, const float* __restrict__ signs) {
  constexpr int E = D / 32;
  pdl_trigger();  // the decode after it may launch (under PDL it still waits before reading new tokens' tiles)
  const int w = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (w >= num_tokens * nkv) return;
  const int tok = w / nkv, head = w % nkv;
  const int64_t slot = slot_mapping[tok];
  if (slot < 0) return;
  uint8_t* rec = cache + (slot / block_size) * c_blk + (slot % block_size) * c_slot + head * c_head;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const __nv_bfloat16* src = half ? value + tok * v_tok + head * v_head : key + tok * k_tok + head * k_head;
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __bfloat162float(src[lane * E + e]) * signs[lane * E + e];
    warp_fwht<D>(x, lane);
    float mn = INFINITY, mx = -INFINITY;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      x[e] = bf16_round(x[e]);
      mn = fminf(mn, x[e]);
      mx = fmaxf(mx, x[e]);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    const float scale = fmaxf(__fdiv_rn(__fsub_rn(mx, mn), 15.f), 1e-6f);
    const float zero = fminf(fmaxf(rha(__fdiv_rn(-mn, scale)), 0.f), 15.f);
    const float inv = __fdiv_rn(1.f, scale);
    uint32_t packed = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float q = fminf(fmaxf(rha(__fadd_rn(__fmul_rn(x[e], inv), zero)), 0.f), 15.f);
      packed |= uint32_t(q) << (4 * e);
    }
    uint8_t* dst = rec + half * (D / 2 + 4);
    if constexpr (E == 4) {
      *reinterpret_cast<uint16_t*>(dst + lane * 2) = uint16_t(packed);
    } else {
      dst[lane] = uint8_t(packed);
    }
    if (lane == 0)
      *reinterpret_cast<uint32_t*>(dst + D / 2) = (__float_as_uint(scale) & ~15u) | uint32_t(zero);
  }
}

// ------------------------------------------------------------------------------------------------
// dequantize to bf16 in the original basis (prefill): out = bf16(FWHT(level - zero) * scale) * signs / D)
// = numerics.fake_quant_kv_int4's value. One warp per (block, slot, kv head); blocks from src_blocks.
// ------------------------------------------------------------------------------------------------
template <int D>
__global__ void __launch_bounds__(128) dequant_kernel(const uint8_t* __restrict__ cache, int64_t c_blk, int64_t c_slot,
                                                      int64_t c_head, const int32_t* __restrict__ src_blocks,
                                                      const int32_t* __restrict__ valid, int nb,
                                                      int nkv, int block_size, __nv_bfloat16* __restrict__ k_out,
                                                      __nv_bfloat16* __restrict__ v_out, const float* __restrict__ signs) {
  constexpr int E = D / 32;
  const int w = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (w >= nb * block_size * nkv) return;
  const int head = w % nkv, slot = (w / nkv) % block_size, b = w / (nkv * block_size);
  const uint8_t* rec = cache + int64_t(src_blocks[b]) * c_blk + slot * c_slot + head * c_head;
  const bool live = slot < valid[b];  // slots past the context hold stale bytes: zeros for FlashAttention
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    __nv_bfloat16* dst = (half ? v_out : k_out) + ((int64_t(b) * block_size + slot) * nkv + head) * D + lane * E;
    if (!live) {
#pragma unroll
      for (int e = 0; e < E; ++e) dst[e] = __float2bfloat16_rn(0.f);
      continue;
    }
    const uint8_t* src = rec + half * (D / 2 + 4);
    const uint32_t word = *reinterpret_cast<const uint32_t*>(src + D / 2);
    const float zero = float(word & 15u), scale = __uint_as_float(word & ~15u);
    uint32_t packed = E == 4 ? uint32_t(*reinterpret_cast<const uint16_t*>(src + lane * 2)) : uint32_t(src[lane]);
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = (float((packed >> (4 * e)) & 15u) - zero) * scale;
    warp_fwht<D>(x, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) dst[e] = __float2bfloat16_rn(x[e] * signs[lane * E + e] / D);
  }
}

// ------------------------------------------------------------------------------------------------
// decode attention
// ------------------------------------------------------------------------------------------------
struct DecodeArgs {
  const __nv_bfloat16* q;
  int64_t q_tok, q_head;
  __nv_bfloat16* out;
  int64_t o_tok, o_head;
  const uint8_t* cache;
  int64_t c_blk, c_slot, c_head;
  const int32_t* block_table;
  int64_t bt_stride;
  const int32_t* seq_lens;
  const int32_t* query_start;
  int group, block_size, num_splits, min_tiles;
  float scale_log2;  // softmax scale / D * log2(e)
  const float* signs;
  float* part_o;   // [num_seqs][Hq][num_splits][D]
  float* part_ml;  // [num_seqs][Hq][num_splits][2]
  int* counters;   // [num_seqs][nkv] splits finished; zero between launches (the last split resets it)
  int skip_multi;  // 1: requests with several query tokens are left to the prefill path (no work, no writes)
  int pdl;         // launched as a programmatic dependent of the cache write (g_pdl)
  int block_mask;  // block_size - 1 where it is a power of two (a slot is then a mask away), else 0 (a division)
};

__device__ __forceinline__ int split_tiles(const DecodeArgs& a, int tiles) {
  const int chunk = (tiles + a.num_splits - 1) / a.num_splits;
  return chunk > a.min_tiles ? chunk : a.min_tiles;
}

template <int D>
struct Tile {  // one warp's raw loads for one 16-token tile
  uint32_t k[2][D / 32];  // tokens g and 8+g: this thread's D/8 K bytes
  uint32_t v[4][D / 64];  // tokens 2t, 2t+1, 8+2t, 9+2t: this thread's D/16 V bytes
  uint32_t ks[2], vs[2];  // K and V scale words of tokens g and 8+g
};

// This thread's part of the 16-token tile whose first record is at `base`, records `stride` bytes apart:
// in the cache (slot stride) or in a warp's shared-memory copy of the tile (SHARED, records packed).
template <int D, bool SHARED>
__device__ __forceinline__ void read_tile(Tile<D>& r, const uint8_t* base, int64_t stride, int g, int t) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const uint8_t* p = base + (n * 8 + g) * stride;
#pragma unroll
    for (int i = 0; i < D / 64; ++i) {
      const uint2 x = ld64<SHARED>(p + t * (D / 8) + 8 * i);
      r.k[n][2 * i] = x.x;
      r.k[n][2 * i + 1] = x.y;
    }
    r.ks[n] = ld32<SHARED>(p + D / 2);
    r.vs[n] = ld32<SHARED>(p + D + 4);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint8_t* p = base + ((i >> 1) * 8 + 2 * t + (i & 1)) * stride;
#pragma unroll
    for (int u = 0; u < D / 64; ++u) r.v[i][u] = ld32<SHARED>(p + D / 2 + 4 + g * (D / 16) + 4 * u);
  }
}

// The cache record of token `tile * 16` (the tile's first) of kv head `kvh` in block `blk`.
template <int D>
__device__ __forceinline__ const uint8_t* tile_base(const DecodeArgs& a, int64_t blk, int kvh, int tile) {
  const int slot = a.block_mask ? (tile * 16) & a.block_mask : tile * 16 % a.block_size;
  return a.cache + blk * a.c_blk + kvh * a.c_head + int64_t(slot) * a.c_slot;
}

// The tile's 16 records (D + 8 bytes each, 8-byte aligned) copied by the warp into `dst`, packed, 8 bytes a
// cp.async: lane l copies chunk l % (D/8) of records l / (D/8) + RP j (RP = 32 / (D/8) records a pass), and lanes
// 0-15 the last chunk of record l. Their offsets in the cache are the same for every tile, so the caller computes
// them once (copy_offsets): per tile the copy is then a base address and RP-record steps (session 22: the chunks'
// divisions and 64-bit products were ~120 of the loop's ~620 SASS instructions a tile).
template <int D>
__device__ __forceinline__ uint2 copy_offsets(int64_t stride, int lane) {
  constexpr int CPR = D / 8;
  return make_uint2(uint32_t((lane / CPR) * stride + (lane % CPR) * 8), uint32_t((lane & 15) * stride + D));
}
template <int D>
__device__ __forceinline__ void copy_tile_async(uint32_t dst, const uint8_t* base, int64_t stride, int lane,
                                                uint2 off) {
  constexpr int CPR = D / 8, RP = 32 / CPR, REC = D + 8;
  const uint8_t* src = base + off.x;
  const uint32_t d = dst + (lane / CPR) * REC + (lane % CPR) * 8;
#pragma unroll
  for (int j = 0; j < 16 / RP; ++j) cp_async8(d + j * RP * REC, src + j * RP * stride);
  if (lane < 16) cp_async8(dst + lane * REC + D, base + off.y);
}

__device__ __forceinline__ int pd(int d) { return d + (d >> 5); }  // a padding word per 32 (decode_kernel)

__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// The split combine for `rows` query heads (rows row0 .. row0 + rows - 1 of the partials) over `active`
// splits, in the last CTA of a (sequence, kv head): out(r, d) = sum_s f_s o_s[d] / sum_s f_s l_s with
// f_s = 2^(m_s - max_s m_s). `w` holds rows x active floats of shared memory, `lsum` rows. The
// partials come from other CTAs: read from L2 (__ldcg), never a stale L1 line. The combine is a chain of
// L2 round trips at the end of the kernel (batch 1: 16-64 splits), so each thread puts all its loads of a
// round in flight at once: a row's (m, l) pairs (one round up to 256 splits), then 16 splits of four
// output dims (session 23; it was 4 dims one at a time, 16 splits each: 4x the rounds). Same sums in the
// same order as before (bit-identical).
template <int D, typename Store>
__device__ __forceinline__ void combine_splits(const DecodeArgs& a, int row0, int rows, int active, float* w,
                                               float* lsum, Store&& store) {
  constexpr int SPL = KV4_MAX_SPLITS / 32, U = 16;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthr = blockDim.x;
  for (int r = warp; r < rows; r += nthr / 32) {  // a warp a row: the max, the weights, l
    const float2* ml = reinterpret_cast<const float2*>(a.part_ml) + int64_t(row0 + r) * a.num_splits;
    float2 v[SPL];
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int s = lane + 32 * j;
      v[j] = s < active ? __ldcg(ml + s) : make_float2(-INFINITY, 0.f);
    }
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < SPL; ++j) M = fmaxf(M, v[j].x);
#pragma unroll
    for (int o = 16; o; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float L = 0.f;
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int s = lane + 32 * j;
      if (s < active) {
        const float f = M == -INFINITY ? 0.f : exp2f(v[j].x - M);
        w[r * active + s] = f;
        L += f * v[j].y;
      }
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    if (lane == 0) lsum[r] = L;
  }
  __syncthreads();
  for (int i = tid; i < rows * (D / 4); i += nthr) {  // a thread four dims of a row
    const int r = i / (D / 4), d = (i % (D / 4)) * 4;
    const float4* po = reinterpret_cast<const float4*>(a.part_o + int64_t(row0 + r) * a.num_splits * D + d);
    const float* wr = w + r * active;
    float O[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s0 = 0; s0 < active; s0 += U) {
      float4 o[U];  // unpredicated loads (past the end: the last split again, not added), all in flight
#pragma unroll
      for (int u = 0; u < U; ++u) o[u] = __ldcg(po + min(s0 + u, active - 1) * (D / 4));
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (s0 + u < active) {
          const float f = wr[s0 + u];
          O[0] += f * o[u].x;
          O[1] += f * o[u].y;
          O[2] += f * o[u].z;
          O[3] += f * o[u].w;
        }
    }
    const float ls = lsum[r];
#pragma unroll
    for (int e = 0; e < 4; ++e) store(r, d + e, ls > 0.f ? O[e] / ls : 0.f);
  }
}

// Tokens are the M rows of m16n8k16 and the group's queries the N columns (NQ tiles of 8):
//   S^T = K Q^T  (A = K nibbles -> bf16, B = rotated Q),  O^T += V^T P^T  (A = V nibbles -> fp16,
//   B = (P * v_scale)^T: the C fragment of S^T in fp16, transposed in registers by movmatrix).
// PF: tiles a warp has in flight ahead of the one it computes: 1, its loads held in registers, or 2, copied
// into the warp's three shared-memory slots (cp.async) and read from there (the same values).
template <int D, int NQ, int PF>
__global__ void __launch_bounds__(128, NQ == 1 ? 4 : 3) decode_kernel(const DecodeArgs a) {
  static_assert(PF == 1 || PF == 2, "one tile ahead in registers or two through shared memory");
  constexpr bool SP = PF == 2;                  // the shared-memory pipeline
  constexpr int TB = 16 * (D + 8), SLOTS = 3;   // a tile's bytes; slots a warp (two loading, one read)
  constexpr int ROWS = 8 * NQ, KSTEPS = D / 16, MT = D / 16;
  const int kvh = blockIdx.x, split = blockIdx.y, seq = blockIdx.z;
  const int G = a.group, Hq = gridDim.x * G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  // (query_start, seq_lens, the block table and q are not the cache write's outputs: read before pdl_wait)
  const int tok_q = a.query_start[seq + 1] - 1;  // the request's last query token
  const int qlen = tok_q + 1 - a.query_start[seq];
  if (qlen < 1 || (a.skip_multi && qlen > 1)) {  // a CUDA graph's padding request; one left to the prefill path
    pdl_wait();                                  // (all its splits leave: its counter stays 0)
    return;
  }
  const int seq_len = a.seq_lens[seq];
  const int tiles = (seq_len + 15) / 16;
  const int chunk = split_tiles(a, tiles);
  const int t0 = split * chunk, t1 = min(tiles, t0 + chunk);
  if (split > 0 && t0 >= t1) {
    pdl_wait();
    return;
  }

  // Rows padded by one word per 32 (dim d at pd(d)) and strides chosen so that every access below
  // is free of bank conflicts (unpadded, the B-fragment reads of Q were 32-way and the partial
  // output writes 16-way conflicted: at batch 1 they were half of the kernel's time).
  __shared__ float sq[ROWS][D + D / 32];  // rotated Q, later the output rows
  __shared__ float sqsum[ROWS];
  __shared__ float so[NW][ROWS][D + D / 32 + D / 64];
  static_assert(NW * (D + D / 32 + D / 64) >= KV4_MAX_SPLITS, "combine_splits' weights must fit in so");
  __shared__ float sm[NW][ROWS], sl[NW][ROWS];
  __shared__ __align__(16) uint8_t stile[SP ? NW : 1][SP ? SLOTS : 1][SP ? TB : 16];

  // Block-table entries of this warp's tiles, lane j holding its j-th (then the next 32 in bt_nxt):
  // a tile's cache loads then wait on no block-table load (in-order issue made each tile cost two
  // dependent memory latencies: the entry, then the cache).
  const int32_t* bt = a.block_table + seq * a.bt_stride;
  auto bt_entry = [&](int j) { const int tl = t0 + warp + j * NW; return tl < t1 ? bt[tl * 16 / a.block_size] : 0; };
  int bt_cur = bt_entry(lane), bt_nxt = bt_entry(32 + lane);
  // The load of this warp's j-th tile (the tile t0 + warp + j NW < t1, block-table entry blk): into registers
  // (dst) or into shared-memory slot j % SLOTS as one cp.async group of each lane (empty past the end).
  const uint2 coff = copy_offsets<D>(a.c_slot, lane);  // (the shared-memory pipeline)
  auto load = [&](Tile<D>& dst, int j, int blk) {
    const int tl = t0 + warp + j * NW;
    if constexpr (SP) {
      if (tl < t1)
        copy_tile_async<D>(smem_u32(stile[warp][j % SLOTS]), tile_base<D>(a, blk, kvh, tl), a.c_slot, lane, coff);
      cp_async_commit();
    } else if (tl < t1) {
      read_tile<D, false>(dst, tile_base<D>(a, blk, kvh, tl), a.c_slot, g, t);
    }
  };
  // this warp's first PF tiles: their loads go out before the Q prologue, so the memory latencies overlap. Under
  // PDL only if none of them holds a token the write before may still be writing (the request's last qlen), else
  // after pdl_wait (all of them: the cp.async groups must stay in tile order).
  int tile = t0 + warp;
  Tile<D> buf[2];  // registers: buf[0] computed, buf[1] in flight; shared memory: buf[0] read from its slot
  auto load_first = [&] {
#pragma unroll
    for (int p = 0; p < PF; ++p) load(buf[p & 1], p, __shfl_sync(0xffffffffu, bt_cur, p));
  };
  const bool early = !a.pdl || min(t0 + warp + (PF - 1) * NW, t1 - 1) < (seq_len - qlen) / 16;
  if (early) load_first();

  // Q rotated (signs, then the FWHT) and rounded to bf16, one warp a row: the butterflies in registers
  // and shuffles (warp_fwht, the same order as the cache write's), no CTA barrier between the stages
  constexpr int E = D / 32;
  for (int r = warp; r < ROWS; r += NW) {
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane * E + e;
      x[e] = r < G ? __bfloat162float(a.q[tok_q * a.q_tok + (kvh * G + r) * a.q_head + d]) * a.signs[d] : 0.f;
    }
    if (r < G) warp_fwht<D>(x, lane);  // warp-uniform
#pragma unroll
    for (int e = 0; e < E; ++e) sq[r][pd(lane * E + e)] = bf16_round(x[e]);
    __syncwarp();
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += sq[r][pd(d)];
#pragma unroll
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) sqsum[r] = s;
  }
  pdl_wait();
  if (!early) load_first();
  __syncthreads();

  // B fragments of Q^T (query column g of tile c): K word w of this thread covers dims
  // t*D/4 + 8w + (0..7); its nibble pairs (0,4) (1,5) feed k-step 2w, (2,6) (3,7) k-step 2w+1.
  uint32_t qb[NQ][KSTEPS][2];
#pragma unroll
  for (int c = 0; c < NQ; ++c)
#pragma unroll
    for (int w = 0; w < D / 32; ++w) {
      const int b = t * (D / 4) + 8 * w, r = c * 8 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        qb[c][2 * w + h][0] = pack_bf16(sq[r][pd(b + 2 * h)], sq[r][pd(b + 2 * h + 4)]);
        qb[c][2 * w + h][1] = pack_bf16(sq[r][pd(b + 2 * h + 1)], sq[r][pd(b + 2 * h + 5)]);
      }
    }
  float qsum[NQ][2];
#pragma unroll
  for (int c = 0; c < NQ; ++c) {
    qsum[c][0] = sqsum[c * 8 + 2 * t];
    qsum[c][1] = sqsum[c * 8 + 2 * t + 1];
  }

  float acc[NQ][MT][4];  // O^T: m-tile i rows (g | g+8) <-> dims g*D/8 + (i | i + MT); cols queries 2t, 2t+1
#pragma unroll
  for (int c = 0; c < NQ; ++c)
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[c][i][0] = acc[c][i][1] = acc[c][i][2] = acc[c][i][3] = 0.f;
  float m_r[NQ][2], l_r[NQ][2], z_r[NQ][2];
#pragma unroll
  for (int c = 0; c < NQ; ++c)
#pragma unroll
    for (int j = 0; j < 2; ++j) m_r[c][j] = -INFINITY, l_r[c][j] = z_r[c][j] = 0.f;

  // One tile: the load of the tile PF ahead (into `dst` or its shared-memory slot), then `cur`'s math.
  int jn = PF;  // the warp's index of the tile loaded next
  auto step = [&](const Tile<D>& cur, Tile<D>& dst) {
    if ((jn & 31) == 0) {  // warp-uniform
      bt_cur = bt_nxt;
      bt_nxt = bt_entry(jn + 32 + lane);
    }
    load(dst, jn, __shfl_sync(0xffffffffu, bt_cur, jn & 31));
    // S^T for tokens (g, g+8) x queries (2t, 2t+1) of each column tile
    float s[NQ][4];
#pragma unroll
    for (int c = 0; c < NQ; ++c) s[c][0] = s[c][1] = s[c][2] = s[c][3] = 0.f;
#pragma unroll
    for (int w = 0; w < D / 32; ++w) {
      const uint32_t x = cur.k[0][w], y = cur.k[1][w];
      const uint32_t a0 = nib_bf16(x), a1 = nib_bf16(y), a2 = nib_bf16(x >> 4), a3 = nib_bf16(y >> 4);
      const uint32_t b0 = nib_bf16(x >> 8), b1 = nib_bf16(y >> 8), b2 = nib_bf16(x >> 12), b3 = nib_bf16(y >> 12);
#pragma unroll
      for (int c = 0; c < NQ; ++c) {
        mma_bf16(s[c], a0, a1, a2, a3, qb[c][2 * w][0], qb[c][2 * w][1]);
        mma_bf16(s[c], b0, b1, b2, b3, qb[c][2 * w + 1][0], qb[c][2 * w + 1][1]);
      }
    }
    const bool valid[2] = {tile * 16 + g < seq_len, tile * 16 + 8 + g < seq_len};
    float zk[2], sk[2], vsc[2], zv[2];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      zk[n] = float(cur.ks[n] & 15u);
      sk[n] = __uint_as_float(cur.ks[n] & ~15u) * a.scale_log2;
      vsc[n] = __uint_as_float(cur.vs[n] & ~15u);
      zv[n] = float(cur.vs[n] & 15u);
    }
    uint32_t pb[NQ][2];  // B fragments of (P * v_scale)^T: tokens x queries
#pragma unroll
    for (int c = 0; c < NQ; ++c) {
      float p[4], al[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // query column 2t + j
        float v0 = valid[0] ? (s[c][j] - qsum[c][j] * zk[0]) * sk[0] : -INFINITY;
        float v1 = valid[1] ? (s[c][2 + j] - qsum[c][j] * zk[1]) * sk[1] : -INFINITY;
        float mx = fmaxf(v0, v1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m_r[c][j], mx);
        const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_r[c][j] - m_new);
        m_r[c][j] = m_new;
        p[j] = valid[0] && m_new != -INFINITY ? exp2f(v0 - m_new) : 0.f;
        p[2 + j] = valid[1] && m_new != -INFINITY ? exp2f(v1 - m_new) : 0.f;
        l_r[c][j] = l_r[c][j] * alpha + p[j] + p[2 + j];
        z_r[c][j] *= alpha;
        al[j] = alpha;
      }
      // Once the running maxima settle, every alpha is exactly 1 (exp2 of 0) and the rescale an identity: the
      // warp skips it (the same bits; 4 D / 8 multiplies a tile)
      if (!__all_sync(0xffffffffu, al[0] == 1.f && al[1] == 1.f)) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            acc[c][i][j] *= al[j];
            acc[c][i][2 + j] *= al[j];
          }
      }
      const uint32_t lo = pack_f16(valid[0] ? p[0] * vsc[0] : 0.f, valid[0] ? p[1] * vsc[0] : 0.f);
      const uint32_t hi = pack_f16(valid[1] ? p[2] * vsc[1] : 0.f, valid[1] ? p[3] * vsc[1] : 0.f);
      const float2 plo = unpack_f16(lo), phi = unpack_f16(hi);  // the rounded values the mma uses
      z_r[c][0] += plo.x * zv[0] + phi.x * zv[1];
      z_r[c][1] += plo.y * zv[0] + phi.y * zv[1];
      pb[c][0] = transpose8x8(lo);
      pb[c][1] = transpose8x8(hi);
    }
    // O^T += V^T P^T: dim e of this thread's chunk (g*D/8 + e) is row (g | g+8) of m-tile e % MT
    uint32_t vlo[D / 8], vhi[D / 8];  // fp16 pairs (tokens 2t, 2t+1) and (8+2t, 9+2t) per dim e
#pragma unroll
    for (int u = 0; u < D / 64; ++u) {
      const uint32_t x01 = __byte_perm(cur.v[0][u], cur.v[1][u], 0x5410), y01 = __byte_perm(cur.v[0][u], cur.v[1][u], 0x7632);
      const uint32_t x23 = __byte_perm(cur.v[2][u], cur.v[3][u], 0x5410), y23 = __byte_perm(cur.v[2][u], cur.v[3][u], 0x7632);
#pragma unroll
      for (int m = 0; m < 4; m += 2) {  // nibbles m and m + 1 of each 16-bit half: one shift for both
        const int sh = 4 * m;
        vlo[8 * u + m] = nib_f16(x01 >> sh);
        vhi[8 * u + m] = nib_f16(x23 >> sh);
        vlo[8 * u + 4 + m] = nib_f16(y01 >> sh);
        vhi[8 * u + 4 + m] = nib_f16(y23 >> sh);
        vlo[8 * u + m + 1] = nib_f16_hi(x01 >> sh);
        vhi[8 * u + m + 1] = nib_f16_hi(x23 >> sh);
        vlo[8 * u + 5 + m] = nib_f16_hi(y01 >> sh);
        vhi[8 * u + 5 + m] = nib_f16_hi(y23 >> sh);
      }
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int c = 0; c < NQ; ++c) mma_f16(acc[c][i], vlo[i], vlo[i + MT], vhi[i], vhi[i + MT], pb[c][0], pb[c][1]);
    tile += NW;
    ++jn;
  };
  if constexpr (SP) {
    while (tile < t1) {
      cp_async_wait<PF - 1>();  // this lane's copies of the tile computed now have landed,
      __syncwarp();             // and every lane's (and all are done reading the slot that step refills)
      read_tile<D, true>(buf[0], stile[warp][(jn - PF) % SLOTS], D + 8, g, t);
      step(buf[0], buf[1]);
    }
  } else {
    while (tile < t1) {
      step(buf[0], buf[1]);
      buf[0] = buf[1];
    }
  }

  // per-warp results -> shared memory (dims put back in order), then the warps combined
#pragma unroll
  for (int c = 0; c < NQ; ++c)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) {
        l_r[c][j] += __shfl_xor_sync(0xffffffffu, l_r[c][j], o);
        z_r[c][j] += __shfl_xor_sync(0xffffffffu, z_r[c][j], o);
      }
      const int q = c * 8 + 2 * t + j;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        so[warp][q][pd(g * (D / 8) + i)] = acc[c][i][j] - z_r[c][j];
        so[warp][q][pd(g * (D / 8) + i + MT)] = acc[c][i][2 + j] - z_r[c][j];
      }
      if (g == 0) {
        sm[warp][q] = m_r[c][j];
        sl[warp][q] = l_r[c][j];
      }
    }
  __syncthreads();
  const bool single = a.num_splits == 1;
  for (int i = tid; i < G * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm[w][r]);
    float O = 0.f, L = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float f = exp2f(sm[w][r] - M);
        O += f * so[w][r][pd(d)];
        L += f * sl[w][r];
      }
    }
    if (single) {
      sq[r][pd(d)] = L > 0.f ? O / L : 0.f;
    } else {
      const int64_t idx = (int64_t(seq) * Hq + kvh * G + r) * a.num_splits + split;
      a.part_o[idx * D + d] = O;
      if (d == 0) {
        a.part_ml[idx * 2] = M;
        a.part_ml[idx * 2 + 1] = L;
      }
    }
  }
  // Splits: the last CTA of the (sequence, kv head) to finish combines all splits' partials (a
  // counter, as splitk_reduce does for the GEMMs) instead of a second kernel: no launch and no
  // reduce-kernel chain after the last split.
  if (!single) {
    __threadfence();
    __syncthreads();
    __shared__ int s_last;
    const int active = tiles > 0 ? (tiles + chunk - 1) / chunk : 1;  // split 0 runs even for an empty context
    int* ctr = a.counters + seq * gridDim.x + kvh;
    if (tid == 0) {
      s_last = atomicAdd(ctr, 1) == active - 1;
      if (s_last) *ctr = 0;  // every active split has counted: ready for the next launch
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    combine_splits<D>(a, seq * Hq + kvh * G, G, active, &so[0][0][0], sqsum,
                      [&](int r, int d, float v) { sq[r][pd(d)] = v; });
  }
  __syncthreads();
  for (int r = warp; r < G; r += NW) {  // undo the rotation, one warp a row
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = sq[r][pd(lane * E + e)];
    warp_fwht<D>(x, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane * E + e;
      a.out[tok_q * a.o_tok + (kvh * G + r) * a.o_head + d] = __float2bfloat16_rn(x[e] * a.signs[d] / D);
    }
  }
}

}  // namespace kv4

// ------------------------------------------------------------------------------------------------
// C API (pointers are device pointers; strides in elements for q/out/key/value, in bytes for the cache)
// ------------------------------------------------------------------------------------------------
KV4_API int ostq_kv4_write(const void* key, const void* value, void* cache, const int64_t* slot_mapping,
                           int num_tokens, int nkv, int head_size, long long k_tok, long long k_head,
                           long long v_tok, long long v_head, long long c_blk, long long c_slot, long long c_head,
                           int block_size, const float* signs, void* stream) {
  if (num_tokens <= 0) return 0;
  const dim3 grid((num_tokens * nkv + 3) / 4);
  auto s = static_cast<cudaStream_t>(stream);
  auto k = static_cast<const __nv_bfloat16*>(key);
  auto v = static_cast<const __nv_bfloat16*>(value);
  auto c = static_cast<uint8_t*>(cache);
  if (head_size == 128)
    kv4::write_kernel<128><<<grid, 128, 0, s>>>(k, v, c, slot_mapping, num_tokens, nkv, k_tok, k_head, v_tok, v_head,
                                                 c_blk, c_slot, c_head, block_size, signs);
  else if (head_size == 64)
    kv4::write_kernel<64><<<grid, 128, 0, s>>>(k, v, c, slot_mapping, num_tokens, nkv, k_tok, k_head, v_tok, v_head,
                                                c_blk, c_slot, c_head, block_size, signs);
  else
    return (int)cudaErrorInvalidValue;
  return (int)cudaGetLastError();
}

KV4_API void ostq_kv4_set_min_tiles(int tiles) { kv4::g_min_tiles = tiles < 1 ? 1 : tiles; }
KV4_API void ostq_kv4_set_prefetch(int tiles) { kv4::g_prefetch = tiles == 2 ? 2 : 1; }
KV4_API void ostq_kv4_set_pdl(int on) { kv4::g_pdl = on ? 1 : 0; }

KV4_API int ostq_kv4_decode(const void* q, long long q_tok, long long q_head, void* out, long long o_tok,
                            long long o_head, const void* cache, long long c_blk, long long c_slot, long long c_head,
                            const int32_t* block_table, long long bt_stride, const int32_t* seq_lens,
                            const int32_t* query_start, int num_seqs, int nkv, int group, int head_size,
                            int block_size, float softmax_scale, const float* signs, float* part_o, float* part_ml,
                            int* counters, int num_splits, int skip_multi, void* stream) {
  if (num_seqs <= 0) return 0;
  if (group < 1 || group > 16 || block_size % 16 || num_splits < 1 || num_splits > KV4_MAX_SPLITS ||
      (num_splits > 1 && !counters))
    return (int)cudaErrorInvalidValue;
  kv4::DecodeArgs a{static_cast<const __nv_bfloat16*>(q), q_tok, q_head, static_cast<__nv_bfloat16*>(out), o_tok,
                    o_head, static_cast<const uint8_t*>(cache), c_blk, c_slot, c_head, block_table, bt_stride,
                    seq_lens, query_start, group, block_size, num_splits, kv4::g_min_tiles,
                    softmax_scale / head_size * 1.4426950408889634f, signs, part_o, part_ml, counters,
                    skip_multi, kv4::g_pdl, (block_size & (block_size - 1)) == 0 ? block_size - 1 : 0};
  const dim3 grid(nkv, num_splits, num_seqs);
  const bool g16 = group > 8;
  // the shared-memory pipeline copies 8-byte chunks of the records, at 32-bit offsets within a tile
  const bool sp = kv4::g_prefetch == 2 && ((reinterpret_cast<uintptr_t>(cache) | c_blk | c_slot | c_head) & 7) == 0 &&
                  c_slot >= 0 && c_slot < (1LL << 26);
  void (*kern)(const kv4::DecodeArgs) = nullptr;
  if (head_size == 128)
    kern = g16 ? kv4::decode_kernel<128, 2, 1> : sp ? kv4::decode_kernel<128, 1, 2> : kv4::decode_kernel<128, 1, 1>;
  else if (head_size == 64)
    kern = g16 ? kv4::decode_kernel<64, 2, 1> : sp ? kv4::decode_kernel<64, 1, 2> : kv4::decode_kernel<64, 1, 1>;
  else
    return (int)cudaErrorInvalidValue;
  const auto st = static_cast<cudaStream_t>(stream);
  if (!a.pdl) {
    kern<<<grid, 128, 0, st>>>(a);
    return (int)cudaGetLastError();
  }
  return (int)launch_pdl(kern, grid, dim3(128), 0, st, a);
}

KV4_API int ostq_kv4_dequant(const void* cache, long long c_blk, long long c_slot, long long c_head,
                             const int32_t* src_blocks, const int32_t* valid, int nb, int nkv, int head_size,
                             int block_size, void* k_out,
                             void* v_out, const float* signs, void* stream) {
  if (nb <= 0) return 0;
  const dim3 grid((nb * block_size * nkv + 3) / 4);
  auto s = static_cast<cudaStream_t>(stream);
  auto c = static_cast<const uint8_t*>(cache);
  auto k = static_cast<__nv_bfloat16*>(k_out);
  auto v = static_cast<__nv_bfloat16*>(v_out);
  if (head_size == 128)
    kv4::dequant_kernel<128><<<grid, 128, 0, s>>>(c, c_blk, c_slot, c_head, src_blocks, valid, nb, nkv, block_size, k, v, signs);
  else if (head_size == 64)
    kv4::dequant_kernel<64><<<grid, 128, 0, s>>>(c, c_blk, c_slot, c_head, src_blocks, valid, nb, nkv, block_size, k, v, signs);
  else
    return (int)cudaErrorInvalidValue;
  return (int)cudaGetLastError();
}
