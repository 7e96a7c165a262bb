// Fused decode attention over packed HeadQ codes on tensor cores (mma.sync m16n8k16, sm_80 and newer).
//
// One warp handles one (sequence, KV head) and one split of the stored tokens, for the query heads sharing
// the KV head; the last warp of a (sequence, KV head) to finish merges the splits (no second launch).
// Covered: head dim 128, 2-bit keys with a float16 scale and zero per channel and block (a multiple of 64
// tokens), optionally a rank-16 side code of 4-bit codes with a scale and zero per direction and block,
// 2-bit values with a float16 scale and zero per token, exact sink keys, a key-validity mask, soft-capping,
// a full-precision window, lengths read from the device. Everything else runs the Triton kernel.
//
// Why it is fast: the codes go from global memory straight into tensor-core operands. A byte of a packed
// row holds channels j, m+j, 2m+j, 3m+j (plane p at bits 2p: ``quantize.pack_codes``); shifting a 32-bit
// word by 8*b + 2*p and masking 0x00030003 leaves two codes as the bit patterns of two float16 subnormals
// (code * 2^-24, exact): two instructions make one half2 operand register, no conversion, no shuffle.
// The channel order inside a product is free, so each lane takes the channels that its own loaded bytes
// hold, and the query operand follows the same order:
//   keys     S^T[t, g] = sum_c code[t, c] * (q[g, c] * scale[c]) + sum_c q[g, c] * zero[c]
//            (tokens are the product's 16 rows, the <= 8 query heads its columns; scales fold into the query
//            once per block);
//   side     the same with qW = q W against 4-bit codes, one more 16-deep step;
//   values   O^T[d, g] = sum_t code[t, d] * (p[g, t] * scale[t]) + sum_t p[g, t] * zero[t]
//            (channels are the rows: value codes of two tokens are paired by a byte permute; p comes from
//            the logits' accumulator layout by one movmatrix transpose an 8x8 tile).
// Operands are float16 with float32 accumulation: the query over its largest magnitude, p * scale over
// the largest value scale so far. The window and sinks use the model dtype, as sdpa does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "decode.h"

