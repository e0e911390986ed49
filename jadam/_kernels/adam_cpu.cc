// jadam's fused Adam step on CPU: one pass over memory for every leaf.
//
// Per element it reads g, p, m, v and writes p, m, v (28 bytes in float32),
// where XLA:CPU, without multi-output fusion, makes three passes (40 bytes).
// The arithmetic is jadam's generic path, operation for operation and in the
// same order, so that it matches it bitwise; build it without fast-math and
// without floating-point contraction (-ffp-contract=off).
//
// Call frame: arg 0 is a 1-d buffer of scalars (kNumScalars, the leaves'
// dtype); then 4 buffers per leaf (g, p, m, v); results are 3 per leaf
// (p, m, v), aliased by the caller to the donated p, m, v.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Scalar {
  kOneMinusB1, kB1, kOneMinusB2, kB2, kC1, kC2, kEpsRoot, kEps, kNegLr, kWeightDecay, kNumScalars
};
enum Mode { kPlain = 0, kCoupled = 1, kDecoupled = 2 };  // where weight_decay enters

template <typename T>
struct Leaf {
  const T* g;
  T* p;  // in place: the results are aliased to the inputs
  T* m;
  T* v;
  int64_t size;
};

template <typename T, int kMode>
void AdamRange(const T* __restrict g, T* __restrict p, T* __restrict m, T* __restrict v, int64_t n,
               const T* s) {
  const T omb1 = s[kOneMinusB1], b1 = s[kB1], omb2 = s[kOneMinusB2], b2 = s[kB2];
  const T c1 = s[kC1], c2 = s[kC2], eps_root = s[kEpsRoot], eps = s[kEps];
  const T neg_lr = s[kNegLr], wd = s[kWeightDecay];
  // XLA rewrites x / broadcast(c) as x * (1 / c): so must we, to give its bits.
  const T r1 = T(1) / c1, r2 = T(1) / c2;
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i];
    const T pi = p[i];
    if (kMode == kCoupled) gi = gi + wd * pi;          // add_l2 before the moments
    const T mi = omb1 * gi + b1 * m[i];                 // _ema: (1 - d) g + d m
    const T vi = omb2 * (gi * gi) + b2 * v[i];          // _ema: (1 - d) g^2 + d v
    const T mh = mi * r1;                               // bias_correct
    const T vh = vi * r2;
    T u = mh / (std::sqrt(vh + eps_root) + eps);        // normalize
    if (kMode == kDecoupled) u = u + wd * pi;           // add_l2 after normalize (AdamW)
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_lr * u;                             // scale_by_lr, optax.apply_updates
  }
}

template <typename T>
struct Job {
  std::vector<Leaf<T>> leaves;
  std::vector<int64_t> starts;  // starts[i]: global index of leaf i's first element
  int64_t total = 0;
  int64_t chunk = 0;
  int64_t num_chunks = 0;
  int mode = kPlain;
  T scalars[kNumScalars];
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run(int64_t lo, int64_t hi) {
    auto it = std::upper_bound(starts.begin(), starts.end(), lo);
    size_t leaf = static_cast<size_t>(it - starts.begin()) - 1;
    while (lo < hi) {
      const Leaf<T>& l = leaves[leaf];
      const int64_t off = lo - starts[leaf];
      const int64_t n = std::min(hi, starts[leaf] + l.size) - lo;
      if (n > 0) {
        switch (mode) {
          case kCoupled:
            AdamRange<T, kCoupled>(l.g + off, l.p + off, l.m + off, l.v + off, n, scalars);
            break;
          case kDecoupled:
            AdamRange<T, kDecoupled>(l.g + off, l.p + off, l.m + off, l.v + off, n, scalars);
            break;
          default:
            AdamRange<T, kPlain>(l.g + off, l.p + off, l.m + off, l.v + off, n, scalars);
        }
        lo += n;
      }
      ++leaf;
    }
  }

  // Claims chunks until none is left.
  void Work() {
    int64_t ran = 0;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      Run(c * chunk, std::min(total, (c + 1) * chunk));
      ++ran;
    }
    if (ran) done.fetch_add(ran, std::memory_order_acq_rel);
  }
};

// Below this many elements a step runs on the calling thread alone.
constexpr int64_t kParallelThreshold = 1 << 18;
constexpr int64_t kChunk = 1 << 16;

template <ffi::DataType kDtype>
ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t mode) {
  using T = ffi::NativeType<kDtype>;
  if (args.size() < 1 || (args.size() - 1) % 4 != 0 || rets.size() != 3 * ((args.size() - 1) / 4)) {
    return ffi::Error::InvalidArgument("jadam_adam: expected 1 + 4n arguments and 3n results");
  }
  auto scalars = args.get<ffi::AnyBuffer>(0);
  if (!scalars.has_value() || scalars->element_type() != kDtype ||
      scalars->element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("jadam_adam: bad scalar buffer");
  }
  auto job = std::make_shared<Job<T>>();
  job->mode = mode;
  const T* s = reinterpret_cast<const T*>(scalars->untyped_data());
  std::copy(s, s + kNumScalars, job->scalars);
  const size_t n_leaves = (args.size() - 1) / 4;
  job->leaves.reserve(n_leaves);
  job->starts.reserve(n_leaves);
  for (size_t i = 0; i < n_leaves; ++i) {
    const T* in[4];
    int64_t size = -1;
    for (int k = 0; k < 4; ++k) {
      auto b = args.get<ffi::AnyBuffer>(1 + 4 * i + k);
      if (!b.has_value() || b->element_type() != kDtype) {
        return ffi::Error::InvalidArgument("jadam_adam: bad leaf argument");
      }
      if (size >= 0 && static_cast<int64_t>(b->element_count()) != size) {
        return ffi::Error::InvalidArgument("jadam_adam: leaf sizes differ");
      }
      size = static_cast<int64_t>(b->element_count());
      in[k] = reinterpret_cast<const T*>(b->untyped_data());
    }
    T* out[3];
    for (int k = 0; k < 3; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(3 * i + k);
      if (!r.has_value() || (*r)->element_type() != kDtype ||
          static_cast<int64_t>((*r)->element_count()) != size) {
        return ffi::Error::InvalidArgument("jadam_adam: bad leaf result");
      }
      out[k] = reinterpret_cast<T*>((*r)->untyped_data());
    }
    if (size == 0) continue;
    for (int k = 0; k < 3; ++k) {  // XLA honours the aliases; should it not, start from the inputs
      if (out[k] != in[k + 1]) std::copy(in[k + 1], in[k + 1] + size, out[k]);
    }
    job->starts.push_back(job->total);
    job->leaves.push_back(Leaf<T>{in[0], out[0], out[1], out[2], size});
    job->total += size;
  }
  if (job->total == 0) return ffi::Error::Success();
  int64_t threads = pool.num_threads();
  if (job->total < kParallelThreshold || threads <= 1) {
    job->Run(0, job->total);
    return ffi::Error::Success();
  }
  job->chunk = kChunk;
  job->num_chunks = (job->total + kChunk - 1) / kChunk;
  // Helpers that start after every chunk is claimed return at once, so the
  // caller never waits for a task to be scheduled, only for claimed chunks.
  const int64_t helpers = std::min<int64_t>(threads, job->num_chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([job] { job->Work(); });
  }
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->num_chunks) {
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamAdamF32, AdamImpl<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("mode"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamAdamF64, AdamImpl<ffi::DataType::F64>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("mode"));
