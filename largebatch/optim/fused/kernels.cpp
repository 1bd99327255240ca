// Fused CPU steps for LARS and LAMB on fp32 tensors.
//
// Each step makes two passes over every tensor: the first reduces the norms the trust ratio needs
// (LAMB also updates its moments there), the second applies the update. Tensors are cut into fixed
// chunks and the chunks are shared out among at::parallel_for threads by element count, so the
// norms sum in the same order for any thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Plan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> starts;  // offset of each chunk in the concatenation of all tensors
  int64_t total = 0;
};

Plan make_plan(const std::vector<at::Tensor>& tensors) {
  Plan plan;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t numel = tensors[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      plan.chunks.push_back({t, begin, std::min(begin + kChunk, numel)});
      plan.starts.push_back(plan.total + begin);
    }
    plan.total += numel;
  }
  return plan;
}

template <typename F>
void for_each_chunk(const Plan& plan, const F& f) {
  at::parallel_for(0, plan.total, kChunk, [&](int64_t lo, int64_t hi) {
    auto i = std::lower_bound(plan.starts.begin(), plan.starts.end(), lo) - plan.starts.begin();
    for (; i < static_cast<int64_t>(plan.starts.size()) && plan.starts[i] < hi; ++i) {
      f(i, plan.chunks[i]);
    }
  });
}

// Square roots of the per-tensor sums of the per-chunk partial sums, in chunk order.
std::vector<float> tensor_norms(const Plan& plan, const std::vector<double>& partial, int64_t n) {
  std::vector<double> sums(n, 0.0);
  for (size_t i = 0; i < plan.chunks.size(); ++i) sums[plan.chunks[i].tensor] += partial[i];
  std::vector<float> norms(n);
  for (int64_t t = 0; t < n; ++t) norms[t] = static_cast<float>(std::sqrt(sums[t]));
  return norms;
}

void check_like(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& params,
                const char* what) {
  TORCH_CHECK(tensors.size() == params.size(), what, ": expected ", params.size(), " tensors, got ",
              tensors.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
                "[", i, "] must be a contiguous fp32 CPU tensor");
    TORCH_CHECK(t.sizes() == params[i].sizes(), what, "[", i, "] has shape ", t.sizes(),
                " but its parameter has shape ", params[i].sizes());
  }
}

// Element loops over one chunk: plain pointers and by-value scalars so that they vectorise.

void sum_squares(const float* __restrict x, const float* __restrict y, int64_t n, double& sx,
                 double& sy) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < n; ++j) {
    a += static_cast<double>(x[j]) * x[j];
    b += static_cast<double>(y[j]) * y[j];
  }
  sx = a;
  sy = b;
}

void lars_update(float* __restrict w, const float* __restrict g, float* __restrict m, int64_t n,
                 float lr, float mu, float wd, float ratio, bool nesterov) {
  if (m == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) w[j] -= lr * (ratio * (g[j] + wd * w[j]));
  } else if (nesterov) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float d = ratio * (g[j] + wd * w[j]);
      const float buf = mu * m[j] + d;
      m[j] = buf;
      w[j] -= lr * (d + mu * buf);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float buf = mu * m[j] + ratio * (g[j] + wd * w[j]);
      m[j] = buf;
      w[j] -= lr * buf;
    }
  }
}

struct AdamCoefficients {
  float beta1, beta2, inv_bc1, inv_sqrt_bc2, eps, wd;
};

// Updates the moments and returns the sums of squares of w and of u = m_hat / (sqrt(v_hat) + eps) + wd*w.
void lamb_moments(const float* __restrict w, const float* __restrict g, float* __restrict m,
                  float* __restrict v, int64_t n, AdamCoefficients k, double& sw, double& su) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < n; ++j) {
    const float mj = k.beta1 * m[j] + (1.0f - k.beta1) * g[j];
    const float vj = k.beta2 * v[j] + (1.0f - k.beta2) * g[j] * g[j];
    m[j] = mj;
    v[j] = vj;
    const float u = (mj * k.inv_bc1) / (std::sqrt(vj) * k.inv_sqrt_bc2 + k.eps) + k.wd * w[j];
    a += static_cast<double>(w[j]) * w[j];
    b += static_cast<double>(u) * u;
  }
  sw = a;
  su = b;
}

void lamb_update(float* __restrict w, const float* __restrict m, const float* __restrict v,
                 int64_t n, AdamCoefficients k, float step) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    w[j] -= step * ((m[j] * k.inv_bc1) / (std::sqrt(v[j]) * k.inv_sqrt_bc2 + k.eps) + k.wd * w[j]);
  }
}

float* chunk_ptr(const at::Tensor& t, const Chunk& c) { return t.data_ptr<float>() + c.begin; }

