// Fused CPU steps for LARS and LAMB on contiguous fp32 tensors.
//
// A trust ratio needs a whole tensor's norms before any of it can be updated, so each tensor takes
// two passes: the first reduces the norms (LAMB also updates its moments there), the second
// applies the update. Finishing one tensor before starting the next keeps it in the last-level
// cache for the second pass. Tensors of up to one chunk go whole to one thread; larger ones are
// split into fixed chunks shared by all threads. Norms sum per chunk and then in chunk order, so
// they do not depend on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;

struct SumSquares {
  double first = 0.0;
  double second = 0.0;
};

// Runs, for each tensor t: sums = sum over its chunks of pass1(t, begin, end); ratio = ratio_of(t,
// sums); pass2(t, begin, end, ratio) on each chunk.
template <typename Pass1, typename RatioOf, typename Pass2>
void two_passes(const std::vector<int64_t>& numels, const Pass1& pass1, const RatioOf& ratio_of,
                const Pass2& pass2) {
  std::vector<int64_t> small, large;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    (numels[t] <= kChunk ? small : large).push_back(t);
  }
  at::parallel_for(0, small.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = small[i];
      pass2(t, 0, numels[t], ratio_of(t, pass1(t, 0, numels[t])));
    }
  });
  for (const int64_t t : large) {
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    std::vector<SumSquares> partial(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        partial[c] = pass1(t, c * kChunk, std::min((c + 1) * kChunk, numels[t]));
      }
    });
    SumSquares sums;
    for (const auto& p : partial) {
      sums.first += p.first;
      sums.second += p.second;
    }
    const float ratio = ratio_of(t, sums);
    at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        pass2(t, c * kChunk, std::min((c + 1) * kChunk, numels[t]), ratio);
      }
    });
  }
}

std::vector<int64_t> check_and_count(const std::vector<std::vector<at::Tensor>>& lists,
                                     const std::vector<at::Tensor>& params) {
  for (const auto& list : lists) {
    TORCH_CHECK(list.size() == params.size(), "expected ", params.size(), " tensors, got ",
                list.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& t = list[i];
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                  "tensor ", i, " must be a contiguous fp32 CPU tensor");
      TORCH_CHECK(t.sizes() == params[i].sizes(), "tensor ", i, " has shape ", t.sizes(),
                  " but its parameter has shape ", params[i].sizes());
    }
  }
  std::vector<int64_t> numels;
  for (const auto& p : params) numels.push_back(p.numel());
  return numels;
}

float* at_offset(const at::Tensor& t, int64_t offset) { return t.data_ptr<float>() + offset; }

// The element loops take plain pointers and by-value scalars so that they vectorise.

SumSquares sum_squares(const float* __restrict x, const float* __restrict y, int64_t n) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < n; ++j) {
    a += static_cast<double>(x[j]) * x[j];
    b += static_cast<double>(y[j]) * y[j];
  }
  return {a, b};
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

// Updates the moments; returns the sums of squares of w and of u = m̂ / (sqrt(v̂) + eps) + wd*w.
SumSquares lamb_moments(const float* __restrict w, const float* __restrict g, float* __restrict m,
                        float* __restrict v, int64_t n, AdamCoefficients k) {
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
  return {a, b};
}

void lamb_update(float* __restrict w, const float* __restrict m, const float* __restrict v,
                 int64_t n, AdamCoefficients k, float step) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    w[j] -= step * ((m[j] * k.inv_bc1) / (std::sqrt(v[j]) * k.inv_sqrt_bc2 + k.eps) + k.wd * w[j]);
  }
}

// You, Gitman & Ginsburg 2017, eq. 6: g' = g + wd*w; m = mu*m + ratio*g'; w -= lr*m.
at::Tensor lars_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& momentum_buffers, double lr, double momentum,
                     double weight_decay, double trust_coefficient, double eps, bool nesterov,
                     bool trust_clip, bool adapt) {
  const bool has_momentum = momentum != 0.0;
  const auto numels = has_momentum ? check_and_count({params, grads, momentum_buffers}, params)
                                   : check_and_count({params, grads}, params);
  at::Tensor ratios = at::ones({static_cast<int64_t>(params.size())}, at::kFloat);
  float* ratio = ratios.data_ptr<float>();
  const float wd = weight_decay;

  two_passes(
      numels,
      [&](int64_t t, int64_t begin, int64_t end) {
        if (!adapt) return SumSquares{};
        return sum_squares(at_offset(params[t], begin), at_offset(grads[t], begin), end - begin);
      },
      [&](int64_t t, SumSquares sums) {
        const float w_norm = std::sqrt(sums.first), g_norm = std::sqrt(sums.second);
        if (adapt && w_norm > 0 && g_norm > 0) {
          const float r = static_cast<float>(trust_coefficient) * w_norm /
                          (g_norm + wd * w_norm + static_cast<float>(eps));
          ratio[t] = trust_clip ? std::min(r / static_cast<float>(lr), 1.0f) : r;
        }
        return ratio[t];
      },
      [&](int64_t t, int64_t begin, int64_t end, float r) {
        lars_update(at_offset(params[t], begin), at_offset(grads[t], begin),
                    has_momentum ? at_offset(momentum_buffers[t], begin) : nullptr, end - begin,
                    lr, momentum, wd, r, nesterov);
      });
  return ratios;
}

// You et al. 2019, Algorithm 2: u = m̂ / (sqrt(v̂) + eps) + wd*w; w -= lr * ||w||/||u|| * u.
at::Tensor lamb_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs,
                     const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<double>& bias_correction1,
                     const std::vector<double>& bias_correction2, double lr, double beta1,
                     double beta2, double eps, double weight_decay,
                     std::optional<double> trust_clip, bool adapt) {
  const auto numels = check_and_count({params, grads, exp_avgs, exp_avg_sqs}, params);
  const int64_t n = params.size();
  TORCH_CHECK(static_cast<int64_t>(bias_correction1.size()) == n &&
                  static_cast<int64_t>(bias_correction2.size()) == n,
              "expected one bias correction per parameter");
  std::vector<AdamCoefficients> coefficients(n);
  for (int64_t t = 0; t < n; ++t) {
    coefficients[t] = {static_cast<float>(beta1),
                       static_cast<float>(beta2),
                       static_cast<float>(1.0 / bias_correction1[t]),
                       static_cast<float>(1.0 / std::sqrt(bias_correction2[t])),
                       static_cast<float>(eps),
                       static_cast<float>(weight_decay)};
  }
  at::Tensor ratios = at::ones({n}, at::kFloat);
  float* ratio = ratios.data_ptr<float>();

  two_passes(
      numels,
      [&](int64_t t, int64_t begin, int64_t end) {
        return lamb_moments(at_offset(params[t], begin), at_offset(grads[t], begin),
                            at_offset(exp_avgs[t], begin), at_offset(exp_avg_sqs[t], begin),
                            end - begin, coefficients[t]);
      },
      [&](int64_t t, SumSquares sums) {
        const float w_norm = std::sqrt(sums.first), u_norm = std::sqrt(sums.second);
        if (adapt && w_norm > 0 && u_norm > 0) {
          const float r = w_norm / u_norm;
          ratio[t] = trust_clip ? std::clamp(r, 0.0f, static_cast<float>(*trust_clip)) : r;
        }
        return ratio[t];
      },
      [&](int64_t t, int64_t begin, int64_t end, float r) {
        lamb_update(at_offset(params[t], begin), at_offset(exp_avgs[t], begin),
                    at_offset(exp_avg_sqs[t], begin), end - begin, coefficients[t],
                    static_cast<float>(lr) * r);
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
