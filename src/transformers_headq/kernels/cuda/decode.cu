// Fused decode attention over packed HeadQ codes on tensor cores (mma.sync m16n8k16, sm_80 and newer).
//
// A thread block of four warps handles one (sequence, KV head) and one split, for the query heads sharing the KV
// head: its warps claim the (sequence, KV head)'s tiles at run time (``TileSchedule``; or take the split's own tiles
// in turn) and combine through shared memory; the last split of a (sequence, KV head) to finish merges the splits
// (no second launch).
// Covered: head dim 128, 2-bit keys with a float16 scale and zero per channel and block (a multiple of 64
// tokens), optionally a rank-16 side code of 4-bit codes with a scale and zero per direction and block,
// 2-bit values with a float16 scale and zero per token, up to 16 exact sink keys, a key-validity mask,
// soft-capping, a full-precision window, lengths read from the device. Everything else runs the Triton kernel.
//
// Why it is fast: each warp copies its next STAGES - 1 tiles (codes, scales, zeros: 5.4 KB each) into shared memory
// while it computes the current one (Hopper: nine bulk copies a tile from one lane; before: cp.async from every lane;
// the first copies start before the prologue, whose query and qW loads are shared by the block), and the codes go from
// there straight into tensor-core operands. A byte of a packed row holds channels j, m+j, 2m+j, 3m+j (plane p at
// bits 2p: ``quantize.pack_codes``); shifting a 32-bit
// word by 8*b + 2*p and masking 0x00030003 leaves two codes as the bit patterns of two float16 subnormals (code
// * 2^-24, exact): at most two instructions make one half2 operand register, no conversion, no shuffle (mostly
// one: plane p masked in place is code * 4^p; keys and side code divide their query operand by that, values undo
// it on their accumulator rows at the end).
// The channel order inside a product is free, so each lane takes the channels that its own loaded bytes
// hold, and the query operand follows the same order:
//   keys     S^T[t, g] = sum_c code[t, c] * (q[g, c] * scale[c]) + sum_c q[g, c] * zero[c]
//            (tokens are the product's 16 rows, the <= 8 query heads its columns; scales fold into the query
//            once a tile, the zeros' term is one more product with the zeros as every row);
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
constexpr float LOG2E = 1.4426950408889634f;
constexpr float CODE_UNIT = 16777216.0f;  // a code k read as a float16 subnormal is k * 2^-24
constexpr int KEY_ROW = D / 4;  // bytes of a packed 2-bit row (keys and values): rows are contiguous
constexpr int SIDE_RANK = 16;  // side-code directions
constexpr int SIDE_ROW = SIDE_RANK / 2;  // bytes of a packed 4-bit side-code row
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

// The query of head g = r (a B operand's column) in the model dtype: k-step kt holds channels 16kt + 2j (+1) and
// 16kt + 2j + 8 (+9), as the A operands of exact keys below hold them.
template <typename T>
__device__ __forceinline__ void exact_query_operand(uint32_t (&q)[8][2], const T* query, int64_t s_qh, int G, int r,
                                                    int j) {
#pragma unroll
  for (int kt = 0; kt < 8; ++kt)
#pragma unroll
    for (int s = 0; s < 2; ++s)
      q[kt][s] = r < G ? *reinterpret_cast<const uint32_t*>(query + r * s_qh + 16 * kt + 2 * j + 8 * s) : 0u;
}

// S^T[t, g] of 16 exact keys in the model dtype (rows t = first + r and first + r + 8 of ``keys``, those below
// ``count`` real, the others zero) against the query operand: one product a 16-channel step, all loads at once.
template <typename T>
__device__ __forceinline__ void exact_key_product(float (&s)[4], const T* keys, int64_t stride, int first, int count,
                                                  int r, int j, const uint32_t (&q)[8][2]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) s[i] = 0.f;
  const int t0 = first + r, t1 = t0 + 8;
  const T* k0 = keys + t0 * stride;
  const T* k1 = keys + t1 * stride;
#pragma unroll
  for (int kt = 0; kt < 8; ++kt) {
    const int c = 16 * kt + 2 * j;
    const uint32_t a0 = t0 < count ? *reinterpret_cast<const uint32_t*>(k0 + c) : 0u;
    const uint32_t a1 = t1 < count ? *reinterpret_cast<const uint32_t*>(k1 + c) : 0u;
    const uint32_t a2 = t0 < count ? *reinterpret_cast<const uint32_t*>(k0 + c + 8) : 0u;
    const uint32_t a3 = t1 < count ? *reinterpret_cast<const uint32_t*>(k1 + c + 8) : 0u;
    mma_model<T>(s, a0, a1, a2, a3, q[kt][0], q[kt][1]);
  }
}

// 1/x by the special-function unit alone (x a positive normal number: no IEEE rounding fix-up branch).
__device__ __forceinline__ float rcp_fast(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 2^x by the special-function unit alone (flushing results below 2^-126 to zero, as softmax weights may be):
// exp2f adds a range test and two multiplies for subnormal results, 48 instructions a tile.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
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

// Logits s[mt][i] (token 16 mt + 8 (i >> 1) + r of ``valid``) of tokens marked invalid become -inf. Only padded
// batches pass a validity mask: a branch the warp takes as one, not loads and selects every tile.
__device__ __forceinline__ void mask_invalid(float (&s)[4][4], const uint8_t* valid, int r) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (valid[16 * mt + 8 * (i >> 1) + r] == 0) s[mt][i] = -INFINITY;
}

template <bool SOFTCAP>
__device__ __forceinline__ float scaled_logit(float raw, float scale, float softcap) {  // log2 units
  float s = raw * scale;
  if constexpr (SOFTCAP) s = softcap * tanhf(s * __frcp_rn(softcap));
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
      const float m_new = fmaxf(max[k], warp_max_rows(tile_max[k]));
      base[k] = m_new == -INFINITY ? 0.f : m_new;
      rescale[k] = exp2_fast(max[k] - base[k]);
      max[k] = m_new;
      total[k] *= rescale[k];
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[mt][i] = exp2_fast(s[mt][i] - base[i & 1]);
        total[i & 1] += s[mt][i];
      }
  }
};

