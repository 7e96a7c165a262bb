// Fused decode attention over packed HeadQ codes, hand-written for NVIDIA tensor cores (sm_80 and newer).
// The launch parameters shared by the kernel (decode.cu) and its torch binding (binding.cpp).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace headq {

// Query-head rows a split's partials hold (a product's n side: the most query heads a KV head may have).
constexpr int ROWS = 8;

// Warps a thread block (one split; decode.cu's TileSchedule says which tiles each computes).
constexpr int WARPS = 4;

// A warp's slots in a HEADQ_TIMELINE build's timeline: globaltimer ns of stamp k in k, its SM in 15, clock64 in 16 + k.
constexpr int STAMPS = 32;

// Every pointer is a device address; strides are in elements of the tensor they step through.
struct DecodeParams {
  const void* query;  // [B, Hq, 1, D] model dtype, unit channel stride
  int64_t s_qb, s_qh;
  const float* decoder;  // [Hkv, D, R] float32 contiguous (side code), or null
  const uint8_t* key_codes;  // [B, Hkv, T, D/4] 2-bit planes
  int64_t s_kc_b, s_kc_h;
  const void* key_scale;  // [B, Hkv, T/block, D] float16 (and key_zero)
  const void* key_zero;
  int64_t s_ks_b, s_ks_h;
  const uint8_t* side_codes;  // [B, Hkv, T, 8] 4-bit planes of 16 directions
  int64_t s_cc_b, s_cc_h;
  const void* side_scale;  // [B, Hkv, T/block, 16] float16 (and side_zero)
  const void* side_zero;
  int64_t s_cs_b, s_cs_h;
  const uint8_t* value_codes;  // [B, Hkv, T, D/4] 2-bit planes
  int64_t s_vc_b, s_vc_h;
  const void* value_scale;  // [B, Hkv, T, 1] float16 (and value_zero)
  const void* value_zero;
  int64_t s_vs_b, s_vs_h;
  const void* window_keys;  // [B, Hkv, W, D] model dtype
  int64_t s_wk_b, s_wk_h, s_wk_t;
  const void* window_values;
  int64_t s_wv_b, s_wv_h, s_wv_t;
  const void* sink_keys;  // [B, Hkv, S, D] model dtype, or null
  int64_t s_sk_b, s_sk_h, s_sk_t;
  const uint8_t* valid;  // [B, T + W] key validity, or null
  int64_t s_valid_b;
  const int64_t* lengths;  // [2] stored and window tokens on the device (a fixed-capacity cache), or null
  float* part_m;  // [B*Hkv*splits*8] each split's running max (log2 units), 8 query-head rows a split
  float* part_l;  // [B*Hkv*splits*8] normaliser
  float* part_acc;  // [B*Hkv*splits*8, D] unnormalised output
  // [B*Hkv, 2] each (sequence, KV head)'s splits finished and tiles claimed (zero between launches: the kernel
  // leaves them so)
  int* counters;
  void* out;  // [B, 1, Hq, D] model dtype, contiguous
  // [splits, B*Hkv, WARPS, STAMPS] each warp's phase stamps, or null; written only by a HEADQ_TIMELINE build
  // (decode.cu says the phases; benchmarks/cuda_decode_timeline.py reads them)
  int64_t* timeline;
  int batch, kv_heads, groups, block, n_sinks;
  uint32_t block_mul, block_shift;  // tile / block == umulhi(tile, block_mul) >> block_shift (block >= 2)
  int n_tokens, n_window, tokens_per_split, n_splits;
  float scaling, softcap;  // softcap <= 0: none
  bool claim_tiles;  // warps claim tiles at run time (faster; the last bits vary between launches), else dealt
};

// Launches the kernel (one thread block of 4 warps a split; the last split of a (sequence, KV head) merges
// them) on ``stream``; ``bf16``: the model dtype (else float16).
void launch_decode(const DecodeParams& params, bool bf16, bool side_code, cudaStream_t stream);

}  // namespace headq
