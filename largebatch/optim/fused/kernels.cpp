// Fused CPU steps for LARS and LAMB on contiguous fp32 tensors.
//
// A trust ratio needs a whole tensor's norms before any of it can be updated, so each tensor takes
// two passes: the first reduces the norms (LAMB also updates its moments there), the second
// applies the update. Finishing one tensor before starting the next keeps it in cache for the
// second pass (lars_step, lamb_step). Sharded tensors need every shard's sums before any ratio, so
// the sharded path runs the first pass over all tensors (lars_sums, lamb_sums), leaves the
// reduction of the sums across processes to the caller, and then the second pass (lars_apply,
// lamb_apply); both paths share the arithmetic, so without a reduction they agree bit for bit.
// Tensors of up to one chunk go whole to one thread; larger ones are split into fixed chunks
// shared by all threads. Norms sum per chunk and then in chunk order, so they do not depend on the
// thread count. The second pass walks backwards through what the first pass walked forwards (each
// thread its own chunks, last first; in the sharded path also the tensors, last first): it starts
// with what the first pass touched last, still in the thread's cache, where a forward walk would
// evict each chunk just before reading it (a least-recently-used cache smaller than the data).
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

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// The indices of the tensors of up to one chunk, each done by one thread, and of the larger ones.
struct BySize {
  std::vector<int64_t> small, large;
};

BySize by_size(const std::vector<int64_t>& numels) {
  BySize tensors;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    (numels[t] <= kChunk ? tensors.small : tensors.large).push_back(t);
  }
  return tensors;
}

// pass1(t, begin, end) summed over the chunks of the large tensor t, in chunk order.
template <typename Pass1>
SumSquares chunked_sums(int64_t t, int64_t numel, const Pass1& pass1) {
  std::vector<SumSquares> partial(chunks_of(numel));
  at::parallel_for(0, chunks_of(numel), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      partial[c] = pass1(t, c * kChunk, std::min((c + 1) * kChunk, numel));
    }
  });
  SumSquares sums;
  for (const auto& p : partial) {
    sums.first += p.first;
    sums.second += p.second;
  }
  return sums;
}

// second.update(t, begin, end, ratio) on each chunk of the large tensor t: each thread takes the
// chunks it took in chunked_sums (parallel_for splits a range alike every time), last first.
template <typename Second>
void chunked_update(int64_t t, int64_t numel, float ratio, const Second& second) {
  at::parallel_for(0, chunks_of(numel), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = hi - 1; c >= lo; --c) {
      second.update(t, c * kChunk, std::min((c + 1) * kChunk, numel), ratio);
    }
  });
}

// Runs, for each tensor t: sums = sum over its chunks of pass1(t, begin, end); ratio =
// second.ratio(t, sums); second.update(t, begin, end, ratio) on each chunk.
template <typename Pass1, typename Second>
void two_passes(const std::vector<int64_t>& numels, const Pass1& pass1, const Second& second) {
  const BySize tensors = by_size(numels);
  at::parallel_for(0, static_cast<int64_t>(tensors.small.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = tensors.small[i];
      second.update(t, 0, numels[t], second.ratio(t, pass1(t, 0, numels[t])));
    }
  });
  for (const int64_t t : tensors.large) {
    chunked_update(t, numels[t], second.ratio(t, chunked_sums(t, numels[t], pass1)), second);
  }
}

// The first of two_passes for every tensor: an [n, 2] float64 tensor of each tensor's sums.
template <typename Pass1>
at::Tensor first_pass(const std::vector<int64_t>& numels, const Pass1& pass1) {
  at::Tensor sums = at::empty({static_cast<int64_t>(numels.size()), 2}, at::kDouble);
  double* out = sums.data_ptr<double>();
  const auto store = [&](int64_t t, SumSquares s) {
    out[2 * t] = s.first;
    out[2 * t + 1] = s.second;
  };
  const BySize tensors = by_size(numels);
  at::parallel_for(0, static_cast<int64_t>(tensors.small.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = tensors.small[i];
      store(t, pass1(t, 0, numels[t]));
    }
  });
  for (const int64_t t : tensors.large) store(t, chunked_sums(t, numels[t], pass1));
  return sums;
}

