// AdamW as one fused libtorch kernel over every parameter:
// at::_fused_adamw_, what torch.optim.AdamW(fused=True) calls (one pass
// reading p, g, m, v and writing p, m, v, on the CPU and on CUDA), which
// tch does not bind. The step count comes in as a float tensor on the
// parameters' device, already incremented, as torch.optim passes it.

#include <ATen/ATen.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor* const* ts, size_t n) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        out.push_back(*ts[i]);
    }
    return out;
}

}  // namespace

extern "C" {

// One AdamW step of `n` parameters in place (amsgrad and maximize off, no
// grad scaling). Returns 0, or 1 with a message in `err`.
int sfron_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                      at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs, size_t n,
                      const at::Tensor* step, double lr, double beta1, double beta2,
                      double weight_decay, double eps, char* err, size_t err_len) {
    try {
        const std::vector<at::Tensor> steps(n, *step);
        at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n),
                          list(exp_avg_sqs, n), {}, steps, lr, beta1, beta2, weight_decay, eps,
                          /*amsgrad=*/false, /*maximize=*/false);
        return 0;
    } catch (const std::exception& e) {
        if (err != nullptr && err_len > 0) {
            std::strncpy(err, e.what(), err_len - 1);
            err[err_len - 1] = '\0';
        }
        return 1;
    }
}

}  // extern "C"
