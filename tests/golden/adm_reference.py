#!/usr/bin/env python3
"""PyTorch reference of the ADM Gaussian diffusion as DiT uses it (tests/adm.rs
runs it): the functions of facebookresearch/DiT's diffusion/ package
(gaussian_diffusion.py, respace.py, diffusion_utils.py, themselves from
openai/guided-diffusion) that training and sampling call, re-declared here
line for line (float64 numpy tables, _extract_into_tensor's float32
rounding, the same torch operations), for LossType.MSE, ModelMeanType.EPSILON
and ModelVarType LEARNED_RANGE or FIXED_LARGE.

  adm_reference.py make DIR    writes DIR/adm.safetensors with, for the full
                  1000-step linear process ("full") and its 250-step
                  respacing ("r250"), and each variance ("learned", "fixed"):
                  inputs x0, noise, z, t, out, and
                  {proc}_{var}_loss (training_losses' "loss"),
                  {proc}_{var}_psample[_clip] (p_sample with noise z),
                  {proc}_{var}_ddim{eta}[_clip] (ddim_sample, eta 0 and 1),
                  {proc}_map (the timestep map), {proc}_xt (q_sample).
"""

import enum
import sys

import numpy as np
import torch as th
from safetensors.torch import save_file


# --- diffusion_utils.py ---------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return th.where(x < -0.999, log_cdf_plus,
                    th.where(x > 0.999, log_one_minus_cdf_min, th.log(cdf_delta.clamp(min=1e-12))))


# --- gaussian_diffusion.py ------------------------------------------------

class Var(enum.Enum):
    LEARNED_RANGE = 1
    FIXED_LARGE = 2


def mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def get_named_beta_schedule_linear(num_diffusion_timesteps):
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res + th.zeros(broadcast_shape, device=timesteps.device)


class GaussianDiffusion:
    def __init__(self, *, betas, var):
        self.var = var
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

    def q_sample(self, x_start, t, noise):
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (_extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                          + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(self, model_output, x, t, clip_denoised=True):
        B, C = x.shape[:2]
        if self.var == Var.LEARNED_RANGE:
            model_output, model_var_values = th.split(model_output, C, dim=1)
            min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:
            model_log_variance = _extract_into_tensor(
                np.log(np.append(self.posterior_variance[1], self.betas[1:])), t, x.shape)
        pred_xstart = (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
                       - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "log_variance": model_log_variance, "pred_xstart": pred_xstart}

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) \
            / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def p_sample(self, model_output, x, t, noise, clip_denoised):
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_output, x, t, noise, clip_denoised, eta):
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return mean_pred + nonzero_mask * sigma * noise

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return th.where((t == 0), decoder_nll, kl)

    def training_losses(self, model_output, x_start, t, noise):
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.var == Var.LEARNED_RANGE:
            C = x_t.shape[1]
            model_output, model_var_values = th.split(model_output, C, dim=1)
            frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen_out, x_start, x_t, t)
        terms["mse"] = mean_flat((noise - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


# --- respace.py -----------------------------------------------------------

def space_timesteps(num_timesteps, section_counts):
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError("no stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def spaced(use_timesteps, betas, var):
    base = GaussianDiffusion(betas=betas, var=var)
    last_alpha_cumprod = 1.0
    new_betas, timestep_map = [], []
    for i, alpha_cumprod in enumerate(base.alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return GaussianDiffusion(betas=np.array(new_betas), var=var), timestep_map


def make(out_dir):
    g = th.Generator().manual_seed(0)
    n, c, h = 8, 4, 6
    x0 = (th.rand(n, c, h, h, generator=g) * 2.4 - 1.2).clamp(-1, 1)  # edges of [-1, 1] hit
    noise = th.randn(n, c, h, h, generator=g)
    z = th.randn(n, c, h, h, generator=g)
    out = th.randn(n, 2 * c, h, h, generator=g)
    out[:, c:] = th.rand(n, c, h, h, generator=g) * 2 - 1
    betas = get_named_beta_schedule_linear(1000)
    result = {"x0": x0, "noise": noise, "z": z, "out": out}
    for proc, spec in [("full", "1000"), ("r250", "250")]:
        for var_name, var in [("learned", Var.LEARNED_RANGE), ("fixed", Var.FIXED_LARGE)]:
            d, tmap = spaced(space_timesteps(1000, spec), betas, var)
            steps = d.num_timesteps
            t = th.tensor([0, 1, 2, steps // 4, steps // 2, steps - 2, steps - 1, 0])
            o = out if var == Var.LEARNED_RANGE else out[:, :c].contiguous()
            result[f"{proc}_t"] = t
            result[f"{proc}_map"] = th.tensor(tmap)
            result[f"{proc}_xt"] = d.q_sample(x0, t, noise)
            result[f"{proc}_{var_name}_loss"] = d.training_losses(o, x0, t, noise)["loss"]
            xt = result[f"{proc}_xt"]
            for clip in [False, True]:
                sfx = "_clip" if clip else ""
                result[f"{proc}_{var_name}_psample{sfx}"] = d.p_sample(o, xt, t, z, clip)
                for eta in [0, 1]:
                    result[f"{proc}_{var_name}_ddim{eta}{sfx}"] = d.ddim_sample(o, xt, t, z, clip, float(eta))
    save_file({k: v.contiguous() for k, v in result.items()}, f"{out_dir}/adm.safetensors")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "make":
        sys.exit(__doc__)
    make(sys.argv[2])