// The second of two_passes for every tensor, with the sums in the rows of `sums`: first_pass's
// order reversed.
template <typename Second>
void second_pass(const std::vector<int64_t>& numels, const at::Tensor& sums, const Second& second) {
  const auto n = static_cast<int64_t>(numels.size());
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  sums.dim() == 2 && sums.size(0) == n && sums.size(1) == 2,
              "sums must be a contiguous [", n, ", 2] float64 CPU tensor");
  const double* in = sums.data_ptr<double>();
  const auto ratio = [&](int64_t t) { return second.ratio(t, SumSquares{in[2 * t], in[2 * t + 1]}); };
  const BySize tensors = by_size(numels);
  for (auto t = tensors.large.rbegin(); t != tensors.large.rend(); ++t) {
    chunked_update(*t, numels[*t], ratio(*t), second);
  }
  at::parallel_for(0, static_cast<int64_t>(tensors.small.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = hi - 1; i >= lo; --i) {
      const int64_t t = tensors.small[i];
      second.update(t, 0, numels[t], ratio(t));
    }
  });
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

void check_lars(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& momentum_buffers, double momentum, const char* name) {
  TORCH_CHECK(momentum != 0.0 ? fusable({params, grads, momentum_buffers}) : fusable({params, grads}),
              name, " needs contiguous fp32 CPU tensors shaped like the parameters");
}

// The first pass of a LARS step: ||w||^2 and ||g||^2 (zeros unless adapt).
struct LarsSums {
  const std::vector<at::Tensor>& params;
  const std::vector<at::Tensor>& grads;
  bool adapt;

  SumSquares operator()(int64_t t, int64_t begin, int64_t end) const {
    if (!adapt) return SumSquares{};
    return sum_squares(at_offset(params[t], begin), at_offset(grads[t], begin), end - begin);
  }
};

// The second pass of a LARS step: the ratio from the sums (also written to trust_ratios), then
// g' = g + wd*w; m = mu*m + ratio*g'; w -= lr*m.
struct LarsUpdate {
  const std::vector<at::Tensor>& params;
  const std::vector<at::Tensor>& grads;
  const std::vector<at::Tensor>& momentum_buffers;
  const std::vector<at::Tensor>& trust_ratios;
  float lr, momentum, wd, trust_coefficient, eps;
  bool nesterov, trust_clip, adapt;

  // You, Gitman & Ginsburg 2017, eq. 6; LARC (trust_clip) caps ratio*lr at lr.
  float ratio(int64_t t, SumSquares sums) const {
    const float w_norm = std::sqrt(sums.first), g_norm = std::sqrt(sums.second);
    float ratio = 1.0f;
    if (adapt && w_norm > 0 && g_norm > 0) {
      ratio = trust_coefficient * w_norm / (g_norm + wd * w_norm + eps);
      if (trust_clip) ratio = std::min(ratio / lr, 1.0f);
    }
    *trust_ratios[t].data_ptr<float>() = ratio;
    return ratio;
  }

  void update(int64_t t, int64_t begin, int64_t end, float ratio) const {
    lars_update(at_offset(params[t], begin), at_offset(grads[t], begin),
                momentum != 0.0f ? at_offset(momentum_buffers[t], begin) : nullptr, end - begin, lr,
                momentum, wd, ratio, nesterov);
  }
};

