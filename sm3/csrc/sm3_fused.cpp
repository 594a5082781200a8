// One-pass SM3-II step on CPU: nu, the accumulator maxima, momentum and the parameter update
// in a single sweep over (grad, param[, momentum]). See sm3/_fused.py for the Python side.
//
// A parameter of shape (n_0, ..., n_{k-1}), k >= 2, is walked as rows of dimension 0 split
// into runs along the last dimension. Per run, the minimum of a_0[i_0] .. a_{k-2}[i_{k-2}] is
// taken once; the inner loop folds in a_{k-1}[j], computes nu and updates the parameter.
// a_0 is written row by row (each row belongs to one thread); the other accumulators are read
// during the sweep, so their new maxima go to per-thread buffers merged at the end.
// Rank 0 and 1 keep a full-size accumulator (diagonal Adagrad): a plain elementwise loop.

#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements

struct Hyper {
  float neg_lr;    // -lr
  float momentum;  // heavy-ball coefficient, 0 when there is no buffer
  float acc_coef;  // beta, or 1 when beta == 0 (plain sum)
  float sq_coef;   // 1 - beta, or 1 when beta == 0
  float eps;
  float decay;     // 1 - lr * weight_decay
  float sign;      // -1 when maximizing
};

// The tail shared by both layouts: u = g / sqrt(nu + eps), momentum, decay, step.
template <typename P, typename M, bool HAS_M>
inline void update(P* x, M* m, int64_t i, float g, float nu, const Hyper& h) {
  float u = g / std::sqrt(nu + h.eps);
  if constexpr (HAS_M) {
    u = h.momentum * static_cast<float>(m[i]) + (1.0f - h.momentum) * u;
    m[i] = static_cast<M>(u);
  }
  x[i] = static_cast<P>(static_cast<float>(x[i]) * h.decay + h.neg_lr * u);
}

template <typename P, typename M, bool HAS_M>
void diagonal_step(P* __restrict__ x, const P* __restrict__ g, M* __restrict__ m,
                   float* __restrict__ acc, int64_t n, const Hyper& hyper, int threads) {
  const Hyper h = hyper;
#pragma omp parallel for simd schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    float gv = static_cast<float>(g[i]) * h.sign;
    float a = h.acc_coef * acc[i] + h.sq_coef * gv * gv;
    acc[i] = a;
    update<P, M, HAS_M>(x, m, i, gv, a, h);
  }
}

// One run along the last dimension; returns its largest nu. Kept out of the OpenMP region,
// with everything passed by value, so that the compiler vectorises it without aliasing doubts.
// Blocks of kLanes elements: each block asks for the data kAheadBytes ahead, since the
// hardware prefetcher alone left the loop waiting on memory (~20% slower, measured).
constexpr int64_t kLanes = 16;
constexpr int64_t kAheadBytes = 4096;

template <typename P, typename M, bool HAS_M>
inline void run_element(P* __restrict__ x, const P* __restrict__ g, M* __restrict__ m,
                        const float* __restrict__ last, float* __restrict__ last_max, int64_t j,
                        float base, float& lane_max, const Hyper& h) {
  float gv = static_cast<float>(g[j]) * h.sign;
  // Plain comparisons rather than std::min/max: GCC vectorises these.
  float nu = h.acc_coef * (base < last[j] ? base : last[j]) + h.sq_coef * gv * gv;
  lane_max = lane_max > nu ? lane_max : nu;
  last_max[j] = last_max[j] > nu ? last_max[j] : nu;
  update<P, M, HAS_M>(x, m, j, gv, nu, h);
}

template <typename P, typename M, bool HAS_M>
__attribute__((noinline)) float factored_run(P* __restrict__ x, const P* __restrict__ g,
                                             M* __restrict__ m, const float* __restrict__ last,
                                             float* __restrict__ last_max, int64_t run, float base,
                                             const Hyper h) {
  float lane_max[kLanes] = {};  // nu >= 0
  int64_t j = 0;
  for (; j + kLanes <= run; j += kLanes) {
    __builtin_prefetch(g + j + kAheadBytes / sizeof(P));
    __builtin_prefetch(x + j + kAheadBytes / sizeof(P), 1);
    if constexpr (HAS_M) __builtin_prefetch(m + j + kAheadBytes / sizeof(M), 1);
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) {
      run_element<P, M, HAS_M>(x, g, m, last, last_max, j + t, base, lane_max[t], h);
    }
  }
  for (; j < run; ++j) run_element<P, M, HAS_M>(x, g, m, last, last_max, j, base, lane_max[0], h);
  float run_max = 0.0f;
  for (float v : lane_max) run_max = run_max > v ? run_max : v;
  return run_max;
}