namespace headq {
namespace {

constexpr int D = 128;
constexpr int TILE = 64;  // tokens a loop step: four 16-row products
constexpr int ROWS = 8;  // query heads a product holds (its n side)
constexpr float LOG2E = 1.4426950408889634f;
constexpr float CODE_UNIT = 16777216.0f;  // a code k read as a float16 subnormal is k * 2^-24
constexpr uint32_t TWO_BIT = 0x00030003u;
constexpr uint32_t FOUR_BIT = 0x000F000Fu;

template <typename T>
struct ModelType;
template <>
struct ModelType<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct ModelType<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ uint32_t pack_half(float lo, float hi) { return ModelType<__half>::pack(lo, hi); }

__device__ __forceinline__ float half_at(const void* base, int64_t index) {
  return __half2float(reinterpret_cast<const __half*>(base)[index]);
}

// acc += A (16x16, row) * B (16x8, col), float16 operands.
__device__ __forceinline__ void mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same in the model dtype (the window and its exact values).
template <typename T>
__device__ __forceinline__ void mma_model(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_model<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  mma_f16(c, a0, a1, a2, a3, b0, b1);
}
template <>
__device__ __forceinline__ void mma_model<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// An 8x8 tile of 16-bit values held as the accumulator layout (lane 4r+j: row r, columns 2j, 2j+1),
// transposed in the same layout: lane 4r+j then holds column r, rows 2j, 2j+1 (an operand's k pairs).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float warp_max_rows(float x) {  // over the 8 lanes of one column pair (lane bits 2-4)
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float warp_sum_rows(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

__device__ __forceinline__ float scaled_logit(float raw, float scale, float softcap) {  // log2 units
  float s = raw * scale;
  if (softcap > 0.f) s = softcap * tanhf(s / softcap);
  return s * LOG2E;
}

// Running softmax of the (up to) two query heads g = 2j, 2j+1 a lane's accumulator columns hold.
struct Softmax {
  float max[2] = {-INFINITY, -INFINITY};  // log2 units, equal across the lanes of a column pair
  float total[2] = {0.f, 0.f};  // this lane's share of the normaliser

  // Takes the tile's logits s[mt][i] (column 2j + (i & 1)), makes them probabilities in place, returns
  // the factor each column's earlier sums must be rescaled by.
  __device__ __forceinline__ void step(float (&s)[4][4], float (&rescale)[2]) {
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) tile_max[i & 1] = fmaxf(tile_max[i & 1], s[mt][i]);
    float base[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      float m_new = fmaxf(max[k], warp_max_rows(tile_max[k]));
      base[k] = m_new == -INFINITY ? 0.f : m_new;
      rescale[k] = exp2f(max[k] - base[k]);
      max[k] = m_new;
      total[k] *= rescale[k];
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[mt][i] = exp2f(s[mt][i] - base[i & 1]);
        total[i & 1] += s[mt][i];
      }
  }
};

#ifndef HEADQ_MIN_BLOCKS
#define HEADQ_MIN_BLOCKS 1  // blocks of 4 warps an SM must hold: a register cap (255 / HEADQ_MIN_BLOCKS...)
#endif

// A lane's accumulator row (m-tile mt, half: row r or r + 8) is value channel 32 (mt / 2) + 4r + 2 (mt % 2) +
// half: plane mt / 2 of byte 2 (mt % 2) + half of the lane's 32-bit word r of a packed value row.
template <typename T, bool SIDE>
__global__ void __launch_bounds__(128, HEADQ_MIN_BLOCKS) decode_kernel(const DecodeParams p) {
  using M = ModelType<T>;
  const int lane = threadIdx.x & 31;
  const int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (item >= p.batch * p.kv_heads * p.n_splits) return;
  const int bh = item / p.n_splits, split = item - bh * p.n_splits;
  const int b = bh / p.kv_heads, h = bh - b * p.kv_heads;
  const int r = lane >> 2, j = lane & 3;
  const int G = p.groups;
  int n_tokens = p.n_tokens, n_window = p.n_window;
  if (p.lengths != nullptr) {
    n_tokens = static_cast<int>(p.lengths[0]);
    n_window = static_cast<int>(p.lengths[1]);
  }
  const T* query = reinterpret_cast<const T*>(p.query) + b * p.s_qb + h * G * p.s_qh;

  // ---- The query of head g = r (this lane's operand column) at the channels 32pp + 8j + e its key bytes hold.
  float q[4][8];
#pragma unroll
  for (int pp = 0; pp < 4; ++pp)
#pragma unroll
    for (int e = 0; e < 8; ++e) q[pp][e] = r < G ? M::to_float(query[r * p.s_qh + 32 * pp + 8 * j + e]) : 0.f;
  float norm = 0.f;
#pragma unroll
  for (int pp = 0; pp < 4; ++pp)
#pragma unroll
    for (int e = 0; e < 8; ++e) norm = fmaxf(norm, fabsf(q[pp][e]));
  norm = fmaxf(norm, __shfl_xor_sync(0xffffffffu, norm, 1));
  norm = fmaxf(norm, __shfl_xor_sync(0xffffffffu, norm, 2));

  // The side code's directions 8ps + 4u + e (e < 4) of this lane's operand, and qW there.
  const int side_u = j >> 1, side_p = j & 1;
  float qw[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (SIDE) {
    float partial[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) partial[k] = 0.f;
    const float* w = p.decoder + static_cast<int64_t>(h) * D * 16;
#pragma unroll
    for (int pp = 0; pp < 4; ++pp)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float4* row = reinterpret_cast<const float4*>(w + (32 * pp + 8 * j + e) * 16);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          float4 x = __ldg(row + v);
          partial[4 * v] += q[pp][e] * x.x;
          partial[4 * v + 1] += q[pp][e] * x.y;
          partial[4 * v + 2] += q[pp][e] * x.z;
          partial[4 * v + 3] += q[pp][e] * x.w;
        }
      }
    const int first = 8 * side_p + 4 * side_u;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      float total = partial[k] + __shfl_xor_sync(0xffffffffu, partial[k], 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      norm = fmaxf(norm, fabsf(total));
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (k == first + e) qw[e] = total;
    }
  }
  norm = norm > 0.f ? norm : 1.f;
  const float inv_norm = 1.f / norm;
#pragma unroll
  for (int pp = 0; pp < 4; ++pp)
#pragma unroll
    for (int e = 0; e < 8; ++e) q[pp][e] *= inv_norm;
#pragma unroll
  for (int e = 0; e < 4; ++e) qw[e] *= inv_norm;
  // The accumulator columns of this lane are the heads 2j and 2j + 1: their norms live on lanes 8j, 8j + 4.
  const float col_norm[2] = {__shfl_sync(0xffffffffu, norm, 8 * j), __shfl_sync(0xffffffffu, norm, 8 * j + 4)};
  const bool col_real[2] = {2 * j < G, 2 * j + 1 < G};
  const float logit_scale[2] = {p.scaling * col_norm[0] * CODE_UNIT, p.scaling * col_norm[1] * CODE_UNIT};

