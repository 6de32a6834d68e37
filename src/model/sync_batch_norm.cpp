// Global ("synchronised") BatchNorm in train mode: a libtorch autograd
// function whose forward and backward each sum per-channel statistics across
// ranks through a callback, as torch.nn.SyncBatchNorm does.
//
// This file knows nothing of ranks or MPI: `sum(ctx, tensor)` sums a float64
// tensor in place across the job (src/model/norm.rs gives it; the engine
// implements it with src/comm). Called by autograd on the thread that runs
// the backward pass (the main thread for CPU tensors).
//
// Forward, for x [N, C, ...] on this rank (n = N·∏spatial rows per channel):
//   per channel Σx and Σx² over this rank's rows, accumulated in float64,
//   summed with the count across ranks: one sum of 1 + 2C doubles;
//   mean = S1/N, var = S2/N - mean² (biased, for normalising);
//   y = (x - mean)/sqrt(var + eps)·weight + bias (libtorch's fused eval-mode
//   batch_norm with these statistics);
//   running_mean ← (1 - m)·running_mean + m·mean,
//   running_var  ← (1 - m)·running_var + m·var·N/(N - 1)   (unbiased, as PyTorch).
// Backward, given dy: libtorch's fused eval-mode backward with these
//   statistics gives dy·weight·invstd and this rank's Σdy·x̂ and Σdy (x̂ =
//   (x - mean)·invstd), which are the weight's and bias's local gradients
//   (the engine sums them with every other gradient); the two sums, summed
//   across ranks (2C doubles), give train mode's correction:
//   dx = weight·invstd·(dy - Σdy/N - x̂·Σdy·x̂/N).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <string>

extern "C" {
// Sums a float64 tensor in place across ranks; returns 0 on success.
typedef int (*sfron_sum_fn)(void* ctx, at::Tensor* t);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Every dimension but the channels' (1).
std::vector<int64_t> reduced_dims(const at::Tensor& x) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    return dims;
}

// [1, C, 1, ...] to broadcast a per-channel vector against x.
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = x.size(1);
    return v.reshape(shape);
}

void sum_across(int64_t fn, int64_t ctx, at::Tensor& t) {
    auto sum = reinterpret_cast<sfron_sum_fn>(fn);
    if (sum(reinterpret_cast<void*>(ctx), &t) != 0) {
        throw std::runtime_error("global BatchNorm: summing statistics across ranks failed");
    }
}

struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& bias,
                              at::Tensor running_mean, at::Tensor running_var,
                              double momentum, double eps, int64_t sum_fn, int64_t sum_ctx) {
        // Statistics in float32 at least (bf16 autocast hands in bf16).
        const at::Tensor x = input.scalar_type() == at::kDouble ? input : input.to(at::kFloat);
        const int64_t channels = x.size(1);
        const auto dims = reduced_dims(x);
        const int64_t n = channels == 0 ? 0 : x.numel() / channels;
        auto opts = x.options().dtype(at::kDouble);
        at::Tensor stats = at::zeros({1 + 2 * channels}, opts);
        if (n > 0) {
            // Σx and Σx² accumulated in float64: five times faster than
            // var_mean on the CPU, and exact enough (the variance below loses
            // only mean²/var float64 ulps to cancellation).
            stats.narrow(0, 0, 1).fill_(static_cast<double>(n));
            stats.narrow(0, 1, channels).copy_(x.sum(dims, false, at::kDouble));
            stats.narrow(0, 1 + channels, channels).copy_((x * x).sum(dims, false, at::kDouble));
        }
        sum_across(sum_fn, sum_ctx, stats);
        const double count = stats[0].item<double>();
        if (count < 1) {
            throw std::runtime_error("global BatchNorm: no samples on any rank");
        }
        at::Tensor mean = stats.narrow(0, 1, channels) / count;
        at::Tensor var = (stats.narrow(0, 1 + channels, channels) / count - mean * mean).clamp_min(0);
        {
            at::NoGradGuard guard;
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
            const double unbiased = count > 1 ? count / (count - 1) : 1.0;
            running_var.mul_(1 - momentum).add_((var * unbiased).to(running_var.scalar_type()), momentum);
        }
        at::Tensor mean_x = mean.to(x.scalar_type());
        at::Tensor var_x = var.to(x.scalar_type());
        // The normalisation in one fused pass: eval-mode batch_norm with the
        // global statistics in the place of the running ones.
        at::Tensor y = n > 0 ? at::batch_norm(x, weight, bias, mean_x, var_x, /*training=*/false,
                                              /*momentum=*/0.0, eps, /*cudnn_enabled=*/true)
                             : at::empty_like(x);
        ctx->save_for_backward({x, weight, mean_x, var_x});
        ctx->saved_data["count"] = count;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["sum_fn"] = sum_fn;
        ctx->saved_data["sum_ctx"] = sum_ctx;
        ctx->saved_data["input_type"] = static_cast<int64_t>(input.scalar_type());
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const at::Tensor& x = saved[0];
        const at::Tensor& weight = saved[1];
        const at::Tensor& mean = saved[2];
        const at::Tensor& var = saved[3];
        const double count = ctx->saved_data["count"].toDouble();
        const double eps = ctx->saved_data["eps"].toDouble();
        const at::Tensor dy = grads[0].to(x.scalar_type()).contiguous(x.suggest_memory_format());
        const int64_t channels = x.size(1);
        // Eval-mode backward with the global statistics, fused: dx = dy·w·invstd,
        // and this rank's Σdy·x̂ (the weight's gradient) and Σdy (the bias's).
        // A rank with no samples adds zeros to the sums (libtorch's kernel
        // divides by the sample count: it must not see an empty batch).
        at::Tensor dx, dweight, dbias;
        if (x.numel() == 0) {
            dx = at::zeros_like(x);
            dweight = at::zeros({channels}, weight.options());
            dbias = at::zeros({channels}, weight.options());
        } else {
            auto parts = at::native_batch_norm_backward(dy, x, weight, mean, var, {}, {},
                                                        /*train=*/false, eps, {true, true, true});
            dx = std::get<0>(parts);
            dweight = std::get<1>(parts);
            dbias = std::get<2>(parts);
        }
        at::Tensor sums = at::empty({2 * channels}, x.options().dtype(at::kDouble));
        sums.narrow(0, 0, channels).copy_(dbias);
        sums.narrow(0, channels, channels).copy_(dweight);
        sum_across(ctx->saved_data["sum_fn"].toInt(), ctx->saved_data["sum_ctx"].toInt(), sums);
        // Train mode subtracts the global batch's mean of dy and of dy·x̂:
        // dx -= w·invstd·Σdy/N + x̂·w·invstd·Σdy·x̂/N, i.e. dx += x·(-b) + (mean·b - a)
        // with a = w·invstd·Σdy/N, b = w·invstd²·Σdy·x̂/N.
        const at::Tensor invstd = (var.to(at::kDouble) + eps).rsqrt();
        const at::Tensor w = weight.to(at::kDouble);
        const at::Tensor a = w * invstd * sums.narrow(0, 0, channels) / count;
        const at::Tensor b = w * invstd * invstd * sums.narrow(0, channels, channels) / count;
        const at::Tensor shift = (mean.to(at::kDouble) * b - a).to(x.scalar_type());
        dx.addcmul_(x, per_channel((-b).to(x.scalar_type()), x));
        dx.add_(per_channel(shift, x));
        const auto input_type = static_cast<at::ScalarType>(ctx->saved_data["input_type"].toInt());
        return {dx.to(input_type), dweight, dbias, at::Tensor(), at::Tensor(),
                at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

void set_error(char* err, size_t len, const char* what) {
    if (err != nullptr && len > 0) {
        std::strncpy(err, what, len - 1);
        err[len - 1] = '\0';
    }
}

}  // namespace

extern "C" {

// Global BatchNorm of `input` in train mode (see the file's head). Returns a
// new tensor (the caller owns it), or null with a message in `err`.
at::Tensor* sfron_sync_batch_norm(const at::Tensor* input, const at::Tensor* weight,
                                  const at::Tensor* bias, at::Tensor* running_mean,
                                  at::Tensor* running_var, double momentum, double eps,
                                  sfron_sum_fn sum, void* sum_ctx, char* err, size_t err_len) {
    try {
        at::Tensor y = SyncBatchNorm::apply(*input, *weight, *bias, *running_mean, *running_var,
                                            momentum, eps, reinterpret_cast<int64_t>(sum),
                                            reinterpret_cast<int64_t>(sum_ctx));
        return new at::Tensor(std::move(y));
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return nullptr;
    }
}

}  // extern "C"
