// torch binding of the fused decode kernel (decode.cu): tensors to a DecodeParams, on the current stream.
// The Python side (kernels/cuda_decode.py) checks the settings once; this checks the tensors' layout each step.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <map>
#include <utility>

#include "decode.h"

namespace {

template <typename T>
const T* data_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
}

int64_t stride_or_zero(const c10::optional<torch::Tensor>& t, int dim) { return t.has_value() ? t->stride(dim) : 0; }

bool aligned(const torch::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

// [B, H, T, row] with rows back to back, 16-byte (sequence, head) strides and address: the kernel copies tiles in
// 16-byte chunks and steps rows by a constant.
bool whole_rows(const torch::Tensor& t, int64_t row) {
  if (t.dim() != 4 || t.size(3) != row || t.stride(3) != 1 || t.stride(2) != row || !aligned(t, 16)) return false;
  for (int d = 0; d < 2; ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

// [B, H, T, D] in the model dtype with unit channel stride, the other strides multiples of ``elements`` and the
// address of ``bytes`` (the kernel loads 2 or 4 channels at once).
bool model_rows(const torch::Tensor& t, at::ScalarType dtype, int64_t elements, int64_t bytes) {
  if (t.dim() != 4 || t.scalar_type() != dtype || t.stride(3) != 1 || !aligned(t, bytes)) return false;
  for (int d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % elements != 0) return false;
  return true;
}

// Everything of the layout the kernel assumes and the Python side does not check once per settings: checked
// here, at C++ speed, every step (stores grow and move); false: the caller falls back to the Triton kernel.
bool layout_fits(const torch::Tensor& query, const c10::optional<torch::Tensor>& decoder, const torch::Tensor& key_codes,
                 const torch::Tensor& key_scale, const torch::Tensor& key_zero,
                 const c10::optional<torch::Tensor>& side_codes, const c10::optional<torch::Tensor>& side_scale,
                 const c10::optional<torch::Tensor>& side_zero, const torch::Tensor& value_codes,
                 const torch::Tensor& value_scale, const torch::Tensor& value_zero, const torch::Tensor& window_keys,
                 const torch::Tensor& window_values, const c10::optional<torch::Tensor>& sink_keys,
                 const c10::optional<torch::Tensor>& valid, int64_t head_dim) {
  const auto dtype = query.scalar_type();
  if (!query.is_cuda() || !model_rows(query, dtype, 8, 16)) return false;
  if (key_codes.size(2) % 64 != 0) return false;  // whole tiles
  if (!whole_rows(key_codes, head_dim / 4) || !whole_rows(key_scale, head_dim) || !whole_rows(key_zero, head_dim))
    return false;
  if (!whole_rows(value_codes, head_dim / 4) || !whole_rows(value_scale, 1) || !whole_rows(value_zero, 1)) return false;
  if (side_codes.has_value()) {
    if (!decoder.has_value() || !side_scale.has_value() || !side_zero.has_value()) return false;
    if (!whole_rows(*side_codes, 8) || !whole_rows(*side_scale, 16) || !whole_rows(*side_zero, 16)) return false;
    if (decoder->scalar_type() != at::kFloat || !decoder->is_contiguous() || !aligned(*decoder, 16)) return false;
  }
  if (!model_rows(window_keys, dtype, 4, 8) || !model_rows(window_values, dtype, 4, 8)) return false;
  if (sink_keys.has_value() && (!model_rows(*sink_keys, dtype, 2, 4) || sink_keys->size(2) > 16)) return false;
  if (valid.has_value() && valid->stride(1) != 1) return false;
  return true;
}

// Buffers a growing cache's launches share on one device and stream: the splits' partials (each launch writes
// them and its merge reads them before the next launch on the stream) and the counts of finished splits (zero
// between launches: the merging split resets its own). Kept here rather than in Python, where finding the current
// stream alone costs microseconds of every eager step. Never freed: they live as long as the process (a static
// destructor would run after CUDA is torn down).
struct Workspace {
  torch::Tensor partials, counters;
};

Workspace& stream_workspace(const torch::Device& device, cudaStream_t stream) {
  static auto* spaces = new std::map<std::pair<c10::DeviceIndex, cudaStream_t>, Workspace>();
  return (*spaces)[{device.index(), stream}];
}

// ``counters``: a fixed-capacity layer's own (a CUDA graph replays its launch), or none: the stream's.
// ``fresh_partials``: a new partials buffer for this launch (a CUDA graph holds it), else the stream's.
// Returns the output ``[B, 1, Hq, D]``, or none where the layout does not fit (nothing launched).
c10::optional<torch::Tensor> decode(
    const torch::Tensor& given_query, const c10::optional<torch::Tensor>& decoder, const torch::Tensor& key_codes,
    const torch::Tensor& key_scale, const torch::Tensor& key_zero, const c10::optional<torch::Tensor>& side_codes,
    const c10::optional<torch::Tensor>& side_scale, const c10::optional<torch::Tensor>& side_zero,
    const torch::Tensor& value_codes, const torch::Tensor& value_scale, const torch::Tensor& value_zero,
    const torch::Tensor& window_keys, const torch::Tensor& window_values, const c10::optional<torch::Tensor>& sink_keys,
    const c10::optional<torch::Tensor>& valid, const c10::optional<torch::Tensor>& lengths,
    const c10::optional<torch::Tensor>& counters, bool fresh_partials, int64_t groups, int64_t block,
    int64_t tokens_per_split, int64_t n_splits, double scaling, double softcap) {
  // The kernel loads the query's rows 8 channels (16 bytes) at once; a query laid out otherwise (a view at an odd
  // offset, say) is copied: a few KB, against a fallback to the slower kernel.
  const torch::Tensor query = model_rows(given_query, given_query.scalar_type(), 8, 16)
                                  ? given_query
                                  : given_query.clone(at::MemoryFormat::Contiguous);
  if (!layout_fits(query, decoder, key_codes, key_scale, key_zero, side_codes, side_scale, side_zero, value_codes,
                   value_scale, value_zero, window_keys, window_values, sink_keys, valid, query.size(-1)))
    return c10::nullopt;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = query.size(0), q_heads = query.size(1), head_dim = query.size(3);
  const int64_t batch_heads = batch * key_codes.size(1);
  const int64_t partial_rows = batch_heads * n_splits * headq::ROWS;
  const int64_t partial_floats = partial_rows * (head_dim + 2);  // running max, normaliser, output row
  Workspace& shared = stream_workspace(query.device(), stream);
  if (!fresh_partials && (!shared.partials.defined() || shared.partials.numel() < partial_floats))
    shared.partials = at::empty({partial_floats}, query.options().dtype(at::kFloat));
  if (!counters.has_value() && (!shared.counters.defined() || shared.counters.numel() < batch_heads))
    shared.counters = at::zeros({std::max<int64_t>(batch_heads, 64)}, query.options().dtype(at::kInt));
  const torch::Tensor partials =
      fresh_partials ? at::empty({partial_floats}, query.options().dtype(at::kFloat)) : shared.partials;
  const torch::Tensor out = at::empty({batch, 1, q_heads, head_dim}, query.options());
  headq::DecodeParams p{};
  p.query = query.const_data_ptr();
  p.s_qb = query.stride(0);
  p.s_qh = query.stride(1);
  p.decoder = data_or_null<float>(decoder);
  p.key_codes = key_codes.const_data_ptr<uint8_t>();
  p.s_kc_b = key_codes.stride(0);
  p.s_kc_h = key_codes.stride(1);
  p.key_scale = key_scale.const_data_ptr();
  p.key_zero = key_zero.const_data_ptr();
  p.s_ks_b = key_scale.stride(0);
  p.s_ks_h = key_scale.stride(1);
  p.side_codes = data_or_null<uint8_t>(side_codes);
  p.s_cc_b = stride_or_zero(side_codes, 0);
  p.s_cc_h = stride_or_zero(side_codes, 1);
  p.side_scale = data_or_null<void>(side_scale);
  p.side_zero = data_or_null<void>(side_zero);
  p.s_cs_b = stride_or_zero(side_scale, 0);
  p.s_cs_h = stride_or_zero(side_scale, 1);
  p.value_codes = value_codes.const_data_ptr<uint8_t>();
  p.s_vc_b = value_codes.stride(0);
  p.s_vc_h = value_codes.stride(1);
  p.value_scale = value_scale.const_data_ptr();
  p.value_zero = value_zero.const_data_ptr();
  p.s_vs_b = value_scale.stride(0);
  p.s_vs_h = value_scale.stride(1);
  p.window_keys = window_keys.const_data_ptr();
  p.s_wk_b = window_keys.stride(0);
  p.s_wk_h = window_keys.stride(1);
  p.s_wk_t = window_keys.stride(2);
  p.window_values = window_values.const_data_ptr();
  p.s_wv_b = window_values.stride(0);
  p.s_wv_h = window_values.stride(1);
  p.s_wv_t = window_values.stride(2);
  p.sink_keys = data_or_null<void>(sink_keys);
  p.s_sk_b = stride_or_zero(sink_keys, 0);
  p.s_sk_h = stride_or_zero(sink_keys, 1);
  p.s_sk_t = stride_or_zero(sink_keys, 2);
  p.n_sinks = sink_keys.has_value() ? static_cast<int>(sink_keys->size(2)) : 0;
  p.valid = data_or_null<uint8_t>(valid);
  p.s_valid_b = stride_or_zero(valid, 0);
  p.lengths = data_or_null<int64_t>(lengths);
  p.part_m = partials.data_ptr<float>();
  p.part_l = p.part_m + partial_rows;
  p.part_acc = p.part_l + partial_rows;
  p.counters = (counters.has_value() ? *counters : shared.counters).data_ptr<int>();
  p.out = out.data_ptr();
  p.batch = static_cast<int>(query.size(0));
  p.kv_heads = static_cast<int>(key_codes.size(1));
  p.groups = static_cast<int>(groups);
  p.block = static_cast<int>(block);
  // Division by the block as a multiply-high and a shift (exact for dividends below 2^31; block >= 64):
  // shift = ceil(log2 block) - 1, mul = ceil(2^(32 + shift) / block).
  int ceil_log2 = 0;
  while ((int64_t{1} << ceil_log2) < block) ++ceil_log2;
  p.block_shift = static_cast<uint32_t>(ceil_log2 - 1);
  p.block_mul = static_cast<uint32_t>(((uint64_t{1} << (32 + p.block_shift)) + block - 1) / block);
  p.n_tokens = static_cast<int>(key_codes.size(2));
  p.n_window = static_cast<int>(window_keys.size(2));
  p.tokens_per_split = static_cast<int>(tokens_per_split);
  p.n_splits = static_cast<int>(n_splits);
  p.scaling = static_cast<float>(scaling);
  p.softcap = static_cast<float>(softcap);
  headq::launch_decode(p, query.scalar_type() == at::kBFloat16, side_codes.has_value(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "HeadQ fused decode attention (CUDA); None: the layout does not fit, nothing launched");
}
