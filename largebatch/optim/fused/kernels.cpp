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
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t lo, int64_t hi) {
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

// Whether every list holds contiguous fp32 CPU tensors shaped like the first list's.
bool fusable(const std::vector<std::vector<at::Tensor>>& lists) {
  for (const auto& list : lists) {
    if (list.size() != lists[0].size()) return false;
    for (size_t i = 0; i < list.size(); ++i) {
      const auto& t = list[i];
      if (!t.device().is_cpu() || t.scalar_type() != at::kFloat || !t.is_contiguous() ||
          t.sizes() != lists[0][i].sizes()) {
        return false;
      }
    }
  }
  return true;
}

void check_scalars(const std::vector<at::Tensor>& scalars, size_t n, const char* what) {
  TORCH_CHECK(scalars.size() == n, what, ": expected ", n, " tensors, got ", scalars.size());
  for (const auto& s : scalars) {
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1, what,
                " must be one-element fp32 CPU tensors");
  }
}

std::vector<int64_t> numels_of(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> numels;
  for (const auto& t : tensors) numels.push_back(t.numel());
  return numels;
}

float* at_offset(const at::Tensor& t, int64_t offset) { return t.data_ptr<float>() + offset; }

// The element loops take plain pointers and by-value scalars so that they vectorise. Sums of
// squares keep kLanes partial sums so that consecutive additions do not wait on each other, and
// every loop prefetches its streams kPrefetch elements ahead: one core's hardware prefetchers
// alone leave about a tenth of its memory bandwidth unused here.
constexpr int64_t kLanes = 32;
constexpr int64_t kPrefetch = 1024;

// body(j, lane) for j in [0, n) with lane = j % kLanes; whole blocks of kLanes run as a simd loop.
template <typename Body, typename... Streams>
inline void for_blocks(int64_t n, const Body& body, const Streams*... streams) {
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    (__builtin_prefetch(streams + j0 + kPrefetch, 0, 2), ...);
    (__builtin_prefetch(streams + j0 + kPrefetch + kLanes / 2, 0, 2), ...);
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) body(j0 + l, l);
  }
  for (int64_t l = 0; j0 + l < n; ++l) body(j0 + l, l);
}

SumSquares add_lanes(const double* a, const double* b) {
  SumSquares sums;
  for (int64_t l = 0; l < kLanes; ++l) {
    sums.first += a[l];
    sums.second += b[l];
  }
  return sums;
}

SumSquares sum_squares(const float* __restrict x, const float* __restrict y, int64_t n) {
  double a[kLanes] = {}, b[kLanes] = {};
  for_blocks(
      n,
      [&](int64_t j, int64_t l) {
        a[l] += static_cast<double>(x[j]) * x[j];
        b[l] += static_cast<double>(y[j]) * y[j];
      },
      x, y);
  return add_lanes(a, b);
}

void lars_update(float* __restrict w, const float* __restrict g, float* __restrict m, int64_t n,
                 float lr, float mu, float wd, float ratio, bool nesterov) {
  if (m == nullptr) {
    for_blocks(
        n, [&](int64_t j, int64_t) { w[j] -= lr * (ratio * (g[j] + wd * w[j])); }, w, g);
  } else if (nesterov) {
    for_blocks(
        n,
        [&](int64_t j, int64_t) {
          const float d = ratio * (g[j] + wd * w[j]);
          const float buf = mu * m[j] + d;
          m[j] = buf;
          w[j] -= lr * (d + mu * buf);
        },
        w, g, m);
  } else {
    for_blocks(
        n,
        [&](int64_t j, int64_t) {
          const float buf = mu * m[j] + ratio * (g[j] + wd * w[j]);
          m[j] = buf;
          w[j] -= lr * buf;
        },
        w, g, m);
  }
}

struct AdamCoefficients {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_sqrt_bc2, eps, wd;
};

// Updates the moments; returns the sums of squares of w and of u = m̂ / (sqrt(v̂) + eps) + wd*w.
SumSquares lamb_moments(const float* __restrict w, const float* __restrict g, float* __restrict m,
                        float* __restrict v, int64_t n, AdamCoefficients k) {
  double a[kLanes] = {}, b[kLanes] = {};
  for_blocks(
      n,
      [&](int64_t j, int64_t l) {
        const float mj = k.beta1 * m[j] + k.one_minus_beta1 * g[j];
        const float vj = k.beta2 * v[j] + k.one_minus_beta2 * g[j] * g[j];
        m[j] = mj;
        v[j] = vj;
        const float u = (mj * k.inv_bc1) / (std::sqrt(vj) * k.inv_sqrt_bc2 + k.eps) + k.wd * w[j];
        a[l] += static_cast<double>(w[j]) * w[j];
        b[l] += static_cast<double>(u) * u;
      },
      w, g, m, v);
  return add_lanes(a, b);
}