template <typename P, typename M, bool HAS_M>
void factored_step(P* x, const P* g, M* m, const std::vector<float*>& acc,
                   const std::vector<int64_t>& sizes, const Hyper& hyper, int threads) {
  const Hyper h = hyper;  // a local copy: stores through x/m cannot alias it
  const int k = static_cast<int>(sizes.size());
  const int64_t rows = sizes[0], run = sizes[k - 1];
  int64_t runs_per_row = 1;
  for (int r = 1; r < k - 1; ++r) runs_per_row *= sizes[r];
  // Per-thread maxima of a_1 .. a_{k-1}, laid out one after the other.
  std::vector<int64_t> offset(k, 0);
  int64_t per_thread = 0;
  for (int r = 1; r < k; ++r) {
    offset[r] = per_thread;
    per_thread += sizes[r];
  }
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  std::vector<float> maxima(static_cast<size_t>(threads) * per_thread, 0.0f);  // nu >= 0
  const float* last = acc[k - 1];

#pragma omp parallel num_threads(threads)
  {
    float* mine = maxima.data() + static_cast<int64_t>(omp_get_thread_num()) * per_thread;
    float* last_max = mine + offset[k - 1];
    std::vector<int64_t> index(k, 0);  // multi-index of the middle dimensions 1 .. k-2
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const float a0 = acc[0][i];
      float row_max = 0.0f;
      std::fill(index.begin(), index.end(), 0);
      for (int64_t s = 0; s < runs_per_row; ++s) {
        float base = a0;
        for (int r = 1; r < k - 1; ++r) base = std::min(base, acc[r][index[r]]);
        const int64_t o = (i * runs_per_row + s) * run;
        const float run_max = factored_run<P, M, HAS_M>(
            x + o, g + o, HAS_M ? m + o : nullptr, last, last_max, run, base, h);
        row_max = std::max(row_max, run_max);
        for (int r = 1; r < k - 1; ++r) {
          float& slot = mine[offset[r] + index[r]];
          slot = std::max(slot, run_max);
        }
        for (int r = k - 2; r >= 1; --r) {  // next middle multi-index, last dimension fastest
          if (++index[r] < sizes[r]) break;
          index[r] = 0;
        }
      }
      acc[0][i] = row_max;
    }
  }
  for (int r = 1; r < k; ++r) {
    for (int64_t j = 0; j < sizes[r]; ++j) {
      float v = maxima[offset[r] + j];
      for (int t = 1; t < threads; ++t) v = std::max(v, maxima[t * per_thread + offset[r] + j]);
      acc[r][j] = v;
    }
  }
}

template <typename P, typename M, bool HAS_M>
void step_one(const torch::Tensor& p, const torch::Tensor& g, const torch::Tensor* m,
              const std::vector<float*>& acc, const Hyper& h, int threads) {
  P* x = p.data_ptr<P>();
  const P* gp = g.data_ptr<P>();
  M* mp = HAS_M ? m->data_ptr<M>() : nullptr;
  if (p.dim() <= 1) {
    diagonal_step<P, M, HAS_M>(x, gp, mp, acc[0], p.numel(), h, threads);
  } else {
    factored_step<P, M, HAS_M>(x, gp, mp, acc, p.sizes().vec(), h, threads);
  }
}

template <typename P>
void dispatch_momentum(const torch::Tensor& p, const torch::Tensor& g, const torch::Tensor* m,
                       const std::vector<float*>& acc, const Hyper& h, int threads) {
  if (m == nullptr) return step_one<P, float, false>(p, g, m, acc, h, threads);
  switch (m->scalar_type()) {
    case at::kFloat: return step_one<P, float, true>(p, g, m, acc, h, threads);
    case at::kBFloat16: return step_one<P, at::BFloat16, true>(p, g, m, acc, h, threads);
    case at::kHalf: return step_one<P, at::Half, true>(p, g, m, acc, h, threads);
    default: TORCH_CHECK(false, "sm3 fused: unsupported momentum dtype ", m->scalar_type());
  }
}

// Steps every parameter of one group. `accumulators` holds, parameter after parameter, one
// tensor for rank <= 1 and dim() tensors otherwise; `momentum_buffers` is empty or one each.
void fused_step(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                const std::vector<torch::Tensor>& accumulators,
                const std::vector<torch::Tensor>& momentum_buffers, double lr, double momentum,
                double beta, double eps, double weight_decay, bool maximize) {
  TORCH_CHECK(params.size() == grads.size(), "sm3 fused: params and grads differ in length");
  TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == params.size(),
              "sm3 fused: one momentum buffer per parameter, or none");
  Hyper h;
  h.neg_lr = static_cast<float>(-lr);
  h.momentum = static_cast<float>(momentum);
  h.acc_coef = beta > 0 ? static_cast<float>(beta) : 1.0f;
  h.sq_coef = beta > 0 ? static_cast<float>(1.0 - beta) : 1.0f;
  h.eps = static_cast<float>(eps);
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.sign = maximize ? -1.0f : 1.0f;
  const int threads = at::get_num_threads();
  size_t next_acc = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& p = params[i];
    const torch::Tensor& g = grads[i];
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && p.scalar_type() == g.scalar_type() &&
                    p.sizes() == g.sizes(),
                "sm3 fused: param and grad must be contiguous, of one dtype and shape");
    const int64_t count = p.dim() <= 1 ? 1 : p.dim();
    std::vector<float*> acc;
    for (int64_t r = 0; r < count; ++r) {
      const torch::Tensor& a = accumulators.at(next_acc++);
      TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous(),
                  "sm3 fused: accumulators must be contiguous float32");
      acc.push_back(a.data_ptr<float>());
    }
    if (p.numel() == 0) continue;
    // Small tensors are not worth waking the thread team (and a busy machine makes every
    // parallel region wait for a descheduled thread).
    const int team = p.numel() < kParallelMin ? 1 : threads;
    const torch::Tensor* m = momentum_buffers.empty() ? nullptr : &momentum_buffers[i];
    if (m != nullptr) TORCH_CHECK(m->is_contiguous(), "sm3 fused: momentum buffer must be contiguous");
    switch (p.scalar_type()) {
      case at::kFloat: dispatch_momentum<float>(p, g, m, acc, h, team); break;
      case at::kBFloat16: dispatch_momentum<at::BFloat16>(p, g, m, acc, h, team); break;
      case at::kHalf: dispatch_momentum<at::Half>(p, g, m, acc, h, team); break;
      default: TORCH_CHECK(false, "sm3 fused: unsupported parameter dtype ", p.scalar_type());
    }
  }
  TORCH_CHECK(next_acc == accumulators.size(), "sm3 fused: accumulator count mismatch");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_step", &fused_step, "One-pass SM3-II step for a group of CPU parameters");
}