// You, Gitman & Ginsburg 2017, eq. 6: g' = g + wd*w; m = mu*m + ratio*g'; w -= lr*m.
at::Tensor lars_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& momentum_buffers, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps, bool nesterov,
                     bool trust_clip, bool adapt) {
  const int64_t n = params.size();
  check_like(params, params, "params");
  check_like(grads, params, "grads");
  if (momentum != 0.0) check_like(momentum_buffers, params, "momentum_buffers");
  const Plan plan = make_plan(params);
  const float wd = weight_decay;

  at::Tensor ratios = at::ones({n}, at::kFloat);
  float* ratio = ratios.data_ptr<float>();
  if (adapt) {
    std::vector<double> w_sq(plan.chunks.size()), g_sq(plan.chunks.size());
    for_each_chunk(plan, [&](int64_t i, const Chunk& c) {
      sum_squares(chunk_ptr(params[c.tensor], c), chunk_ptr(grads[c.tensor], c), c.end - c.begin,
                  w_sq[i], g_sq[i]);
    });
    const auto w_norm = tensor_norms(plan, w_sq, n), g_norm = tensor_norms(plan, g_sq, n);
    for (int64_t t = 0; t < n; ++t) {
      if (w_norm[t] > 0 && g_norm[t] > 0) {
        const float r = static_cast<float>(trust_coefficient) * w_norm[t] /
                        (g_norm[t] + wd * w_norm[t] + static_cast<float>(eps));
        ratio[t] = trust_clip ? std::min(r / static_cast<float>(lr), 1.0f) : r;
      }
    }
  }

  for_each_chunk(plan, [&](int64_t, const Chunk& c) {
    float* m = momentum == 0.0 ? nullptr : chunk_ptr(momentum_buffers[c.tensor], c);
    lars_update(chunk_ptr(params[c.tensor], c), chunk_ptr(grads[c.tensor], c), m, c.end - c.begin,
                lr, momentum, wd, ratio[c.tensor], nesterov);
  });
  return ratios;
}

// You et al. 2019, Algorithm 2: u = m_hat / (sqrt(v_hat) + eps) + wd*w; w -= lr * ||w||/||u|| * u.
at::Tensor lamb_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs,
                     const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<double>& bias_correction1,
                     const std::vector<double>& bias_correction2, double lr, double beta1,
                     double beta2, double eps, double weight_decay,
                     std::optional<double> trust_clip, bool adapt) {
  const int64_t n = params.size();
  check_like(params, params, "params");
  check_like(grads, params, "grads");
  check_like(exp_avgs, params, "exp_avgs");
  check_like(exp_avg_sqs, params, "exp_avg_sqs");
  TORCH_CHECK(static_cast<int64_t>(bias_correction1.size()) == n &&
                  static_cast<int64_t>(bias_correction2.size()) == n,
              "expected one bias correction per parameter");
  const Plan plan = make_plan(params);
  std::vector<AdamCoefficients> coefficients(n);
  for (int64_t t = 0; t < n; ++t) {
    coefficients[t] = {static_cast<float>(beta1),
                       static_cast<float>(beta2),
                       static_cast<float>(1.0 / bias_correction1[t]),
                       static_cast<float>(1.0 / std::sqrt(bias_correction2[t])),
                       static_cast<float>(eps),
                       static_cast<float>(weight_decay)};
  }

  std::vector<double> w_sq(plan.chunks.size()), u_sq(plan.chunks.size());
  for_each_chunk(plan, [&](int64_t i, const Chunk& c) {
    lamb_moments(chunk_ptr(params[c.tensor], c), chunk_ptr(grads[c.tensor], c),
                 chunk_ptr(exp_avgs[c.tensor], c), chunk_ptr(exp_avg_sqs[c.tensor], c),
                 c.end - c.begin, coefficients[c.tensor], w_sq[i], u_sq[i]);
  });

  at::Tensor ratios = at::ones({n}, at::kFloat);
  float* ratio = ratios.data_ptr<float>();
  if (adapt) {
    const auto w_norm = tensor_norms(plan, w_sq, n), u_norm = tensor_norms(plan, u_sq, n);
    for (int64_t t = 0; t < n; ++t) {
      if (w_norm[t] > 0 && u_norm[t] > 0) {
        const float r = w_norm[t] / u_norm[t];
        ratio[t] = trust_clip ? std::clamp(r, 0.0f, static_cast<float>(*trust_clip)) : r;
      }
    }
  }

  for_each_chunk(plan, [&](int64_t, const Chunk& c) {
    lamb_update(chunk_ptr(params[c.tensor], c), chunk_ptr(exp_avgs[c.tensor], c),
                chunk_ptr(exp_avg_sqs[c.tensor], c), c.end - c.begin, coefficients[c.tensor],
                static_cast<float>(lr) * ratio[c.tensor]);
  });
  return ratios;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def("lars_step", &lars_step, "LARS step over fp32 CPU tensors; returns the trust ratios",
             no_gil);
  module.def("lamb_step", &lamb_step, "LAMB step over fp32 CPU tensors; returns the trust ratios",
             no_gil);
}