// The pair (h[s], h[s + 2]) for s = 0, 1 of four float16 values h[0..3] held in two 32-bit words w0, w1.
__device__ __forceinline__ uint32_t spread_pair(uint32_t w0, uint32_t w1, int s) {
  return __byte_perm(w0, w1, s ? 0x7632 : 0x5410);
}

// Counts one more finished split of a (sequence, KV head) and returns the count before it: an acquire-release atomic
// at GPU scope (the caller's barrier before it makes the block's writes its own, so they are released with it).
__device__ __forceinline__ int count_split(int* counter) {
  int before;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(before) : "l"(counter) : "memory");
  return before;
}

// One tile's stored bytes as global memory holds them, staged in shared memory by asynchronous 16-byte
// copies (cp.async) STAGES - 1 tiles ahead of the products, so that a warp always has loads in flight.
struct Stage {
  uint8_t keys[TILE * KEY_ROW];
  uint8_t values[TILE * KEY_ROW];
  uint8_t side[TILE * SIDE_ROW];
  __half value_scale[TILE], value_zero[TILE];
  __half key_scale[D], key_zero[D];  // the tile's block row
  __half side_scale[SIDE_RANK], side_zero[SIDE_RANK];
};
static_assert(sizeof(Stage) % 16 == 0, "stages are copied in 16-byte chunks");

// A warp's output of its tiles, for the block's combine. A lane's value accumulator row (m-tile mt, half: row
// r or r + 8) is value channel 32 (mt / 2) + 4r + 2 (mt % 2) + half: plane mt / 2 of byte 2 (mt % 2) + half of
// the lane's 32-bit word r of a packed value row.
struct SplitState {
  float m[ROWS], l[ROWS], acc[ROWS][D];
};

#ifndef HEADQ_STAGES
#define HEADQ_STAGES 2  // tiles a warp has in shared memory: the one it computes and STAGES - 1 in flight
#endif
constexpr int STAGES = HEADQ_STAGES;
static_assert(STAGES >= 2, "a warp computes one tile while the next is copied");

union WarpSpace {  // the stages while the warp loops over tiles, its output after
  Stage stage[STAGES];
  SplitState state;
};
constexpr int SHARED_BYTES = WARPS * sizeof(WarpSpace);  // dynamic shared memory a block (over 48 KB for 3 stages)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HEADQ_BULK_COPIES 1  // Hopper and newer: the TMA engine's bulk copies
#else
#define HEADQ_BULK_COPIES 0
#endif

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if !HEADQ_BULK_COPIES  // Ampere's asynchronous copies: 16 bytes a lane, grouped per tile
__device__ __forceinline__ void copy16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src));
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void copies_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}
#endif

// Hopper's bulk copies: ``bytes`` (a multiple of 16, both ends 16-byte aligned) in one instruction, counted on the
// mbarrier at ``ready`` as they land.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint32_t ready) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          shared_address(dst)),
      "l"(src), "r"(bytes), "r"(ready)
      : "memory");
}

// The global rows of one (sequence, KV head) that a tile is staged from.
struct StoredRows {
  const uint8_t *keys, *values, *side;
  const __half *value_scale, *value_zero, *key_scale, *key_zero, *side_scale, *side_zero;

  // Ampere: the copies of tile ``tile`` (block row ``block_row``) into ``stage``: 340 chunks, 10-12 a lane.
  template <bool SIDE>
  __device__ __forceinline__ void fetch(Stage& stage, int tile, int block_row, int lane) const {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int chunk = 16 * (lane + 32 * k);
      copy16(stage.keys + chunk, keys + tile * KEY_ROW + chunk);
      copy16(stage.values + chunk, values + tile * KEY_ROW + chunk);
    }
    if constexpr (SIDE) copy16(stage.side + 16 * lane, side + tile * SIDE_ROW + 16 * lane);
    if (lane < 8)
      copy16(stage.value_scale + 8 * lane, value_scale + tile + 8 * lane);
    else if (lane < 16)
      copy16(stage.value_zero + 8 * (lane - 8), value_zero + tile + 8 * (lane - 8));
    else
      copy16(stage.key_scale + 8 * (lane - 16), key_scale + block_row * D + 8 * (lane - 16));
    if (lane < 16) {
      copy16(stage.key_zero + 8 * lane, key_zero + block_row * D + 8 * lane);
    } else if constexpr (SIDE) {
      if (lane < 18)
        copy16(stage.side_scale + 8 * (lane - 16), side_scale + block_row * SIDE_RANK + 8 * (lane - 16));
      else if (lane < 20)
        copy16(stage.side_zero + 8 * (lane - 18), side_zero + block_row * SIDE_RANK + 8 * (lane - 18));
    }
  }

  // Hopper: the same tile by one lane, nine bulk copies (rows are contiguous), counted on the mbarrier ``ready``.
  template <bool SIDE>
  __device__ __forceinline__ void fetch_bulk(Stage& stage, int tile, int block_row, uint32_t ready) const {
    bulk_copy(stage.keys, keys + tile * KEY_ROW, sizeof(stage.keys), ready);
    bulk_copy(stage.values, values + tile * KEY_ROW, sizeof(stage.values), ready);
    bulk_copy(stage.value_scale, value_scale + tile, sizeof(stage.value_scale), ready);
    bulk_copy(stage.value_zero, value_zero + tile, sizeof(stage.value_zero), ready);
    bulk_copy(stage.key_scale, key_scale + block_row * D, sizeof(stage.key_scale), ready);
    bulk_copy(stage.key_zero, key_zero + block_row * D, sizeof(stage.key_zero), ready);
    if constexpr (SIDE) {
      bulk_copy(stage.side, side + tile * SIDE_ROW, sizeof(stage.side), ready);
      bulk_copy(stage.side_scale, side_scale + block_row * SIDE_RANK, sizeof(stage.side_scale), ready);
      bulk_copy(stage.side_zero, side_zero + block_row * SIDE_RANK, sizeof(stage.side_zero), ready);
    }
  }
};