  const uint8_t* key_codes = p.key_codes + b * p.s_kc_b + h * p.s_kc_h + 8 * j;
  const uint8_t* side_codes = p.side_codes + b * p.s_cc_b + h * p.s_cc_h + 4 * side_u;
  const uint8_t* value_codes = p.value_codes + b * p.s_vc_b + h * p.s_vc_h + 4 * r;
  const int64_t value_meta = b * p.s_vs_b + h * p.s_vs_h;
  const uint8_t* valid = p.valid != nullptr ? p.valid + b * p.s_valid_b : nullptr;

  Softmax softmax;
  float acc[8][4];  // O^T rows value_channel(mt, i >> 1, r), columns 2j + (i & 1)
#pragma unroll
  for (int mt = 0; mt < 8; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;
  float value_bias[2] = {0.f, 0.f};  // this lane's share of sum_t p * zero
  float value_norm = 1e-30f;  // the largest value scale so far: p * scale / value_norm fits float16

  uint32_t key_operand[8][2];  // the query folded with the block's key scales (B operands by k-step)
  uint32_t side_operand[2] = {0u, 0u};
  float block_bias[2] = {0.f, 0.f};  // sum_c q zero (+ side) of the block, for columns 2j, 2j + 1

  const int start = split * p.tokens_per_split;
  const int end = min(start + p.tokens_per_split, n_tokens);
  for (int tile = start; tile < end; tile += TILE) {
    // ---- Loads first: all of the tile's codes are in flight while the block's query is folded.
    uint2 key_words[4][2];
    uint32_t side_words[4][2];
    float value_scale[4][2], value_zero[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t token = tile + 16 * mt + 8 * half + r;
        key_words[mt][half] = *reinterpret_cast<const uint2*>(key_codes + token * p.s_kc_t);
        if constexpr (SIDE) side_words[mt][half] = *reinterpret_cast<const uint32_t*>(side_codes + token * p.s_cc_t);
        value_scale[mt][half] = half_at(p.value_scale, value_meta + token * p.s_vs_t);
        value_zero[mt][half] = half_at(p.value_zero, value_meta + token * p.s_vs_t);
      }
    uint32_t value_words[4][4];  // k-step kt: tokens 16kt + 2j + {0, 1, 8, 9}, word r
#pragma unroll
    for (int kt = 0; kt < 4; ++kt)
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int64_t token = tile + 16 * kt + 2 * j + (t & 1) + 8 * (t >> 1);
        value_words[kt][t] = *reinterpret_cast<const uint32_t*>(value_codes + token * p.s_vc_t);
      }

    if (tile == start || tile % p.block == 0) {  // a new block: fold its scales into the query operands
      const int64_t meta = b * p.s_ks_b + h * p.s_ks_h + static_cast<int64_t>(tile / p.block) * p.s_ks_t;
      float bias = 0.f;
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {
        const uint4 scale_bits =
            *reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(p.key_scale) + meta + 32 * pp + 8 * j);
        const uint4 zero_bits =
            *reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(p.key_zero) + meta + 32 * pp + 8 * j);
        const __half* scale = reinterpret_cast<const __half*>(&scale_bits);
        const __half* zero = reinterpret_cast<const __half*>(&zero_bits);
        float folded[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          folded[e] = q[pp][e] * __half2float(scale[e]);
          bias += q[pp][e] * __half2float(zero[e]);
        }
        // k-step 4u + pp, slot s: channels 32pp + 8j + 4u + s (low half) and + 2 (high half)
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int s = 0; s < 2; ++s) key_operand[4 * u + pp][s] = pack_half(folded[4 * u + s], folded[4 * u + s + 2]);
      }
      if constexpr (SIDE) {
        const int64_t side_meta = b * p.s_cs_b + h * p.s_cs_h + static_cast<int64_t>(tile / p.block) * p.s_cs_t +
                                  8 * side_p + 4 * side_u;
        const uint2 scale_bits = *reinterpret_cast<const uint2*>(reinterpret_cast<const __half*>(p.side_scale) + side_meta);
        const uint2 zero_bits = *reinterpret_cast<const uint2*>(reinterpret_cast<const __half*>(p.side_zero) + side_meta);
        const __half* scale = reinterpret_cast<const __half*>(&scale_bits);
        const __half* zero = reinterpret_cast<const __half*>(&zero_bits);
#pragma unroll
        for (int e = 0; e < 4; ++e) bias += qw[e] * __half2float(zero[e]);
#pragma unroll
        for (int s = 0; s < 2; ++s)
          side_operand[s] = pack_half(qw[s] * __half2float(scale[s]), qw[s + 2] * __half2float(scale[s + 2]));
      }
      bias += __shfl_xor_sync(0xffffffffu, bias, 1);
      bias += __shfl_xor_sync(0xffffffffu, bias, 2);
      block_bias[0] = __shfl_sync(0xffffffffu, bias, 8 * j) / CODE_UNIT;  // in the products' units
      block_bias[1] = __shfl_sync(0xffffffffu, bias, 8 * j + 4) / CODE_UNIT;
    }

    // ---- Logits S^T[t, g]: keys (eight 16-deep steps) and the side code (one more).
    float s[4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[mt][i] = block_bias[i & 1];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t w0 = u ? key_words[mt][0].y : key_words[mt][0].x;  // token r
        const uint32_t w1 = u ? key_words[mt][1].y : key_words[mt][1].x;  // token r + 8
#pragma unroll
        for (int pp = 0; pp < 4; ++pp)
          mma_f16(s[mt], (w0 >> (2 * pp)) & TWO_BIT, (w1 >> (2 * pp)) & TWO_BIT, (w0 >> (8 + 2 * pp)) & TWO_BIT,
                  (w1 >> (8 + 2 * pp)) & TWO_BIT, key_operand[4 * u + pp][0], key_operand[4 * u + pp][1]);
      }
      if constexpr (SIDE) {
        const uint32_t w0 = side_words[mt][0], w1 = side_words[mt][1];
        mma_f16(s[mt], (w0 >> (4 * side_p)) & FOUR_BIT, (w1 >> (4 * side_p)) & FOUR_BIT,
                (w0 >> (8 + 4 * side_p)) & FOUR_BIT, (w1 >> (8 + 4 * side_p)) & FOUR_BIT, side_operand[0],
                side_operand[1]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = tile + 16 * mt + 8 * (i >> 1) + r;
        const int col = i & 1;
        float logit = scaled_logit(s[mt][i], logit_scale[col], p.softcap);
        if (token < p.n_sinks) {  // exact sink keys replace the codes (and the side code) there
          const T* sink = reinterpret_cast<const T*>(p.sink_keys) + b * p.s_sk_b + h * p.s_sk_h + token * p.s_sk_t;
          const T* q_row = query + (2 * j + col) * p.s_qh;
          float dot = 0.f;
          if (col_real[col])
            for (int c = 0; c < D; ++c) dot += M::to_float(q_row[c]) * M::to_float(sink[c]);
          logit = scaled_logit(dot, p.scaling, p.softcap);
        }
        const bool keep = col_real[col] && token < end && (valid == nullptr || valid[token] != 0);
        s[mt][i] = keep ? logit : -INFINITY;
      }
    float rescale[2];
    softmax.step(s, rescale);

    // ---- Values: p * scale / value_norm as float16, transposed into B operands.
    float tile_scale = 0.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) tile_scale = fmaxf(tile_scale, value_scale[mt][half]);
    const float new_norm = fmaxf(value_norm, warp_max_rows(tile_scale));
    const float norm_ratio = value_norm / new_norm;
    value_norm = new_norm;
    const float inv_value_norm = 1.f / new_norm;
    value_bias[0] *= rescale[0];
    value_bias[1] *= rescale[1];
    uint32_t p_operand[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float ps = value_scale[mt][half] * inv_value_norm;
        const float p0 = s[mt][2 * half], p1 = s[mt][2 * half + 1];
        value_bias[0] = value_bias[0] + p0 * value_zero[mt][half];
        value_bias[1] = value_bias[1] + p1 * value_zero[mt][half];
        p_operand[mt][half] = transpose8x8(pack_half(p0 * ps, p1 * ps));
      }
    const float acc_rescale[2] = {rescale[0] * norm_ratio, rescale[1] * norm_ratio};
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][i] *= acc_rescale[i & 1];
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) {
      const uint32_t lo01 = __byte_perm(value_words[kt][0], value_words[kt][1], 0x5410);
      const uint32_t hi01 = __byte_perm(value_words[kt][0], value_words[kt][1], 0x7632);
      const uint32_t lo23 = __byte_perm(value_words[kt][2], value_words[kt][3], 0x5410);
      const uint32_t hi23 = __byte_perm(value_words[kt][2], value_words[kt][3], 0x7632);
#pragma unroll
      for (int mt = 0; mt < 8; ++mt) {
        const int pp = mt >> 1;
        const uint32_t x01 = (mt & 1) ? hi01 : lo01, x23 = (mt & 1) ? hi23 : lo23;
        mma_f16(acc[mt], (x01 >> (2 * pp)) & TWO_BIT, (x01 >> (8 + 2 * pp)) & TWO_BIT, (x23 >> (2 * pp)) & TWO_BIT,
                (x23 >> (8 + 2 * pp)) & TWO_BIT, p_operand[kt][0], p_operand[kt][1]);
      }
    }
  }

  // ---- Back to plain sums of p * value.
  const float bias_total[2] = {warp_sum_rows(value_bias[0]), warp_sum_rows(value_bias[1])};
  const float value_unit = value_norm * CODE_UNIT;