void lamb_update(float* __restrict w, const float* __restrict m, const float* __restrict v,
                 int64_t n, AdamCoefficients k, float step) {
  for_blocks(
      n,
      [&](int64_t j, int64_t) {
        w[j] -= step * ((m[j] * k.inv_bc1) / (std::sqrt(v[j]) * k.inv_sqrt_bc2 + k.eps) + k.wd * w[j]);
      },
      w, m, v);
}

// You, Gitman & Ginsburg 2017, eq. 6: g' = g + wd*w; m = mu*m + ratio*g'; w -= lr*m.
void lars_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& momentum_buffers,
               const std::vector<at::Tensor>& trust_ratios, double lr, double momentum,
               double weight_decay, double trust_coefficient, double eps, bool nesterov,
               bool trust_clip, bool adapt) {
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(has_momentum ? fusable({params, grads, momentum_buffers}) : fusable({params, grads}),
              "lars_step needs contiguous fp32 CPU tensors shaped like the parameters");
  check_scalars(trust_ratios, params.size(), "trust_ratios");
  const float wd = weight_decay;

  two_passes(
      numels_of(params),
      [&](int64_t t, int64_t begin, int64_t end) {
        if (!adapt) return SumSquares{};
        return sum_squares(at_offset(params[t], begin), at_offset(grads[t], begin), end - begin);
      },
      [&](int64_t t, SumSquares sums) {
        const float w_norm = std::sqrt(sums.first), g_norm = std::sqrt(sums.second);
        float ratio = 1.0f;
        if (adapt && w_norm > 0 && g_norm > 0) {
          ratio = static_cast<float>(trust_coefficient) * w_norm /
                  (g_norm + wd * w_norm + static_cast<float>(eps));
          if (trust_clip) ratio = std::min(ratio / static_cast<float>(lr), 1.0f);
        }
        *trust_ratios[t].data_ptr<float>() = ratio;
        return ratio;
      },
      [&](int64_t t, int64_t begin, int64_t end, float ratio) {
        lars_update(at_offset(params[t], begin), at_offset(grads[t], begin),
                    has_momentum ? at_offset(momentum_buffers[t], begin) : nullptr, end - begin,
                    lr, momentum, wd, ratio, nesterov);
      });
}

// You et al. 2019, Algorithm 2: u = m̂ / (sqrt(v̂) + eps) + wd*w; w -= lr * ||w||/||u|| * u.
void lamb_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& trust_ratios,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool bias_correction, std::optional<double> trust_clip, bool adapt) {
  TORCH_CHECK(fusable({params, grads, exp_avgs, exp_avg_sqs}),
              "lamb_step needs contiguous fp32 CPU tensors shaped like the parameters");
  check_scalars(steps, params.size(), "steps");
  check_scalars(trust_ratios, params.size(), "trust_ratios");
  std::vector<AdamCoefficients> coefficients;
  for (const auto& step : steps) {
    const double t = ++*step.data_ptr<float>();
    const double bc1 = bias_correction ? 1.0 - std::pow(beta1, t) : 1.0;
    const double bc2 = bias_correction ? 1.0 - std::pow(beta2, t) : 1.0;
    coefficients.push_back({static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
                            static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                            static_cast<float>(1.0 / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
                            static_cast<float>(eps), static_cast<float>(weight_decay)});
  }

  two_passes(
      numels_of(params),
      [&](int64_t t, int64_t begin, int64_t end) {
        return lamb_moments(at_offset(params[t], begin), at_offset(grads[t], begin),
                            at_offset(exp_avgs[t], begin), at_offset(exp_avg_sqs[t], begin),
                            end - begin, coefficients[t]);
      },
      [&](int64_t t, SumSquares sums) {
        const float w_norm = std::sqrt(sums.first), u_norm = std::sqrt(sums.second);
        float ratio = 1.0f;
        if (adapt && w_norm > 0 && u_norm > 0) {
          ratio = w_norm / u_norm;
          if (trust_clip) ratio = std::clamp(ratio, 0.0f, static_cast<float>(*trust_clip));
        }
        *trust_ratios[t].data_ptr<float>() = ratio;
        return ratio;
      },
      [&](int64_t t, int64_t begin, int64_t end, float ratio) {
        lamb_update(at_offset(params[t], begin), at_offset(exp_avgs[t], begin),
                    at_offset(exp_avg_sqs[t], begin), end - begin, coefficients[t],
                    static_cast<float>(lr) * ratio);
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def("fusable", &fusable, "Whether the lists hold contiguous fp32 CPU tensors of one shape");
  module.def("lars_step", &lars_step, "LARS step in place; writes each tensor's trust ratio",
             no_gil);
  module.def("lamb_step", &lamb_step, "LAMB step in place; counts steps, writes trust ratios",
             no_gil);
}