// A warp's tiles on their way from global to shared memory, STAGES - 1 tiles ahead of its products.
// Hopper and newer: one lane issues a tile's bulk copies, which count their bytes on the stage's mbarrier, and the
// warp waits for the barrier's phase. Against cp.async (11 copies a tile, each with its address and three NOPs ptxas
// sets beside it) this takes 9 copies from one lane, each in the short loop ptxas makes to move its operands into
// uniform registers. Ampere: every lane's cp.async copies, one commit group a tile.
template <bool SIDE>
struct TileCopies {
  static constexpr uint32_t BYTES =  // what a tile's copies bring (the barrier's transaction count)
      sizeof(Stage) - (SIDE ? 0 : sizeof(Stage::side) + sizeof(Stage::side_scale) + sizeof(Stage::side_zero));
  uint32_t ready;  // shared-memory address of STAGES + 1 8-byte mbarriers (bulk copies; the last the prologue's)

  __device__ __forceinline__ explicit TileCopies(uint64_t* barriers, int lane) : ready(shared_address(barriers)) {
#if HEADQ_BULK_COPIES
    if (lane == 0) {
#pragma unroll
      for (int s = 0; s <= STAGES; ++s)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(ready + 8 * s) : "memory");
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // seen by the copy engine
    }
    __syncwarp();
#endif
  }

  // Starts the copies of ``tile`` into ``stage`` (slot ``slot``); ``real`` false: nothing to copy (cp.async still
  // counts a group, so that waiting stays in step).
  __device__ __forceinline__ void issue(const StoredRows& rows, Stage& stage, int slot, int tile, int block_row,
                                        bool real, int lane) {
#if HEADQ_BULK_COPIES
    if (real && lane == 0) {
      const uint32_t barrier = ready + 8 * slot;
      // The warp's reads of this stage (ordered by the caller's __syncwarp) come before the engine's writes.
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier), "r"(BYTES) : "memory");
      rows.fetch_bulk<SIDE>(stage, tile, block_row, barrier);
    }
#else
    if (real) rows.fetch<SIDE>(stage, tile, block_row, lane);
    copies_commit();
#endif
  }

  // Blocks until the tile of loop step ``step`` (the oldest issued) has landed in its slot, step % STAGES: the
  // slot's barrier then completes its phase step / STAGES.
  __device__ __forceinline__ void wait(int step) {
#if HEADQ_BULK_COPIES
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra WAIT;\n}\n" ::"r"(
            ready + 8 * (step % STAGES)),
        "r"((step / STAGES) & 1)
        : "memory");
#else
    copies_wait<STAGES - 1>();
#endif
    __syncwarp();
  }

#if HEADQ_BULK_COPIES
  // One bulk copy of ``bytes`` the prologue reads once (by lane 0; counted on barrier STAGES), and its wait.
  __device__ __forceinline__ void issue_once(void* dst, const void* src, uint32_t bytes, int lane) {
    if (lane == 0) {
      const uint32_t barrier = ready + 8 * STAGES;
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(barrier), "r"(bytes) : "memory");
      bulk_copy(dst, src, bytes, barrier);
    }
  }
  __device__ __forceinline__ void wait_once() {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_ONCE:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n@!done bra "
        "WAIT_ONCE;\n}\n" ::"r"(ready + 8 * STAGES)
        : "memory");
    __syncwarp();
  }
#endif

  // No copies are in flight after this (the stages' memory is reused).
  __device__ __forceinline__ void drain() {
#if !HEADQ_BULK_COPIES
    copies_wait<0>();
#endif
    __syncwarp();
  }
};

// Which tiles a warp computes. Claimed (``claim_tiles``): each warp's first tile is fixed (warp w of split s: tile
// WARPS s + w, so tile 0 and its sinks are split 0's warp 0's), and the others are taken from its (sequence, KV
// head)'s claim counter as the warp gets to them. An SM runs the blocks it got first ahead of its later ones (on the
// H200 an SM's three blocks of equal splits end at 57, 64 and 70 us of 75: records/cuda-decode-session13-h200.md),
// so fixed splits leave the early ones idle at the end; claimed tiles keep every warp busy until the last tile, and a
// fixed-capacity cache holding fewer tokens than its capacity spreads them over all splits. Which warp sums a tile
// then changes between launches, and the output's last bits with it. Dealt (torch.use_deterministic_algorithms, and
// launches of one split a (sequence, KV head), where only one block's warps would share tiles: 2% slower claimed at
// 32k x 32): the split's own tiles round-robin to its warps, the same sums every launch.
struct TileSchedule {
  int limit;  // tiles starting at or past this token are not computed
  int start;  // the first tile (first token) of the block's warp 0
  int claimed_from;  // claimed: the first token of claim 0; dealt: -1

  __device__ __forceinline__ TileSchedule(const DecodeParams& p, int split, int n_tokens) {
    if (p.claim_tiles && p.n_splits > 1) {
      limit = n_tokens;
      start = split * WARPS * TILE;
      claimed_from = p.n_splits * WARPS * TILE;
    } else {
      start = split * p.tokens_per_split;
      limit = min(start + p.tokens_per_split, n_tokens);
      claimed_from = -1;
    }
  }

  __device__ __forceinline__ int first(int warp) const { return start + TILE * warp; }

  // Lane 0 claims the tile to follow ``previous`` (its ticket, read by ``after`` a loop step later, so that the
  // atomic's round trip hides behind a tile's products), if ``previous`` is computed at all: every claimed tile is
  // then computed. The other lanes' tickets are unused.
  __device__ __forceinline__ int claim(const DecodeParams& p, int bh, int previous, int lane) const {
    // An increment that wraps at 2^31 - 1 (never reached: the launch resets it), not an add: ptxas turns a one-lane
    // add (or an increment wrapping at 2^32 - 1, the same thing) into a warp-aggregated atomic whose result it
    // shuffles at once, and the warp waited for the atomic's round trip every tile (10% slower at 32k x 32).
    uint32_t ticket = 0;
    if (claimed_from >= 0 && previous < limit && lane == 0)
      asm volatile("atom.relaxed.gpu.global.inc.u32 %0, [%1], %2;\n"
                   : "=r"(ticket)
                   : "l"(p.counters + 2 * bh + 1), "r"(0x7fffffffu));
    return static_cast<int>(ticket);
  }

  // The tile after ``previous``: the next dealt one, or the claimed one (``ticket`` from lane 0); at or past the
  // limit once ``previous`` is (a warp claims nothing more then). ``previous`` is the same across the warp.
  __device__ __forceinline__ int after(int previous, int ticket) const {
    if (claimed_from < 0) return previous + TILE * WARPS;
    if (previous >= limit) return previous;
    return claimed_from + TILE * __shfl_sync(0xffffffffu, ticket, 0);
  }
};