void lars_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& momentum_buffers,
               const std::vector<at::Tensor>& trust_ratios, double lr, double momentum,
               double weight_decay, double trust_coefficient, double eps, bool nesterov,
               bool trust_clip, bool adapt) {
  check_lars(params, grads, momentum_buffers, momentum, "lars_step");
  check_scalars(trust_ratios, params.size(), "trust_ratios");
  two_passes(numels_of(params), LarsSums{params, grads, adapt},
             LarsUpdate{params, grads, momentum_buffers, trust_ratios, static_cast<float>(lr),
                        static_cast<float>(momentum), static_cast<float>(weight_decay),
                        static_cast<float>(trust_coefficient), static_cast<float>(eps), nesterov,
                        trust_clip, adapt});
}

at::Tensor lars_sums(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     bool adapt) {
  check_lars(params, grads, {}, 0.0, "lars_sums");
  return first_pass(numels_of(params), LarsSums{params, grads, adapt});
}

void lars_apply(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& momentum_buffers,
                const std::vector<at::Tensor>& trust_ratios, const at::Tensor& sums, double lr,
                double momentum, double weight_decay, double trust_coefficient, double eps,
                bool nesterov, bool trust_clip, bool adapt) {
  check_lars(params, grads, momentum_buffers, momentum, "lars_apply");
  check_scalars(trust_ratios, params.size(), "trust_ratios");
  second_pass(numels_of(params), sums,
              LarsUpdate{params, grads, momentum_buffers, trust_ratios, static_cast<float>(lr),
                         static_cast<float>(momentum), static_cast<float>(weight_decay),
                         static_cast<float>(trust_coefficient), static_cast<float>(eps), nesterov,
                         trust_clip, adapt});
}

void check_lamb(const std::vector<std::vector<at::Tensor>>& lists,
                const std::vector<at::Tensor>& steps, const char* name) {
  TORCH_CHECK(fusable(lists), name, " needs contiguous fp32 CPU tensors shaped like the parameters");
  check_scalars(steps, lists[0].size(), "steps");
}

void count_steps(const std::vector<at::Tensor>& steps) {
  for (const auto& step : steps) ++*step.data_ptr<float>();
}

// Each tensor's Adam coefficients at its step count t.
std::vector<AdamCoefficients> adam_coefficients(const std::vector<at::Tensor>& steps, double beta1,
                                                double beta2, double eps, double weight_decay,
                                                bool bias_correction) {
  std::vector<AdamCoefficients> coefficients;
  for (const auto& step : steps) {
    const double t = *step.data_ptr<float>();
    const double bc1 = bias_correction ? 1.0 - std::pow(beta1, t) : 1.0;
    const double bc2 = bias_correction ? 1.0 - std::pow(beta2, t) : 1.0;
    coefficients.push_back({static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
                            static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                            static_cast<float>(1.0 / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
                            static_cast<float>(eps), static_cast<float>(weight_decay)});
  }
  return coefficients;
}

// The first pass of a LAMB step: updates the moments; ||w||^2 and ||u||^2.
struct LambSums {
  const std::vector<at::Tensor>& params;
  const std::vector<at::Tensor>& grads;
  const std::vector<at::Tensor>& exp_avgs;
  const std::vector<at::Tensor>& exp_avg_sqs;
  const std::vector<AdamCoefficients>& coefficients;

  SumSquares operator()(int64_t t, int64_t begin, int64_t end) const {
    return lamb_moments(at_offset(params[t], begin), at_offset(grads[t], begin),
                        at_offset(exp_avgs[t], begin), at_offset(exp_avg_sqs[t], begin),
                        end - begin, coefficients[t]);
  }
};

// The second pass of a LAMB step: the ratio from the sums (also written to trust_ratios), then
// w -= lr * ratio * u.
struct LambUpdate {
  const std::vector<at::Tensor>& params;
  const std::vector<at::Tensor>& exp_avgs;
  const std::vector<at::Tensor>& exp_avg_sqs;
  const std::vector<at::Tensor>& trust_ratios;
  const std::vector<AdamCoefficients>& coefficients;
  float lr;
  std::optional<float> trust_clip;
  bool adapt;

  float ratio(int64_t t, SumSquares sums) const {
    const float w_norm = std::sqrt(sums.first), u_norm = std::sqrt(sums.second);
    float ratio = 1.0f;
    if (adapt && w_norm > 0 && u_norm > 0) {
      ratio = w_norm / u_norm;
      if (trust_clip) ratio = std::clamp(ratio, 0.0f, *trust_clip);
    }
    *trust_ratios[t].data_ptr<float>() = ratio;
    return ratio;
  }

  void update(int64_t t, int64_t begin, int64_t end, float ratio) const {
    lamb_update(at_offset(params[t], begin), at_offset(exp_avgs[t], begin),
                at_offset(exp_avg_sqs[t], begin), end - begin, coefficients[t], lr * ratio);
  }
};

std::optional<float> to_float(std::optional<double> x) {
  return x ? std::optional<float>(static_cast<float>(*x)) : std::nullopt;
}

// You et al. 2019, Algorithm 2: u = m̂ / (sqrt(v̂) + eps) + wd*w; w -= lr * ||w||/||u|| * u.
void lamb_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& trust_ratios,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool bias_correction, std::optional<double> trust_clip, bool adapt) {
  check_lamb({params, grads, exp_avgs, exp_avg_sqs}, steps, "lamb_step");
  check_scalars(trust_ratios, params.size(), "trust_ratios");
  count_steps(steps);
  const auto coefficients =
      adam_coefficients(steps, beta1, beta2, eps, weight_decay, bias_correction);
  two_passes(numels_of(params), LambSums{params, grads, exp_avgs, exp_avg_sqs, coefficients},
             LambUpdate{params, exp_avgs, exp_avg_sqs, trust_ratios, coefficients,
                        static_cast<float>(lr), to_float(trust_clip), adapt});
}

