// CPU implementation of OpenFold's `attn_core_inplace_cuda` extension (fastfold-plugin).
//
// OpenFold's setup.py builds `softmax_cuda.cpp` + `softmax_cuda_stub.cpp` when no CUDA toolkit is
// found; the stub's two functions only throw. fastfold-plugin's installer replaces the stub's
// contents with this file, in its own copy of the sdist, before building. The signatures are the
// ones declared in `softmax_cuda.cpp`; the semantics are those of `softmax_cuda_kernel.cu` as
// `openfold/utils/kernel/attention_core.py` calls it:
//
//   forward_(input, rows, cols)
//     input: contiguous, viewed as [rows, cols]. In place: input <- softmax(input, dim=-1).
//   backward_(output, d_ov, values, rows, cols_output, cols_values)
//     output: the softmax probabilities y, [*, H, Q, K] viewed as [B, Q, K] (cols_output = K);
//     d_ov: the gradient of o = y @ v, [B, Q, C_v] (cols_values = C_v);
//     values: v, [B, K, C_v], B = values.numel() / (cols_output * cols_values).
//     In place: output <- (dy - sum(y * dy, dim=-1)) * y, dy = d_ov @ values^T per batch entry,
//     i.e. the gradient of the softmax logits.
//
// Precision: float32 and bfloat16 tensors; both compute in float32 and round once on store (the
// CUDA kernel also keeps the softmax in float32; its bfloat16 d_ov @ values^T accumulates in
// bfloat16, this one in float32).
#include <torch/extension.h>

namespace {

void check_operand(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "attn_core_inplace_cuda (CPU build): ", name,
                " must be a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.is_contiguous(), "attn_core_inplace_cuda: ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
                "attn_core_inplace_cuda: ", name, " must be float32 or bfloat16, got ",
                t.scalar_type());
}

}  // namespace

void attn_softmax_inplace_forward_(
    at::Tensor input,
    long long rows, int cols
) {
    check_operand(input, "input");
    TORCH_CHECK(rows >= 0 && cols >= 0 && input.numel() == rows * static_cast<int64_t>(cols),
                "attn_core_inplace_cuda.forward_: input has ", input.numel(),
                " elements, expected rows * cols = ", rows, " * ", cols);
    if (input.numel() == 0) {
        return;
    }
    at::NoGradGuard no_grad;
    auto x = input.view({static_cast<int64_t>(rows), static_cast<int64_t>(cols)});
    x.copy_(at::softmax(x, /*dim=*/1, /*dtype=*/at::kFloat));
}

void attn_softmax_inplace_backward_(
    at::Tensor output,
    at::Tensor d_ov,
    at::Tensor values,
    long long rows,
    int cols_output,
    int cols_values
) {
    check_operand(output, "output");
    check_operand(d_ov, "d_ov");
    check_operand(values, "values");
    TORCH_CHECK(d_ov.scalar_type() == output.scalar_type() &&
                values.scalar_type() == output.scalar_type(),
                "attn_core_inplace_cuda.backward_: output, d_ov and values must share a dtype");
    const int64_t n_rows = rows;
    const int64_t k = cols_output;
    const int64_t c_v = cols_values;
    TORCH_CHECK(n_rows >= 0 && k >= 0 && c_v >= 0, "attn_core_inplace_cuda.backward_: negative size");
    TORCH_CHECK(output.numel() == n_rows * k,
                "attn_core_inplace_cuda.backward_: output has ", output.numel(),
                " elements, expected rows * cols_output = ", n_rows, " * ", k);
    TORCH_CHECK(d_ov.numel() == n_rows * c_v,
                "attn_core_inplace_cuda.backward_: d_ov has ", d_ov.numel(),
                " elements, expected rows * cols_values = ", n_rows, " * ", c_v);
    if (output.numel() == 0) {
        return;
    }
    TORCH_CHECK(c_v > 0 && values.numel() % (k * c_v) == 0,
                "attn_core_inplace_cuda.backward_: values has ", values.numel(),
                " elements, not a multiple of cols_output * cols_values = ", k * c_v);
    const int64_t batch = values.numel() / (k * c_v);
    TORCH_CHECK(batch > 0 && n_rows % batch == 0,
                "attn_core_inplace_cuda.backward_: rows = ", n_rows,
                " is not a multiple of the number of [K, C_v] value matrices, ", batch);
    const int64_t q = n_rows / batch;

    at::NoGradGuard no_grad;
    auto out = output.view({batch, q, k});
    auto y = out.to(at::kFloat);
    auto g = d_ov.view({batch, q, c_v}).to(at::kFloat);
    auto v = values.view({batch, k, c_v}).to(at::kFloat);
    auto dy = at::bmm(g, v.transpose(1, 2));          // [B, Q, K]
    auto dot = (y * dy).sum(/*dim=*/-1, /*keepdim=*/true);  // [B, Q, 1]
    out.copy_((dy - dot) * y);
}