#ifndef HEADQ_BLOCKS_PER_SM
#define HEADQ_BLOCKS_PER_SM 3  // thread blocks an SM holds: caps registers (3: 168 a thread), sets the splits
#endif

// Phase stamps of each warp (a HEADQ_TIMELINE build only): where a launch's time goes between its blocks' start,
// prologue, tile loop, window, combine and merge. 0: entry, 1: the rows' barrier passed, 2: the first copies issued,
// 3: the query loaded, 4: qW done, 5: the loop starts (sinks done), 6: loop done, 7: window done, 8: partials written,
// 9: merge starts (the last split), 10: merge done. HEADQ_STAMP_AFTER(k, x): once x is computed.
#if HEADQ_TIMELINE
#define HEADQ_STAMP(k) stamp(p, warp, lane, k, 0.f)
#define HEADQ_STAMP_AFTER(k, x) stamp(p, warp, lane, k, x)
__device__ __forceinline__ void stamp(const DecodeParams& p, int warp, int lane, int k, float after) {
  if (p.timeline == nullptr || lane != 0) return;
  const int64_t block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  int64_t* slot = p.timeline + (block * WARPS + warp) * STAMPS;
  uint64_t now, cycles;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now) : "f"(after));
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(cycles));
  slot[k] = static_cast<int64_t>(now);
  slot[16 + k] = static_cast<int64_t>(cycles);
  if (k == 0) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    slot[15] = sm;
  }
}
#else
#define HEADQ_STAMP(k)
#define HEADQ_STAMP_AFTER(k, x)
#endif

template <typename T, bool SIDE, bool SOFTCAP>
__global__ void __launch_bounds__(WARPS * 32, HEADQ_BLOCKS_PER_SM) decode_kernel(const DecodeParams p) {
  using M = ModelType<T>;
  extern __shared__ __align__(16) uint8_t shared_bytes[];
  WarpSpace* space = reinterpret_cast<WarpSpace*>(shared_bytes);
  __shared__ int last_split;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  HEADQ_STAMP(0);
  const int bh = blockIdx.x, split = blockIdx.y;  // (sequence, KV head), split: read again where needed, never spilled
  const int b = bh / p.kv_heads, h = bh - b * p.kv_heads;
  const int r = lane >> 2, j = lane & 3;
  const int G = p.groups;
  int n_tokens = p.n_tokens, n_window = p.n_window;
  if (p.lengths != nullptr) {
    n_tokens = static_cast<int>(p.lengths[0]);
    n_window = static_cast<int>(p.lengths[1]);
  }
  const T* query = reinterpret_cast<const T*>(p.query) + b * p.s_qb + h * G * p.s_qh;
  const TileSchedule schedule(p, split, n_tokens);
  // ---- The first tiles' copies start now: they fly while the prologue reads the query and computes qW. The
  // rows' addresses live in shared memory (read at each fetch), not in 18 registers through the loop.
  __shared__ StoredRows rows_shared;
  if (threadIdx.x == 0) rows_shared = StoredRows{
      p.key_codes + b * p.s_kc_b + h * p.s_kc_h,
      p.value_codes + b * p.s_vc_b + h * p.s_vc_h,
      p.side_codes + b * p.s_cc_b + h * p.s_cc_h,
      reinterpret_cast<const __half*>(p.value_scale) + b * p.s_vs_b + h * p.s_vs_h,
      reinterpret_cast<const __half*>(p.value_zero) + b * p.s_vs_b + h * p.s_vs_h,
      reinterpret_cast<const __half*>(p.key_scale) + b * p.s_ks_b + h * p.s_ks_h,
      reinterpret_cast<const __half*>(p.key_zero) + b * p.s_ks_b + h * p.s_ks_h,
      reinterpret_cast<const __half*>(p.side_scale) + b * p.s_cs_b + h * p.s_cs_h,
      reinterpret_cast<const __half*>(p.side_zero) + b * p.s_cs_b + h * p.s_cs_h,
  };
  __syncthreads();
  const StoredRows& stored = rows_shared;
  HEADQ_STAMP(1);
  const auto block_row = [&p](int tile) { return static_cast<int>(__umulhi(tile, p.block_mul) >> p.block_shift); };
  WarpSpace& own = space[warp];
  __shared__ uint64_t stage_ready[WARPS][STAGES + 1];
  TileCopies<SIDE> copies(stage_ready[warp], lane);
  // ---- The prologue's own reads go first, so that their round trips overlap each other and do not queue behind
  // the tiles': the rows of W this warp multiplies the query by (channels 32 warp ... + 31, 2 KB: Hopper copies them
  // into the warp's last stage, which no tile fills before loop step 0), and the query of head g = r (this lane's
  // operand column) at the channels 32pp + 8j + e its key bytes hold (16-byte loads).
  const float* w_rows = nullptr;
  if constexpr (SIDE) {
    const float* global_rows = p.decoder + (static_cast<int64_t>(h) * D + 32 * warp) * SIDE_RANK;
#if HEADQ_BULK_COPIES
    w_rows = reinterpret_cast<const float*>(&own.stage[STAGES - 1]);
    copies.issue_once(&own.stage[STAGES - 1], global_rows, 32 * SIDE_RANK * sizeof(float), lane);
#else
    w_rows = global_rows;
#endif
  }
  uint4 query_bits[4];
#pragma unroll
  for (int pp = 0; pp < 4; ++pp)
    query_bits[pp] =
        r < G ? *reinterpret_cast<const uint4*>(query + r * p.s_qh + 32 * pp + 8 * j) : make_uint4(0u, 0u, 0u, 0u);
  int upcoming[STAGES];  // the tiles (first tokens) of loop steps step .. step + STAGES - 1, the last not yet issued
  upcoming[0] = schedule.first(warp);
#pragma unroll
  for (int k = 1; k < STAGES - 1; ++k)
    upcoming[k] = schedule.after(upcoming[k - 1], schedule.claim(p, bh, upcoming[k - 1], lane));
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k)
    copies.issue(stored, own.stage[k], k, upcoming[k], block_row(upcoming[k]), upcoming[k] < schedule.limit, lane);
  int ticket = schedule.claim(p, bh, upcoming[STAGES - 2], lane);  // the tile after them, read a step later

  HEADQ_STAMP(2);
  // ---- The query over its largest magnitude (and that of qW), as float16 pairs (e, e + 2) for e = 4u + s.
  float q[4][8];
