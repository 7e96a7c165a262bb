// torch binding of the fused decode kernel (decode.cu): tensors to a DecodeParams, on the current stream.
// The Python side (kernels/cuda_decode.py) checks the settings once; this checks the tensors' layout: the stores'
// once a StoreLaunch (they change once a block of tokens), the query's and window's at every step.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <map>
#include <utility>

#include "decode.h"

namespace {

using OptionalTensor = c10::optional<torch::Tensor>;

template <typename T>
const T* data_or_null(const OptionalTensor& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
}

int64_t stride_or_zero(const OptionalTensor& t, int dim) { return t.has_value() ? t->stride(dim) : 0; }

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

// Everything of the stores' layout the kernel assumes and the Python side does not check once per settings.
bool stores_fit(const torch::Tensor& query, const OptionalTensor& decoder, const torch::Tensor& key_codes,
                const torch::Tensor& key_scale, const torch::Tensor& key_zero, const OptionalTensor& side_codes,
                const OptionalTensor& side_scale, const OptionalTensor& side_zero, const torch::Tensor& value_codes,
                const torch::Tensor& value_scale, const torch::Tensor& value_zero, const OptionalTensor& sink_keys) {
  const int64_t head_dim = query.size(-1);
  if (!query.is_cuda() || query.dim() != 4 || query.size(2) != 1) return false;
  if (key_codes.size(2) % 64 != 0) return false;  // whole tiles
  if (!whole_rows(key_codes, head_dim / 4) || !whole_rows(key_scale, head_dim) || !whole_rows(key_zero, head_dim))
    return false;
  if (!whole_rows(value_codes, head_dim / 4) || !whole_rows(value_scale, 1) || !whole_rows(value_zero, 1)) return false;
  if (side_codes.has_value()) {
    if (!decoder.has_value() || !side_scale.has_value() || !side_zero.has_value()) return false;
    if (!whole_rows(*side_codes, 8) || !whole_rows(*side_scale, 16) || !whole_rows(*side_zero, 16)) return false;
    if (decoder->scalar_type() != at::kFloat || !decoder->is_contiguous() || !aligned(*decoder, 16)) return false;
  }
  if (sink_keys.has_value() && (!model_rows(*sink_keys, query.scalar_type(), 2, 4) || sink_keys->size(2) > 16))
    return false;
  return true;
}

// Buffers a growing cache's launches share on one device and stream: the splits' partials (each launch writes
// them and its merge reads them before the next launch on the stream) and the counts of finished splits and claimed
// tiles (zero between launches: the merging split resets its own). Kept here rather than in Python, where finding the current
// stream alone costs microseconds of every eager step. Never freed: they live as long as the process (a static
// destructor would run after CUDA is torn down).
struct Workspace {
  torch::Tensor partials, counters;
};

Workspace& stream_workspace(c10::DeviceIndex device, cudaStream_t stream) {
  static auto* spaces = new std::map<std::pair<c10::DeviceIndex, cudaStream_t>, Workspace>();
  return (*spaces)[{device, stream}];
}

// The kernel's launch over one layer's stores as they stand. Their pointers, strides and layout are checked and
// written into a DecodeParams once (a growing cache's stores change once a block of tokens, so it makes one a
// layer at most once a block); each step then passes only what changes: the query, the window, the padding mask.
// That is most of an eager step's host time saved (host_us in the decode benchmarks). It keeps the stores'
// addresses, not the tensors: its caller keeps them alive while it launches (fused_decode checks before each step
// that the layer's stores are still the very tensors it was made for), so that a launch kept beside a layer never
// holds the layer's old buffers in memory.
class StoreLaunch {
 public:
  // ``query``: a query of the steps to come (its shape, dtype and device). ``lengths``: a fixed-capacity layer's
  // device counts of stored and window tokens, or none. ``counters``: that layer's int32 counters, two a (sequence,
  // KV head) (a CUDA graph replays its launch), with ``fresh_partials``, a new partials buffer a launch; none: the
  // stream's.
  StoreLaunch(const torch::Tensor& query, const OptionalTensor& decoder, const torch::Tensor& key_codes,
              const torch::Tensor& key_scale, const torch::Tensor& key_zero, const OptionalTensor& side_codes,
              const OptionalTensor& side_scale, const OptionalTensor& side_zero, const torch::Tensor& value_codes,
              const torch::Tensor& value_scale, const torch::Tensor& value_zero, const OptionalTensor& sink_keys,
              const OptionalTensor& lengths, const OptionalTensor& counters, bool fresh_partials, int64_t groups,
              int64_t block, int64_t tokens_per_split, int64_t n_splits)
      : dtype_(query.scalar_type()), device_(query.device()), fresh_partials_(fresh_partials) {
    fits_ = stores_fit(query, decoder, key_codes, key_scale, key_zero, side_codes, side_scale, side_zero,
                       value_codes, value_scale, value_zero, sink_keys);
    if (!fits_) return;
    batch_ = query.size(0);
    kv_heads_ = key_codes.size(1);
    if (counters.has_value()) {
      TORCH_CHECK(counters->scalar_type() == at::kInt && counters->is_contiguous() &&
                      counters->device() == query.device() && counters->numel() >= 2 * batch_ * kv_heads_,
                  "the decode kernel's counters must be a contiguous int32 tensor of 2 x batch x KV heads entries on "
                  "the query's device");
      counters_ = *counters;
    }
    q_heads_ = query.size(1);
    head_dim_ = query.size(3);
    side_code_ = side_codes.has_value();
    partial_rows_ = batch_ * kv_heads_ * n_splits * headq::ROWS;
    headq::DecodeParams& p = params_;
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
    p.sink_keys = data_or_null<void>(sink_keys);
    p.s_sk_b = stride_or_zero(sink_keys, 0);
    p.s_sk_h = stride_or_zero(sink_keys, 1);
    p.s_sk_t = stride_or_zero(sink_keys, 2);
    p.n_sinks = sink_keys.has_value() ? static_cast<int>(sink_keys->size(2)) : 0;
    p.lengths = data_or_null<int64_t>(lengths);
    p.batch = static_cast<int>(batch_);
    p.kv_heads = static_cast<int>(kv_heads_);
    p.groups = static_cast<int>(groups);
    p.block = static_cast<int>(block);
    // Division by the block as a multiply-high and a shift (exact for dividends below 2^31; block >= 64):
    // shift = ceil(log2 block) - 1, mul = ceil(2^(32 + shift) / block).
    int ceil_log2 = 0;
    while ((int64_t{1} << ceil_log2) < block) ++ceil_log2;
    p.block_shift = static_cast<uint32_t>(ceil_log2 - 1);
    p.block_mul = static_cast<uint32_t>(((uint64_t{1} << (32 + p.block_shift)) + block - 1) / block);
    p.n_tokens = static_cast<int>(key_codes.size(2));
    p.tokens_per_split = static_cast<int>(tokens_per_split);
    p.n_splits = static_cast<int>(n_splits);
  }