#pragma unroll
  for (int mt = 0; mt < 8; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = acc[mt][i] * value_unit + bias_total[i & 1];

  // ---- The full-precision window (the last split): exact keys and values in the model dtype.
  if (split == p.n_splits - 1 && n_window > 0) {
    uint32_t q_operand[8][2];  // head g = r, channels 16kt + 2j (+1), 16kt + 2j + 8 (+9)
#pragma unroll
    for (int kt = 0; kt < 8; ++kt)
#pragma unroll
      for (int s = 0; s < 2; ++s)
        q_operand[kt][s] =
            r < G ? *reinterpret_cast<const uint32_t*>(query + r * p.s_qh + 16 * kt + 2 * j + 8 * s) : 0u;
    const T* wk = reinterpret_cast<const T*>(p.window_keys) + b * p.s_wk_b + h * p.s_wk_h;
    const T* wv = reinterpret_cast<const T*>(p.window_values) + b * p.s_wv_b + h * p.s_wv_h;
    for (int first = 0; first < n_window; first += TILE) {
      float s[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][i] = 0.f;
        const int t0 = first + 16 * mt + r, t1 = t0 + 8;
        const T* k0 = wk + t0 * p.s_wk_t;
        const T* k1 = wk + t1 * p.s_wk_t;
#pragma unroll
        for (int kt = 0; kt < 8; ++kt) {
          const int c = 16 * kt + 2 * j;
          const uint32_t a0 = t0 < n_window ? *reinterpret_cast<const uint32_t*>(k0 + c) : 0u;
          const uint32_t a1 = t1 < n_window ? *reinterpret_cast<const uint32_t*>(k1 + c) : 0u;
          const uint32_t a2 = t0 < n_window ? *reinterpret_cast<const uint32_t*>(k0 + c + 8) : 0u;
          const uint32_t a3 = t1 < n_window ? *reinterpret_cast<const uint32_t*>(k1 + c + 8) : 0u;
          mma_model<T>(s[mt], a0, a1, a2, a3, q_operand[kt][0], q_operand[kt][1]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int token = first + 16 * mt + 8 * (i >> 1) + r;
          const bool keep = col_real[i & 1] && token < n_window &&
                            (valid == nullptr || valid[n_tokens + token] != 0);
          s[mt][i] = keep ? scaled_logit(s[mt][i], p.scaling, p.softcap) : -INFINITY;
        }
      }
      float rescale[2];
      softmax.step(s, rescale);
      uint32_t p_operand[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          p_operand[mt][half] = transpose8x8(M::pack(s[mt][2 * half], s[mt][2 * half + 1]));
#pragma unroll
      for (int mt = 0; mt < 8; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][i] *= rescale[i & 1];
#pragma unroll
      for (int kt = 0; kt < 4; ++kt) {
        uint2 v[4];  // tokens 16kt + 2j + {0, 1, 8, 9}, channels 32pp + 4r ... + 3
#pragma unroll
        for (int pp = 0; pp < 4; ++pp) {
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const int token = first + 16 * kt + 2 * j + (t & 1) + 8 * (t >> 1);
            v[t] = token < n_window ? *reinterpret_cast<const uint2*>(wv + token * p.s_wv_t + 32 * pp + 4 * r)
                                    : make_uint2(0u, 0u);
          }
#pragma unroll
          for (int odd = 0; odd < 2; ++odd) {
            const uint32_t x0 = odd ? v[0].y : v[0].x, x1 = odd ? v[1].y : v[1].x;
            const uint32_t x2 = odd ? v[2].y : v[2].x, x3 = odd ? v[3].y : v[3].x;
            mma_model<T>(acc[2 * pp + odd], __byte_perm(x0, x1, 0x5410), __byte_perm(x0, x1, 0x7632),
                         __byte_perm(x2, x3, 0x5410), __byte_perm(x2, x3, 0x7632), p_operand[kt][0],
                         p_operand[kt][1]);
          }
        }
      }
    }
  }

  // ---- Write: the output directly (one split), or this split's partials, merged by the last split.
  const float total[2] = {warp_sum_rows(softmax.total[0]), warp_sum_rows(softmax.total[1])};
  T* out = reinterpret_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.kv_heads + h) * G * D;
  if (p.n_splits == 1) {
#pragma unroll
    for (int col = 0; col < 2; ++col) {
      if (!col_real[col]) continue;
      const float inv = total[col] > 0.f ? 1.f / total[col] : 0.f;
#pragma unroll
      for (int pp = 0; pp < 4; ++pp) {
        uint2 packed;
        packed.x = M::pack(acc[2 * pp][col] * inv, acc[2 * pp][2 + col] * inv);
        packed.y = M::pack(acc[2 * pp + 1][col] * inv, acc[2 * pp + 1][2 + col] * inv);
        *reinterpret_cast<uint2*>(out + (2 * j + col) * D + 32 * pp + 4 * r) = packed;
      }
    }
    return;
  }