#pragma unroll
  for (int pp = 0; pp < 4; ++pp) {
    const T* x = reinterpret_cast<const T*>(&query_bits[pp]);
#pragma unroll
    for (int e = 0; e < 8; ++e) q[pp][e] = M::to_float(x[e]);
  }
  float norm = 0.f;
#pragma unroll
  for (int pp = 0; pp < 4; ++pp)
#pragma unroll
    for (int e = 0; e < 8; ++e) norm = fmaxf(norm, fabsf(q[pp][e]));
  HEADQ_STAMP_AFTER(3, norm);
  // The side code's directions 8ps + 4u + e (e < 4) of this lane's operand (ps = j & 1, u = j >> 1), and qW there:
  // once a block, each warp a quarter of the channels (32 warp + 8j + e), summed through shared memory.
  const int side_u = j >> 1, side_p = j & 1;
  float qw[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (SIDE) {
    __shared__ float4 qw_shared[WARPS][ROWS][4];  // [warp][head][lane j]: directions 8 (j & 1) + 4 (j >> 1) + e
    float own_q[8];  // q[warp][e], by selects (a register array takes no run-time index)
#pragma unroll
    for (int e = 0; e < 8; ++e)
      own_q[e] = warp == 0 ? q[0][e] : warp == 1 ? q[1][e] : warp == 2 ? q[2][e] : q[3][e];
    float partial[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) partial[k] = 0.f;
#if HEADQ_BULK_COPIES
    copies.wait_once();
#endif
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float4* row = reinterpret_cast<const float4*>(w_rows + (8 * j + e) * SIDE_RANK);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float4 x = row[v];
        partial[4 * v] += own_q[e] * x.x;
        partial[4 * v + 1] += own_q[e] * x.y;
        partial[4 * v + 2] += own_q[e] * x.z;
        partial[4 * v + 3] += own_q[e] * x.w;
      }
    }
    // Sum over the 4 lanes of head r, each keeping the 4 directions its operand needs (8 + 4 shuffles).
    float half_sum[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float keep = side_p ? partial[8 + k] : partial[k], send = side_p ? partial[k] : partial[8 + k];
      half_sum[k] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float keep = side_u ? half_sum[4 + k] : half_sum[k], send = side_u ? half_sum[k] : half_sum[4 + k];
      qw[k] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
    }
    qw_shared[warp][r][j] = make_float4(qw[0], qw[1], qw[2], qw[3]);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; ++k) qw[k] = 0.f;
#pragma unroll
    for (int other = 0; other < WARPS; ++other) {
      const float4 x = qw_shared[other][r][j];
      qw[0] += x.x;
      qw[1] += x.y;
      qw[2] += x.z;
      qw[3] += x.w;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) norm = fmaxf(norm, fabsf(qw[e]));
  }
  norm = fmaxf(norm, __shfl_xor_sync(0xffffffffu, norm, 1));
  norm = fmaxf(norm, __shfl_xor_sync(0xffffffffu, norm, 2));
  HEADQ_STAMP_AFTER(4, norm);
  norm = norm > 0.f ? norm : 1.f;
  const float inv_norm = __frcp_rn(norm);
  uint32_t q_pair[4][2][2];  // [pp][u][s]: channels 32pp + 8j + 4u + s and + 2
#pragma unroll
  for (int pp = 0; pp < 4; ++pp)
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int s = 0; s < 2; ++s)
        q_pair[pp][u][s] = pack_half(q[pp][4 * u + s] * inv_norm, q[pp][4 * u + s + 2] * inv_norm);
  uint32_t qw_pair[2] = {pack_half(qw[0] * inv_norm, qw[2] * inv_norm), pack_half(qw[1] * inv_norm, qw[3] * inv_norm)};
  // The accumulator columns of this lane are the heads 2j and 2j + 1: their norms live on lanes 8j, 8j + 4.
  const float col_norm[2] = {__shfl_sync(0xffffffffu, norm, 8 * j), __shfl_sync(0xffffffffu, norm, 8 * j + 4)};
  const float logit_scale[2] = {p.scaling * col_norm[0], p.scaling * col_norm[1]};
  const float log2_scale[2] = {logit_scale[0] * LOG2E, logit_scale[1] * LOG2E};
  const float code_scale[2] = {log2_scale[0] * CODE_UNIT, log2_scale[1] * CODE_UNIT};

  // ---- Exact logits of the sink slots (the first n_sinks <= 16 stored tokens: m-tile 0 of tile 0), by one
  // 16-token product in the model dtype (as sdpa computes them).
  // Kept in shared memory until the first tile, not in 4 registers through the loop.
  __shared__ float4 sink_logits[32];
  const bool has_sinks = p.n_sinks > 0 && upcoming[0] == 0 && schedule.limit > 0;  // tile 0 is always warp 0's
  if (has_sinks) {
    uint32_t q_exact[8][2];
    exact_query_operand<T>(q_exact, query, p.s_qh, G, r, j);
    const T* sinks = reinterpret_cast<const T*>(p.sink_keys) + b * p.s_sk_b + h * p.s_sk_h;
    float logit[4];
    exact_key_product<T>(logit, sinks, p.s_sk_t, 0, p.n_sinks, r, j, q_exact);
#pragma unroll
    for (int i = 0; i < 4; ++i) logit[i] = scaled_logit<SOFTCAP>(logit[i], p.scaling, p.softcap);
    sink_logits[lane] = make_float4(logit[0], logit[1], logit[2], logit[3]);
  }

  Softmax softmax;
  float acc[8][4];  // O^T rows (value channels, see SplitState), columns 2j + (i & 1)