at::Tensor lamb_sums(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs,
                     const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& steps,
                     double beta1, double beta2, double eps, double weight_decay,
                     bool bias_correction) {
  check_lamb({params, grads, exp_avgs, exp_avg_sqs}, steps, "lamb_sums");
  count_steps(steps);
  const auto coefficients =
      adam_coefficients(steps, beta1, beta2, eps, weight_decay, bias_correction);
  return first_pass(numels_of(params), LambSums{params, grads, exp_avgs, exp_avg_sqs, coefficients});
}

void lamb_apply(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& steps,
                const std::vector<at::Tensor>& trust_ratios, const at::Tensor& sums, double lr,
                double beta1, double beta2, double eps, double weight_decay, bool bias_correction,
                std::optional<double> trust_clip, bool adapt) {
  check_lamb({params, exp_avgs, exp_avg_sqs}, steps, "lamb_apply");
  check_scalars(trust_ratios, params.size(), "trust_ratios");
  const auto coefficients =
      adam_coefficients(steps, beta1, beta2, eps, weight_decay, bias_correction);
  second_pass(numels_of(params), sums,
              LambUpdate{params, exp_avgs, exp_avg_sqs, trust_ratios, coefficients,
                         static_cast<float>(lr), to_float(trust_clip), adapt});
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  module.def("fusable", &fusable, "Whether the lists hold contiguous fp32 CPU tensors of one shape");
  module.def("lars_step", &lars_step, "LARS step in place; writes each tensor's trust ratio",
             no_gil);
  module.def("lars_sums", &lars_sums,
             "lars_step's first pass: [n, 2] float64 sums of squares of w and g (zeros unless adapt)",
             no_gil);
  module.def("lars_apply", &lars_apply,
             "lars_step's second pass with the ratios from the given sums; writes trust ratios",
             no_gil);
  module.def("lamb_step", &lamb_step, "LAMB step in place; counts steps, writes trust ratios",
             no_gil);
  module.def("lamb_sums", &lamb_sums,
             "lamb_step's first pass: counts steps, updates moments; [n, 2] float64 sums of squares "
             "of w and u",
             no_gil);
  module.def("lamb_apply", &lamb_apply,
             "lamb_step's second pass with the ratios from the given sums; writes trust ratios",
             no_gil);
}