#pragma unroll
  for (int col = 0; col < 2; ++col) {
    const int row = item * ROWS + 2 * j + col;
    if (r == 0) {
      p.part_m[row] = softmax.max[col];
      p.part_l[row] = total[col];
    }
#pragma unroll
    for (int pp = 0; pp < 4; ++pp)
      *reinterpret_cast<float4*>(p.part_acc + static_cast<int64_t>(row) * D + 32 * pp + 4 * r) =
          make_float4(acc[2 * pp][col], acc[2 * pp][2 + col], acc[2 * pp + 1][col], acc[2 * pp + 1][2 + col]);
  }
  __threadfence();
  __syncwarp();
  int arrived = 0;
  if (lane == 0) arrived = atomicAdd(p.counters + bh, 1);
  arrived = __shfl_sync(0xffffffffu, arrived, 0);
  if (arrived != p.n_splits - 1) return;
  __threadfence();
  // The last split of this (sequence, KV head): merge all of them, four channels a lane.
  const int first_row = bh * p.n_splits * ROWS;
  for (int g = 0; g < G; ++g) {
    float top = -INFINITY;
    for (int sp = lane; sp < p.n_splits; sp += 32) top = fmaxf(top, __ldcg(p.part_m + first_row + sp * ROWS + g));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
    top = top == -INFINITY ? 0.f : top;
    float norm_sum = 0.f;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int sp = 0; sp < p.n_splits; ++sp) {
      const int row = first_row + sp * ROWS + g;
      const float weight = exp2f(__ldcg(p.part_m + row) - top);
      norm_sum += weight * __ldcg(p.part_l + row);
      const float4 x = __ldcg(reinterpret_cast<const float4*>(p.part_acc + static_cast<int64_t>(row) * D) + lane);
      sum.x += weight * x.x;
      sum.y += weight * x.y;
      sum.z += weight * x.z;
      sum.w += weight * x.w;
    }
    const float inv = norm_sum > 0.f ? 1.f / norm_sum : 0.f;
    uint2 packed;
    packed.x = M::pack(sum.x * inv, sum.y * inv);
    packed.y = M::pack(sum.z * inv, sum.w * inv);
    *reinterpret_cast<uint2*>(out + g * D + 4 * lane) = packed;
  }
  if (lane == 0) p.counters[bh] = 0;  // ready for the next launch
}

}  // namespace

void launch_decode(const DecodeParams& params, bool bf16, bool side_code, int warps_per_block, cudaStream_t stream) {
  const int items = params.batch * params.kv_heads * params.n_splits;
  const dim3 grid((items + warps_per_block - 1) / warps_per_block);
  const dim3 block(32 * warps_per_block);
  if (bf16) {
    if (side_code)
      decode_kernel<__nv_bfloat16, true><<<grid, block, 0, stream>>>(params);
    else
      decode_kernel<__nv_bfloat16, false><<<grid, block, 0, stream>>>(params);
  } else {
    if (side_code)
      decode_kernel<__half, true><<<grid, block, 0, stream>>>(params);
    else
      decode_kernel<__half, false><<<grid, block, 0, stream>>>(params);
  }
}

}  // namespace headq