  // Whether the stores' layout fits the kernel (else no step launches).
  bool fits() const { return fits_; }

  // Where the next steps' warps write their phase stamps (decode.h says the layout; only a build with
  // HEADQ_TIMELINE writes them): int64, contiguous, on the stores' device.
  void record_timeline(const torch::Tensor& timeline) {
    TORCH_CHECK(timeline.scalar_type() == at::kLong && timeline.is_contiguous() && timeline.device() == device_ &&
                    timeline.numel() >= static_cast<int64_t>(params_.n_splits) * batch_ * kv_heads_ * headq::WARPS *
                                           headq::STAMPS,
                "the timeline must be a contiguous int64 tensor of [splits, B*Hkv, WARPS, STAMPS] (decode.h) on the "
                "stores' device");
    timeline_ = timeline;
    params_.timeline = timeline.data_ptr<int64_t>();
  }

  // The output ``[B, 1, Hq, D]``, or none where the step's tensors do not fit (nothing launched).
  OptionalTensor operator()(const torch::Tensor& given_query, const torch::Tensor& window_keys,
                            const torch::Tensor& window_values, const OptionalTensor& valid, double scaling,
                            double softcap) {
    if (!fits_ || !same_shape(given_query) || !window_fits(window_keys) || !window_fits(window_values) ||
        window_values.size(2) != window_keys.size(2) || (valid.has_value() && valid->stride(1) != 1))
      return c10::nullopt;
    // The kernel loads the query's rows 8 channels (16 bytes) at once; a query laid out otherwise (a view at an
    // odd offset, say) is copied: a few KB, against a fallback to the slower kernel.
    const torch::Tensor query =
        model_rows(given_query, dtype_, 8, 16) ? given_query : given_query.clone(at::MemoryFormat::Contiguous);
    const c10::cuda::CUDAGuard guard(device_);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index());
    const int64_t partial_floats = partial_rows_ * (head_dim_ + 2);  // running max, normaliser, output row
    torch::Tensor partials;
    if (fresh_partials_) {
      partials = at::empty({partial_floats}, query.options().dtype(at::kFloat));
    } else {
      Workspace& shared = workspace(stream);
      if (!shared.partials.defined() || shared.partials.numel() < partial_floats)
        shared.partials = at::empty({partial_floats}, query.options().dtype(at::kFloat));
      partials = shared.partials;
    }
    int* counters = counters_.defined() ? counters_.data_ptr<int>() : nullptr;
    if (counters == nullptr) {
      Workspace& shared = workspace(stream);
      if (!shared.counters.defined() || shared.counters.numel() < 2 * batch_ * kv_heads_)
        shared.counters = at::zeros({std::max<int64_t>(2 * batch_ * kv_heads_, 128)}, query.options().dtype(at::kInt));
      counters = shared.counters.data_ptr<int>();
    }
    const torch::Tensor out = at::empty({batch_, 1, q_heads_, head_dim_}, query.options());
    headq::DecodeParams p = params_;
    p.query = query.const_data_ptr();
    p.s_qb = query.stride(0);
    p.s_qh = query.stride(1);
    p.window_keys = window_keys.const_data_ptr();
    p.s_wk_b = window_keys.stride(0);
    p.s_wk_h = window_keys.stride(1);
    p.s_wk_t = window_keys.stride(2);
    p.window_values = window_values.const_data_ptr();
    p.s_wv_b = window_values.stride(0);
    p.s_wv_h = window_values.stride(1);
    p.s_wv_t = window_values.stride(2);
    p.n_window = static_cast<int>(window_keys.size(2));
    p.valid = data_or_null<uint8_t>(valid);
    p.s_valid_b = stride_or_zero(valid, 0);
    p.part_m = partials.data_ptr<float>();
    p.part_l = p.part_m + partial_rows_;
    p.part_acc = p.part_l + partial_rows_;
    p.counters = counters;
    p.out = out.data_ptr();
    p.scaling = static_cast<float>(scaling);
    p.softcap = static_cast<float>(softcap);
    // torch.use_deterministic_algorithms(True) asks for the same output bits every launch: tiles dealt, not claimed.
    p.claim_tiles = !at::globalContext().deterministicAlgorithms();
    headq::launch_decode(p, dtype_ == at::kBFloat16, side_code_, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

 private:
  bool same_shape(const torch::Tensor& query) const {
    return query.dim() == 4 && query.scalar_type() == dtype_ && query.device() == device_ &&
           query.size(0) == batch_ && query.size(1) == q_heads_ && query.size(2) == 1 && query.size(3) == head_dim_;
  }

  bool window_fits(const torch::Tensor& window) const {
    return model_rows(window, dtype_, 4, 8) && window.device() == device_ && window.size(0) == batch_ &&
           window.size(1) == kv_heads_ && window.size(3) == head_dim_;
  }

  // The current stream's buffers, found once while the stream stays the same.
  Workspace& workspace(cudaStream_t stream) {
    if (workspace_ == nullptr || stream != stream_) {
      workspace_ = &stream_workspace(device_.index(), stream);
      stream_ = stream;
    }
    return *workspace_;
  }

  at::ScalarType dtype_;
  c10::Device device_;
  bool fresh_partials_;
  bool fits_ = false;
  bool side_code_ = false;
  int64_t batch_ = 0, q_heads_ = 0, head_dim_ = 0, kv_heads_ = 0, partial_rows_ = 0;
  torch::Tensor counters_, timeline_;
  headq::DecodeParams params_{};
  cudaStream_t stream_ = nullptr;
  Workspace* workspace_ = nullptr;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<StoreLaunch>(m, "StoreLaunch", "HeadQ fused decode attention (CUDA) over one layer's stores")
      .def(pybind11::init<const torch::Tensor&, const OptionalTensor&, const torch::Tensor&, const torch::Tensor&,
                          const torch::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                          const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const OptionalTensor&,
                          const OptionalTensor&, const OptionalTensor&, bool, int64_t, int64_t, int64_t, int64_t>())
      .def_property_readonly("fits", &StoreLaunch::fits)
      .def("record_timeline", &StoreLaunch::record_timeline, "where the steps' phase stamps go (HEADQ_TIMELINE builds)")
      .def("__call__", &StoreLaunch::operator(), "one step's output, or None: the step's tensors do not fit");
}