#pragma unroll
  for (int mt = 0; mt < 8; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;
  float value_bias[2] = {0.f, 0.f};  // this lane's share of sum_t p * zero
  float value_norm = 1e-30f;  // the largest value scale so far: p * scale / value_norm fits float16

  HEADQ_STAMP(5);
  // Step k computes the tile in stage k % STAGES; the stage before it (done) takes the tile STAGES - 1 ahead, whose
  // claim was made a step ago (its atomic's round trip hidden behind that step's products). The next claim goes
  // after the copies: their proxy fence would otherwise wait for the atomic to return.
  for (int step = 0; upcoming[0] < schedule.limit; ++step) {
    const int tile = upcoming[0];
    const int ahead = upcoming[STAGES - 1] = schedule.after(upcoming[STAGES - 2], ticket);
    const int ahead_slot = (step + STAGES - 1) % STAGES;
    copies.issue(stored, own.stage[ahead_slot], ahead_slot, ahead, block_row(ahead), ahead < schedule.limit, lane);
    ticket = schedule.claim(p, bh, ahead, lane);
    copies.wait(step);  // this tile's copies have landed (the next tiles' are in flight)
    const Stage& stage = own.stage[step % STAGES];
    uint4 scale_bits[4], zero_bits[4];
#pragma unroll
    for (int pp = 0; pp < 4; ++pp) {
      scale_bits[pp] = *reinterpret_cast<const uint4*>(stage.key_scale + 32 * pp + 8 * j);
      zero_bits[pp] = *reinterpret_cast<const uint4*>(stage.key_zero + 32 * pp + 8 * j);
    }
    uint2 side_scale_bits, side_zero_bits;
    if constexpr (SIDE) {
      side_scale_bits = *reinterpret_cast<const uint2*>(stage.side_scale + 8 * side_p + 4 * side_u);
      side_zero_bits = *reinterpret_cast<const uint2*>(stage.side_zero + 8 * side_p + 4 * side_u);
    }

    // ---- The block's scales fold into the query operands; its zeros give the logits' block bias, by products
    // with the zeros as A (exact float32 sums): rows r hold the zeros of slot u = 0 and rows r + 8 those of u = 1,
    // each right against its own query operand (two products, as one a slot would need with the zeros in both
    // halves, but no register copies to duplicate them): bias[col] for columns 2j + col.
    uint32_t key_operand[8][2];  // k-step 4u + pp, slot s
    float bias_lo[4] = {0.f, 0.f, 0.f, 0.f}, bias_hi[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int pp = 0; pp < 4; ++pp) {
      uint32_t zero_pair[2][2];  // [u][s]
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t s0 = u ? scale_bits[pp].z : scale_bits[pp].x, s1 = u ? scale_bits[pp].w : scale_bits[pp].y;
        const uint32_t z0 = u ? zero_bits[pp].z : zero_bits[pp].x, z1 = u ? zero_bits[pp].w : zero_bits[pp].y;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t scale_pair = spread_pair(s0, s1, s);
          __half2 product = __hmul2(*reinterpret_cast<const __half2*>(&q_pair[pp][u][s]),
                                    *reinterpret_cast<const __half2*>(&scale_pair));
          if (pp > 0) product = __hmul2(product, __float2half2_rn(1.f / static_cast<float>(1 << (2 * pp))));
          key_operand[4 * u + pp][s] = *reinterpret_cast<uint32_t*>(&product);
          zero_pair[u][s] = spread_pair(z0, z1, s);
        }
      }
      mma_f16(bias_lo, zero_pair[0][0], zero_pair[1][0], zero_pair[0][1], zero_pair[1][1], q_pair[pp][0][0],
              q_pair[pp][0][1]);
      mma_f16(bias_hi, zero_pair[0][0], zero_pair[1][0], zero_pair[0][1], zero_pair[1][1], q_pair[pp][1][0],
              q_pair[pp][1][1]);
    }
    uint32_t side_operand[2] = {0u, 0u};
    if constexpr (SIDE) {
      uint32_t zero_pair[2];
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t scale_pair = spread_pair(side_scale_bits.x, side_scale_bits.y, s);
        __half2 product = __hmul2(*reinterpret_cast<const __half2*>(&qw_pair[s]),
                                  *reinterpret_cast<const __half2*>(&scale_pair));
        product = __hmul2(product, __float2half2_rn(side_p ? 1.f / 16.f : 1.f));  // plane 1 is masked in place
        side_operand[s] = *reinterpret_cast<uint32_t*>(&product);
        zero_pair[s] = spread_pair(side_zero_bits.x, side_zero_bits.y, s);
      }
      mma_f16(bias_lo, zero_pair[0], zero_pair[0], zero_pair[1], zero_pair[1], qw_pair[0], qw_pair[1]);
    }
    const float bias[2] = {bias_lo[0] + bias_hi[2], bias_lo[1] + bias_hi[3]};

    // This tile's codes, read from shared memory where they are used (fewer registers live at once).
    uint2 key_words[4][2];
    uint32_t side_words[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int token = 16 * mt + 8 * half + r;
        key_words[mt][half] = *reinterpret_cast<const uint2*>(stage.keys + token * KEY_ROW + 8 * j);
        if constexpr (SIDE)
          side_words[mt][half] = *reinterpret_cast<const uint32_t*>(stage.side + token * SIDE_ROW + 4 * side_u);
      }
    // ---- Logits S^T[t, g]: keys (eight 16-deep steps) and the side code (one more), codes as subnormals.
    float s[4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[mt][i] = 0.f;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const uint32_t w0 = u ? key_words[mt][0].y : key_words[mt][0].x;  // token r
        const uint32_t w1 = u ? key_words[mt][1].y : key_words[mt][1].x;  // token r + 8
        const uint32_t w0_up = w0 >> 8, w1_up = w1 >> 8;  // bytes 1 and 3 (slot 1)
#pragma unroll
        for (int pp = 0; pp < 4; ++pp) {  // plane pp masked in place: codes * 4^pp, its operand divided by 4^pp
          const uint32_t mask = TWO_BIT << (2 * pp);
          mma_f16(s[mt], w0 & mask, w1 & mask, w0_up & mask, w1_up & mask, key_operand[4 * u + pp][0],
                  key_operand[4 * u + pp][1]);
        }
      }
      if constexpr (SIDE) {
        const uint32_t w0 = side_words[mt][0], w1 = side_words[mt][1];
        const uint32_t mask = FOUR_BIT << (4 * side_p);
        mma_f16(s[mt], w0 & mask, w1 & mask, (w0 >> 8) & mask, (w1 >> 8) & mask, side_operand[0], side_operand[1]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = i & 1;
        if constexpr (SOFTCAP)
          s[mt][i] = scaled_logit<true>(s[mt][i] * CODE_UNIT + bias[col], logit_scale[col], p.softcap);
        else  // one multiply-add: (s * CODE_UNIT + bias) * scale * log2(e)
          s[mt][i] = fmaf(s[mt][i], code_scale[col], bias[col] * log2_scale[col]);
      }
    if (has_sinks && tile == 0) {  // the sink slots: their exact logits (this warp wrote them)
      const float4 sink = sink_logits[lane];
      const float logit[4] = {sink.x, sink.y, sink.z, sink.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (8 * (i >> 1) + r < p.n_sinks) s[0][i] = logit[i];
    }
    // The mask's row from the parameters, not a pointer held in registers through the loop.
    if (p.valid != nullptr) mask_invalid(s, p.valid + b * p.s_valid_b + tile, r);
    float rescale[2];
    softmax.step(s, rescale);

    // ---- Values: p * scale / value_norm as float16, transposed into B operands.
    float value_scale[4][2], value_zero[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int token = 16 * mt + 8 * half + r;
        value_scale[mt][half] = __half2float(stage.value_scale[token]);
        value_zero[mt][half] = __half2float(stage.value_zero[token]);
      }
    uint32_t value_words[4][4];  // k-step kt: tokens 16kt + 2j + {0, 1, 8, 9}, word r
#pragma unroll
    for (int kt = 0; kt < 4; ++kt)
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int token = 16 * kt + 2 * j + (t & 1) + 8 * (t >> 1);
        value_words[kt][t] = *reinterpret_cast<const uint32_t*>(stage.values + token * KEY_ROW + 4 * r);
      }
    float tile_scale = 0.f;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) tile_scale = fmaxf(tile_scale, value_scale[mt][half]);
    const float new_norm = fmaxf(value_norm, warp_max_rows(tile_scale));
    const float inv_value_norm = rcp_fast(new_norm);
    const float norm_ratio = value_norm * inv_value_norm;
    value_norm = new_norm;
    value_bias[0] *= rescale[0];
    value_bias[1] *= rescale[1];
    uint32_t p_operand[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float ps = value_scale[mt][half] * inv_value_norm;
        const float p0 = s[mt][2 * half], p1 = s[mt][2 * half + 1];
        value_bias[0] += p0 * value_zero[mt][half];
        value_bias[1] += p1 * value_zero[mt][half];
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
      const uint32_t lo01_up = lo01 >> 8, hi01_up = hi01 >> 8, lo23_up = lo23 >> 8, hi23_up = hi23 >> 8;
#pragma unroll
      for (int mt = 0; mt < 8; ++mt) {
        // Plane pp = mt / 2 masked in place: codes * 4^pp as float16 subnormals (bits <= 7: still exact), one
        // instruction a register; the rows' factor 4^pp comes out at the end.
        const uint32_t mask = TWO_BIT << (2 * (mt >> 1));
        const uint32_t x01 = (mt & 1) ? hi01 : lo01, x23 = (mt & 1) ? hi23 : lo23;
        const uint32_t x01_up = (mt & 1) ? hi01_up : lo01_up, x23_up = (mt & 1) ? hi23_up : lo23_up;
        mma_f16(acc[mt], x01 & mask, x01_up & mask, x23 & mask, x23_up & mask, p_operand[kt][0], p_operand[kt][1]);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) upcoming[k] = upcoming[k + 1];
  }
  copies.drain();
  HEADQ_STAMP(6);

  // ---- Back to plain sums of p * value.
  const float bias_total[2] = {warp_sum_rows(value_bias[0]), warp_sum_rows(value_bias[1])};
