// torch binding of the fused decode kernel (decode.cu): tensors to a DecodeParams, on the current stream.
// The Python side (kernels/cuda_decode.py) checks shapes, dtypes and alignment before it calls this.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "decode.h"

namespace {

template <typename T>
const T* data_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

int64_t stride_or_zero(const c10::optional<torch::Tensor>& t, int dim) { return t.has_value() ? t->stride(dim) : 0; }

void decode(const torch::Tensor& query, const c10::optional<torch::Tensor>& decoder, const torch::Tensor& key_codes,
            const torch::Tensor& key_scale, const torch::Tensor& key_zero,
            const c10::optional<torch::Tensor>& side_codes, const c10::optional<torch::Tensor>& side_scale,
            const c10::optional<torch::Tensor>& side_zero, const torch::Tensor& value_codes,
            const torch::Tensor& value_scale, const torch::Tensor& value_zero, const torch::Tensor& window_keys,
            const torch::Tensor& window_values, const c10::optional<torch::Tensor>& sink_keys,
            const c10::optional<torch::Tensor>& valid, const c10::optional<torch::Tensor>& lengths,
            const torch::Tensor& part_m, const torch::Tensor& part_l, const torch::Tensor& part_acc,
            const torch::Tensor& counters, const torch::Tensor& out, int64_t groups, int64_t block, int64_t n_tokens,
            int64_t tokens_per_split, int64_t n_splits, double scaling, double softcap) {
  const c10::cuda::CUDAGuard guard(query.device());
  headq::DecodeParams p{};
  p.query = query.data_ptr();
  p.s_qb = query.stride(0);
  p.s_qh = query.stride(1);
  p.decoder = data_or_null<float>(decoder);
  p.key_codes = key_codes.data_ptr<uint8_t>();
  p.s_kc_b = key_codes.stride(0);
  p.s_kc_h = key_codes.stride(1);
  p.key_scale = key_scale.data_ptr();
  p.key_zero = key_zero.data_ptr();
  p.s_ks_b = key_scale.stride(0);
  p.s_ks_h = key_scale.stride(1);
  p.side_codes = data_or_null<uint8_t>(side_codes);
  p.s_cc_b = stride_or_zero(side_codes, 0);
  p.s_cc_h = stride_or_zero(side_codes, 1);
  p.side_scale = data_or_null<void>(side_scale);
  p.side_zero = data_or_null<void>(side_zero);
  p.s_cs_b = stride_or_zero(side_scale, 0);
  p.s_cs_h = stride_or_zero(side_scale, 1);
  p.value_codes = value_codes.data_ptr<uint8_t>();
  p.s_vc_b = value_codes.stride(0);
  p.s_vc_h = value_codes.stride(1);
  p.value_scale = value_scale.data_ptr();
  p.value_zero = value_zero.data_ptr();
  p.s_vs_b = value_scale.stride(0);
  p.s_vs_h = value_scale.stride(1);
  p.window_keys = window_keys.data_ptr();
  p.s_wk_b = window_keys.stride(0);
  p.s_wk_h = window_keys.stride(1);
  p.s_wk_t = window_keys.stride(2);
  p.window_values = window_values.data_ptr();
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
  p.part_m = part_m.data_ptr<float>();
  p.part_l = part_l.data_ptr<float>();
  p.part_acc = part_acc.data_ptr<float>();
  p.counters = counters.data_ptr<int>();
  p.out = out.data_ptr();
  p.batch = static_cast<int>(query.size(0));
  p.kv_heads = static_cast<int>(key_codes.size(1));
  p.groups = static_cast<int>(groups);
  p.block = static_cast<int>(block);
  p.n_tokens = static_cast<int>(n_tokens);
  p.n_window = static_cast<int>(window_keys.size(2));
  p.tokens_per_split = static_cast<int>(tokens_per_split);
  p.n_splits = static_cast<int>(n_splits);
  p.scaling = static_cast<float>(scaling);
  p.softcap = static_cast<float>(softcap);
  headq::launch_decode(p, query.scalar_type() == at::kBFloat16, side_codes.has_value(),
                       at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode", &decode, "HeadQ fused decode attention (CUDA)"); }