#pragma unroll
  for (int mt = 0; mt < 8; ++mt) {
    const float value_unit = value_norm * CODE_UNIT / static_cast<float>(1 << (2 * (mt >> 1)));  // see the masks
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = acc[mt][i] * value_unit + bias_total[i & 1];
  }

  // ---- The full-precision window (the last split's last warp): exact keys and values in the model dtype.
  if (split == p.n_splits - 1 && warp == WARPS - 1 && n_window > 0) {
    uint32_t q_operand[8][2];
    exact_query_operand<T>(q_operand, query, p.s_qh, G, r, j);
    const T* wk = reinterpret_cast<const T*>(p.window_keys) + b * p.s_wk_b + h * p.s_wk_h;
    const T* wv = reinterpret_cast<const T*>(p.window_values) + b * p.s_wv_b + h * p.s_wv_h;
#pragma unroll 1
    for (int first = 0; first < n_window; first += TILE) {
      float s[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        exact_key_product<T>(s[mt], wk, p.s_wk_t, first + 16 * mt, n_window, r, j, q_operand);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int token = first + 16 * mt + 8 * (i >> 1) + r;
          const bool keep =
              token < n_window && (p.valid == nullptr || p.valid[b * p.s_valid_b + n_tokens + token] != 0);
          s[mt][i] = keep ? scaled_logit<SOFTCAP>(s[mt][i], p.scaling, p.softcap) : -INFINITY;
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
#pragma unroll
        for (int pp = 0; pp < 4; ++pp) {
          uint2 v[4];  // tokens 16kt + 2j + {0, 1, 8, 9}, channels 32pp + 4r ... + 3
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

  HEADQ_STAMP(7);
  // ---- The warps of this split combine through shared memory: warp w then holds query heads w and w + 4.
  SplitState& mine = own.state;
  const float total[2] = {warp_sum_rows(softmax.total[0]), warp_sum_rows(softmax.total[1])};
#pragma unroll
  for (int col = 0; col < 2; ++col) {
    const int g = 2 * j + col;
    if (r == 0) {
      mine.m[g] = softmax.max[col];
      mine.l[g] = total[col];
    }
#pragma unroll
    for (int pp = 0; pp < 4; ++pp)
      *reinterpret_cast<float4*>(&mine.acc[g][32 * pp + 4 * r]) =
          make_float4(acc[2 * pp][col], acc[2 * pp][2 + col], acc[2 * pp + 1][col], acc[2 * pp + 1][2 + col]);
  }
  __syncthreads();
  T* out = reinterpret_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.kv_heads + h) * G * D;
  const int64_t first_row = static_cast<int64_t>(bh) * p.n_splits * ROWS;
#pragma unroll
  for (int g = warp; g < ROWS; g += WARPS) {
    if (g >= G) break;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) top = fmaxf(top, space[w].state.m[g]);
    const float base = top == -INFINITY ? 0.f : top;
    float norm_sum = 0.f;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float weight = exp2_fast(space[w].state.m[g] - base);
      norm_sum += weight * space[w].state.l[g];
      const float4 x = *reinterpret_cast<const float4*>(&space[w].state.acc[g][4 * lane]);
      sum.x += weight * x.x;
      sum.y += weight * x.y;
      sum.z += weight * x.z;
      sum.w += weight * x.w;
    }
    if (p.n_splits == 1) {
      const float inv = norm_sum > 0.f ? __frcp_rn(norm_sum) : 0.f;
      uint2 packed;
      packed.x = M::pack(sum.x * inv, sum.y * inv);
      packed.y = M::pack(sum.z * inv, sum.w * inv);
      *reinterpret_cast<uint2*>(out + g * D + 4 * lane) = packed;
    } else {
      const int64_t row = first_row + split * ROWS + g;
      if (lane == 0) {
        p.part_m[row] = top;
        p.part_l[row] = norm_sum;
      }
      reinterpret_cast<float4*>(p.part_acc + row * D)[lane] = sum;
    }
  }
  HEADQ_STAMP(8);
  if (p.n_splits == 1) {
    if (threadIdx.x == 0) p.counters[2 * bh + 1] = 0;  // every warp claimed its last tile before the barrier above
    return;
  }

  // ---- The last split of this (sequence, KV head) to finish merges them all. One thread counts the block's split
  // as done with an acquire-release atomic: release, after the barrier, publishes every warp's partials (the
  // barrier orders them before it); acquire, before the next barrier, lets the merging block read all the others'.
  __syncthreads();
  if (threadIdx.x == 0) last_split = count_split(p.counters + 2 * bh) == p.n_splits - 1;
  __syncthreads();
  if (!last_split) return;
  HEADQ_STAMP(9);
  constexpr int IN_FLIGHT = 16;  // splits a lane reads at once (each an L2 round trip: one round trip a chunk)
#pragma unroll 1
  for (int g = warp; g < G; g += WARPS) {
    // Chunks of splits, each read in one go (maxima, normalisers, this lane's 4 output channels), folded into a
    // running maximum as flash attention's online softmax does.
    float top = -INFINITY, norm_sum = 0.f;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int first = 0; first < p.n_splits; first += IN_FLIGHT) {
      float m[IN_FLIGHT], l[IN_FLIGHT];
      float4 x[IN_FLIGHT];
#pragma unroll
      for (int k = 0; k < IN_FLIGHT; ++k) {
        const int64_t row = first_row + min(first + k, p.n_splits - 1) * ROWS + g;
        m[k] = first + k < p.n_splits ? __ldcg(p.part_m + row) : -INFINITY;
        l[k] = __ldcg(p.part_l + row);
        x[k] = __ldcg(reinterpret_cast<const float4*>(p.part_acc + row * D) + lane);
      }
      float chunk_top = top;
#pragma unroll
      for (int k = 0; k < IN_FLIGHT; ++k) chunk_top = fmaxf(chunk_top, m[k]);
      if (chunk_top == -INFINITY) continue;  // nothing but fully masked splits so far
      const float carried = exp2_fast(top - chunk_top);  // 0 while top is -inf
      norm_sum *= carried;
      sum.x *= carried;
      sum.y *= carried;
      sum.z *= carried;
      sum.w *= carried;
#pragma unroll
      for (int k = 0; k < IN_FLIGHT; ++k) {
        const float weight = exp2_fast(m[k] - chunk_top);  // 0 for a fully masked split and past the last
        norm_sum += weight * l[k];
        sum.x += weight * x[k].x;
        sum.y += weight * x[k].y;
        sum.z += weight * x[k].z;
        sum.w += weight * x[k].w;
      }
      top = chunk_top;
    }
    const float inv = norm_sum > 0.f ? __frcp_rn(norm_sum) : 0.f;
    uint2 packed;
    packed.x = M::pack(sum.x * inv, sum.y * inv);
    packed.y = M::pack(sum.z * inv, sum.w * inv);
    *reinterpret_cast<uint2*>(out + g * D + 4 * lane) = packed;
  }
  HEADQ_STAMP(10);
  if (threadIdx.x == 0) {  // ready for the next launch: every split counted itself after its last claim
    p.counters[2 * bh] = 0;
    p.counters[2 * bh + 1] = 0;
  }
}

template <typename T, bool SIDE, bool SOFTCAP>
void launch_kernel(const DecodeParams& params, cudaStream_t stream) {
  // Once a kernel and device: allow over 48 KB of dynamic shared memory (3 stages; an error here shows as the
  // launch's error, which the binding checks). No carve-out preference: the driver sizes shared memory to the
  // blocks an SM holds and leaves the rest to L1, which the prologue's query and decoder loads hit.
  constexpr int MAX_DEVICES = 64;
  static bool configured[MAX_DEVICES] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device >= MAX_DEVICES || !configured[device]) {
    cudaFuncSetAttribute(decode_kernel<T, SIDE, SOFTCAP>, cudaFuncAttributeMaxDynamicSharedMemorySize, SHARED_BYTES);
    if (device < MAX_DEVICES) configured[device] = true;
  }
  const dim3 grid(params.batch * params.kv_heads, params.n_splits), block(WARPS * 32);
  decode_kernel<T, SIDE, SOFTCAP><<<grid, block, SHARED_BYTES, stream>>>(params);
}

template <typename T, bool SIDE>
void launch_typed(const DecodeParams& params, cudaStream_t stream) {
  if (params.softcap > 0.f)
    launch_kernel<T, SIDE, true>(params, stream);
  else
    launch_kernel<T, SIDE, false>(params, stream);
}

}  // namespace

void launch_decode(const DecodeParams& params, bool bf16, bool side_code, cudaStream_t stream) {
  if (bf16)
    side_code ? launch_typed<__nv_bfloat16, true>(params, stream) : launch_typed<__nv_bfloat16, false>(params, stream);
  else
    side_code ? launch_typed<__half, true>(params, stream) : launch_typed<__half, false>(params, stream);
}

}  // namespace headq
