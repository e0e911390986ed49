// jadam's fused Adam step on CPU: one pass over memory for every leaf.
//
// Per element it reads g, p, m, v and writes p, m, v (28 bytes in float32),
// where XLA:CPU, without multi-output fusion, makes three passes (40 bytes).
// The arithmetic is jadam's generic path, operation for operation and in the
// same order, so that it matches it bitwise; build it without fast-math and
// without floating-point contraction (-ffp-contract=off).
//
// Call frame: arg 0 is a 1-d buffer of scalars (kNumScalars, the leaves'
// dtype); then 4 buffers per leaf (g, p, m, v), 5 with amsgrad (+ v_max);
// results are 3 per leaf (p, m, v), 4 with amsgrad, aliased by the caller to
// the donated inputs. The attribute `mode` says which stages are present.
//
// Variants below: float32 parameters with bfloat16 moments (JadamAdamF32Bf16)
// and with 8-bit block-quantized moments (JadamAdamF32Q8, 16 bytes a value:
// g, p and two codes read, p and two codes written, plus the blocks' scales).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "pool.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

enum Scalar {
  kOneMinusB1, kB1, kOneMinusB2, kB2, kC1, kC2, kEpsRoot, kEps, kNegLr, kWeightDecay,
  kClipNorm, kClipMax, kClipOn, kApply, kDecayFactor, kSign, kNumScalars
};
// The stages present (attribute `mode`, a bit set).
enum Mode : int32_t {
  kCoupled = 1,    // add_l2 before the moments (torch.optim.Adam's weight_decay)
  kDecoupled = 2,  // add_l2 after normalize (AdamW)
  kNegate = 4,     // flip_sign (maximize)
  kClip = 8,       // optax.clip_by_global_norm in front: g <- (g / norm) * max_norm when kClipOn
  kAmsgrad = 16,   // max_nu before bias_correct: a fifth buffer per leaf, the running maximum
  kTorchDecay = 32,  // decoupled_decay after scale_by_lr: p' = p + ((p * factor + step) - p)
};

template <typename T>
struct Leaf {
  const T* g;
  T* p;  // in place: the results are aliased to the inputs
  T* m;
  T* v;
  T* vmax;  // amsgrad only
  int64_t size;
};

// _ema's first moment, jadam._stages.moments.first_moment: (1 - d) g + d m; where m is not finite, PyTorch's lerp
// (m + w (g - m) for w < 1/2, else g - (g - m)(1 - w)), NaN for an infinite m. Both computed, one kept (it vectorizes).
template <typename T>
inline T FirstMoment(T g, T m, T omb1, T b1) {
  const T sum = omb1 * g + b1 * m;
  const T lerp = omb1 < T(0.5) ? m + omb1 * (g - m) : g - (g - m) * (T(1) - omb1);
  return std::isfinite(m) ? sum : lerp;
}

template <typename T, bool kCoupledL2, bool kDecoupledL2, bool kClipped, bool kAms, bool kShrink>
void AdamRange(const T* __restrict g, T* __restrict p, T* __restrict m, T* __restrict v, T* __restrict vmax,
               int64_t n, const T* s) {
  const T omb1 = s[kOneMinusB1], b1 = s[kB1], omb2 = s[kOneMinusB2], b2 = s[kB2];
  const T c1 = s[kC1], c2 = s[kC2], eps_root = s[kEpsRoot], eps = s[kEps];
  const T neg_lr = s[kNegLr], wd = s[kWeightDecay], norm = s[kClipNorm], max_norm = s[kClipMax];
  const T factor = s[kDecayFactor], sign = s[kSign];
  // XLA rewrites x / broadcast(c) as x * (1 / c): so must we, to give its bits.
  const T r1 = T(1) / c1, r2 = T(1) / c2, rn = T(1) / norm;
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i];
    const T pi = p[i];
    if (kClipped) gi = (gi * rn) * max_norm;            // optax.clip_by_global_norm, t / norm as XLA has it
    gi = gi * sign;                                     // flip_sign: -1 (exact), else 1
    if (kCoupledL2) gi = gi + wd * pi;                  // add_l2 before the moments
    const T mi = FirstMoment(gi, m[i], omb1, b1);       // _ema: (1 - d) g + d m
    const T vi = omb2 * (gi * gi) + b2 * v[i];          // _ema: (1 - d) g^2 + d v
    T vx = vi;
    if (kAms) {                                         // max_nu: jnp.maximum, NaN-propagating
      const T vm = vmax[i];
      vx = (std::isnan(vi) || std::isnan(vm)) ? vi + vm : (vi > vm ? vi : vm);
      vmax[i] = vx;
    }
    const T mh = mi * r1;                               // bias_correct
    const T vh = vx * r2;
    T u = mh / (std::sqrt(vh + eps_root) + eps);        // normalize
    if (kDecoupledL2) u = u + wd * pi;                  // add_l2 after normalize (AdamW)
    m[i] = mi;
    v[i] = vi;
    if (kShrink) {
      p[i] = pi + ((pi * factor + neg_lr * u) - pi);    // scale_by_lr, decoupled_decay, apply_updates
    } else {
      p[i] = pi + neg_lr * u;                           // scale_by_lr, optax.apply_updates
    }
  }
}

// A one-element leaf: XLA turns broadcast(c) into a reshape there and keeps x / c a true division,
// so the divisions by the norm and the corrections stay divisions (no reciprocal). Flags at run time.
template <typename T>
void AdamOne(const T* g, T* p, T* m, T* v, T* vmax, int bits, const T* s) {
  T gi = g[0];
  const T pi = p[0];
  if (bits & kClip) gi = (gi / s[kClipNorm]) * s[kClipMax];
  if (bits & kNegate) gi = -gi;
  if (bits & kCoupled) gi = gi + s[kWeightDecay] * pi;
  const T mi = FirstMoment(gi, m[0], s[kOneMinusB1], s[kB1]);
  const T vi = s[kOneMinusB2] * (gi * gi) + s[kB2] * v[0];
  T vx = vi;
  if (bits & kAmsgrad) {
    const T vm = vmax[0];
    vx = (std::isnan(vi) || std::isnan(vm)) ? vi + vm : (vi > vm ? vi : vm);
    vmax[0] = vx;
  }
  T u = (mi / s[kC1]) / (std::sqrt(vx / s[kC2] + s[kEpsRoot]) + s[kEps]);
  if (bits & kDecoupled) u = u + s[kWeightDecay] * pi;
  m[0] = mi;
  v[0] = vi;
  p[0] = (bits & kTorchDecay) ? pi + ((pi * s[kDecayFactor] + s[kNegLr] * u) - pi) : pi + s[kNegLr] * u;
}

// A rejected step (optax.apply_if_finite): the state stays, the parameters get + 0 as apply_updates adds.
template <typename T>
void SkipRange(T* __restrict p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] + T(0);
}

template <typename T>
using RangeFn = void (*)(const T*, T*, T*, T*, T*, int64_t, const T*);

template <typename T, int kBits>
constexpr RangeFn<T> Pick() {
  // kNegate is not a template flag: the sign is a scalar (x * -1 is -x exactly), which halves the instantiations.
  return &AdamRange<T, (kBits & kCoupled) != 0, (kBits & kDecoupled) != 0, (kBits & kClip) != 0,
                    (kBits & kAmsgrad) != 0, (kBits & kTorchDecay) != 0>;
}

template <typename T, size_t... I>
RangeFn<T> PickRuntime(int bits, std::index_sequence<I...>) {
  static constexpr RangeFn<T> table[] = {Pick<T, static_cast<int>(I)>()...};
  return table[bits & 63];
}

// Leaves laid end to end (starts[i]: leaf i's first element): calls f(leaf, off, n) for each piece of [lo, hi).
template <typename LeafT, typename F>
void ForEachPiece(const std::vector<LeafT>& leaves, const std::vector<int64_t>& starts, int64_t lo, int64_t hi, F&& f) {
  auto it = std::upper_bound(starts.begin(), starts.end(), lo);
  size_t leaf = static_cast<size_t>(it - starts.begin()) - 1;
  while (lo < hi) {
    const LeafT& l = leaves[leaf];
    const int64_t off = lo - starts[leaf];
    const int64_t n = std::min(hi, starts[leaf] + l.size) - lo;
    if (n > 0) {
      f(l, off, n);
      lo += n;
    }
    ++leaf;
  }
}

// Below this many elements a step runs on the calling thread alone.
constexpr int64_t kParallelThreshold = 1 << 18;
constexpr int64_t kChunk = 1 << 16;

// Runs a job over its `total` elements in tasks of `chunk` elements (kChunk; all of them in one task on the
// calling thread below kParallelThreshold): the float and bfloat16 kernels' jobs.
template <typename Job>
void RunChunked(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job) {
  const bool parallel = job->total >= kParallelThreshold;
  job->chunk = parallel ? kChunk : job->total;
  job->tasks.n = (job->total + job->chunk - 1) / job->chunk;
  jadam::RunOnPool(pool, job, parallel);
}

template <typename T>
struct Job {
  std::vector<Leaf<T>> leaves;
  std::vector<int64_t> starts;  // starts[i]: global index of leaf i's first element
  int64_t total = 0;
  int64_t chunk = 0;  // elements a task
  jadam::Tasks tasks;
  RangeFn<T> range = nullptr;
  int bits = 0;
  bool skip = false;
  T scalars[kNumScalars];

  void Run(int64_t lo, int64_t hi) {
    ForEachPiece(leaves, starts, lo, hi, [this](const Leaf<T>& l, int64_t off, int64_t n) {
      if (skip) {
        SkipRange<T>(l.p + off, n);
      } else if (l.size == 1) {
        AdamOne<T>(l.g, l.p, l.m, l.v, l.vmax, bits, scalars);
      } else {
        range(l.g + off, l.p + off, l.m + off, l.v + off, l.vmax ? l.vmax + off : nullptr, n, scalars);
      }
    });
  }

  void Work() {
    tasks.Drain([this](int64_t c) { Run(c * chunk, std::min(total, (c + 1) * chunk)); });
  }
};

template <ffi::DataType kDtype>
ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t mode) {
  using T = ffi::NativeType<kDtype>;
  const bool ams = (mode & kAmsgrad) != 0;
  const size_t n_in = ams ? 5 : 4, n_out = n_in - 1;  // per leaf: g, p, m, v[, vmax] -> p, m, v[, vmax]
  if (args.size() < 1 || (args.size() - 1) % n_in != 0 || rets.size() != n_out * ((args.size() - 1) / n_in)) {
    return ffi::Error::InvalidArgument("jadam_adam: expected 1 + 4n (5n with amsgrad) arguments and 3n (4n) results");
  }
  auto scalars = args.get<ffi::AnyBuffer>(0);
  if (!scalars.has_value() || scalars->element_type() != kDtype ||
      scalars->element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("jadam_adam: bad scalar buffer");
  }
  auto job = std::make_shared<Job<T>>();
  const T* s = reinterpret_cast<const T*>(scalars->untyped_data());
  std::copy(s, s + kNumScalars, job->scalars);
  int bits = mode & ~kClip;
  if ((mode & kClip) && s[kClipOn] != T(0)) bits |= kClip;  // the norm is above max_norm: clip
  job->range = PickRuntime<T>(bits, std::make_index_sequence<64>{});
  job->bits = bits;
  job->skip = s[kApply] == T(0);
  const size_t n_leaves = (args.size() - 1) / n_in;
  job->leaves.reserve(n_leaves);
  job->starts.reserve(n_leaves);
  for (size_t i = 0; i < n_leaves; ++i) {
    const T* in[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    int64_t size = -1;
    for (size_t k = 0; k < n_in; ++k) {
      auto b = args.get<ffi::AnyBuffer>(1 + n_in * i + k);
      if (!b.has_value() || b->element_type() != kDtype) {
        return ffi::Error::InvalidArgument("jadam_adam: bad leaf argument");
      }
      if (size >= 0 && static_cast<int64_t>(b->element_count()) != size) {
        return ffi::Error::InvalidArgument("jadam_adam: leaf sizes differ");
      }
      size = static_cast<int64_t>(b->element_count());
      in[k] = reinterpret_cast<const T*>(b->untyped_data());
    }
    T* out[4] = {nullptr, nullptr, nullptr, nullptr};
    for (size_t k = 0; k < n_out; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(n_out * i + k);
      if (!r.has_value() || (*r)->element_type() != kDtype ||
          static_cast<int64_t>((*r)->element_count()) != size) {
        return ffi::Error::InvalidArgument("jadam_adam: bad leaf result");
      }
      out[k] = reinterpret_cast<T*>((*r)->untyped_data());
    }
    if (size == 0) continue;
    for (size_t k = 0; k < n_out; ++k) {  // XLA honours the aliases; should it not, start from the inputs
      if (out[k] != in[k + 1]) std::copy(in[k + 1], in[k + 1] + size, out[k]);
    }
    job->starts.push_back(job->total);
    job->leaves.push_back(Leaf<T>{in[0], out[0], out[1], out[2], ams ? out[3] : nullptr, size});
    job->total += size;
  }
  if (job->total == 0) return ffi::Error::Success();
  RunChunked(pool, job);
  return ffi::Error::Success();
}

// --- float32 parameters, bfloat16 moments with jadam/_lowp.py's stochastic rounding ---------------
//
// Call frame: scalars (float32), then uint32[1 + 2n]: the step count t and, per leaf, the hash offsets of its
// two streams ((2k + moment) * 0xC2B2AE3D, k the leaf's position); then g, p (float32), m, v (bfloat16) per
// leaf; results p, m, v per leaf, aliased. Each moment is formed in float32 from the stored one, rounded
// stochastically with the bits of _lowp.hash_bits(flat index, t, stream), and the corrections read the
// stored (rounded) value, as jadam's stages do.

inline uint32_t HashBits(uint32_t i, uint32_t t_term, uint32_t offset) {
  uint32_t h = i * 0x9E3779B1u + (t_term + offset);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

inline float Bf16ToF32(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline uint16_t RoundToBf16(float x, uint32_t r) {  // _lowp.round_to_bfloat16, branch-free (it vectorizes)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t mag = bits & 0x7FFFFFFFu;
  const uint32_t rounded = ((bits + r) & 0xFFFF0000u) >> 16;
  const uint32_t special = mag > 0x7F800000u ? (((bits >> 16) & 0x8000u) | 0x7FC0u) : (bits >> 16);  // NaN, inf
  return static_cast<uint16_t>(mag < 0x7F800000u ? rounded : special);
}

struct LeafB {
  const float* g;
  float* p;
  uint16_t* m;
  uint16_t* v;
  int64_t size;
  uint32_t off_m, off_v;
};

struct JobB {
  std::vector<LeafB> leaves;
  std::vector<int64_t> starts;
  int64_t total = 0, chunk = 0;  // chunk: elements a task
  jadam::Tasks tasks;
  int bits = 0;
  bool skip = false;
  uint32_t t_term = 0;
  float s[kNumScalars];

  template <bool kExact, bool kClipped, bool kCoupledL2, bool kDecoupledL2, bool kShrink>
  void RangeT(const LeafB& l, int64_t lo, int64_t n) const {
    const float omb1 = s[kOneMinusB1], b1 = s[kB1], omb2 = s[kOneMinusB2], b2 = s[kB2];
    const float c1 = s[kC1], c2 = s[kC2], eps_root = s[kEpsRoot], eps = s[kEps], neg_lr = s[kNegLr];
    const float wd = s[kWeightDecay], norm = s[kClipNorm], max_norm = s[kClipMax], factor = s[kDecayFactor];
    const float sign = s[kSign], r1 = 1.0f / c1, r2 = 1.0f / c2, rn = 1.0f / norm;
    const uint32_t t_term_ = t_term, off_m = l.off_m, off_v = l.off_v;
    const float* __restrict g = l.g;
    float* __restrict p = l.p;
    uint16_t* __restrict m = l.m;
    uint16_t* __restrict v = l.v;
    for (int64_t i = lo; i < lo + n; ++i) {
      float gi = g[i];
      const float pi = p[i];
      if (kClipped) gi = kExact ? (gi / norm) * max_norm : (gi * rn) * max_norm;
      gi = gi * sign;
      if (kCoupledL2) gi = gi + wd * pi;
      const float mi = FirstMoment(gi, Bf16ToF32(m[i]), omb1, b1);
      const float vi = omb2 * (gi * gi) + b2 * Bf16ToF32(v[i]);
      const uint32_t idx = static_cast<uint32_t>(i);
      const uint16_t ms = RoundToBf16(mi, HashBits(idx, t_term_, off_m) >> 16);
      const uint16_t vs = RoundToBf16(vi, HashBits(idx, t_term_, off_v) >> 16);
      const float mr = Bf16ToF32(ms), vr = Bf16ToF32(vs);
      float u = kExact ? (mr / c1) / (std::sqrt(vr / c2 + eps_root) + eps)
                       : (mr * r1) / (std::sqrt(vr * r2 + eps_root) + eps);
      if (kDecoupledL2) u = u + wd * pi;
      m[i] = ms;
      v[i] = vs;
      p[i] = kShrink ? pi + ((pi * factor + neg_lr * u) - pi) : pi + neg_lr * u;
    }
  }

  template <bool kClipped, bool kCoupledL2, bool kDecoupledL2, bool kShrink>
  void RangeE(const LeafB& l, int64_t lo, int64_t n) const {
    if (l.size == 1) {  // as AdamOne: true divisions on a one-element leaf
      RangeT<true, kClipped, kCoupledL2, kDecoupledL2, kShrink>(l, lo, n);
    } else {
      RangeT<false, kClipped, kCoupledL2, kDecoupledL2, kShrink>(l, lo, n);
    }
  }

  template <bool kClipped, bool kCoupledL2>
  void RangeD(const LeafB& l, int64_t lo, int64_t n) const {
    const bool dec = bits & kDecoupled, shrink = bits & kTorchDecay;
    if (dec && shrink) return RangeE<kClipped, kCoupledL2, true, true>(l, lo, n);
    if (dec) return RangeE<kClipped, kCoupledL2, true, false>(l, lo, n);
    if (shrink) return RangeE<kClipped, kCoupledL2, false, true>(l, lo, n);
    return RangeE<kClipped, kCoupledL2, false, false>(l, lo, n);
  }

  void Range(const LeafB& l, int64_t lo, int64_t n) const {
    const bool clip = bits & kClip, coupled = bits & kCoupled;
    if (clip && coupled) return RangeD<true, true>(l, lo, n);
    if (clip) return RangeD<true, false>(l, lo, n);
    if (coupled) return RangeD<false, true>(l, lo, n);
    return RangeD<false, false>(l, lo, n);
  }

  void Run(int64_t lo, int64_t hi) {
    ForEachPiece(leaves, starts, lo, hi, [this](const LeafB& l, int64_t off, int64_t n) {
      if (skip) {
        SkipRange<float>(l.p + off, n);
      } else {
        Range(l, off, n);
      }
    });
  }

  void Work() {
    tasks.Drain([this](int64_t c) { Run(c * chunk, std::min(total, (c + 1) * chunk)); });
  }
};

ffi::Error AdamBf16Impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t mode) {
  if (args.size() < 2 || (args.size() - 2) % 4 != 0 || rets.size() != 3 * ((args.size() - 2) / 4)) {
    return ffi::Error::InvalidArgument("jadam_adam_f32_bf16: expected 2 + 4n arguments and 3n results");
  }
  const size_t n_leaves = (args.size() - 2) / 4;
  auto scalars = args.get<ffi::AnyBuffer>(0);
  auto ints = args.get<ffi::AnyBuffer>(1);
  if (!scalars.has_value() || scalars->element_type() != ffi::DataType::F32 ||
      scalars->element_count() != kNumScalars || !ints.has_value() ||
      ints->element_type() != ffi::DataType::U32 || ints->element_count() != 1 + 2 * n_leaves) {
    return ffi::Error::InvalidArgument("jadam_adam_f32_bf16: bad scalar buffers");
  }
  if (mode & kAmsgrad) return ffi::Error::InvalidArgument("jadam_adam_f32_bf16: no amsgrad");
  auto job = std::make_shared<JobB>();
  const float* s = reinterpret_cast<const float*>(scalars->untyped_data());
  std::copy(s, s + kNumScalars, job->s);
  const uint32_t* iv = reinterpret_cast<const uint32_t*>(ints->untyped_data());
  job->t_term = iv[0] * 0x85EBCA77u;
  job->bits = mode & ~kClip;
  if ((mode & kClip) && s[kClipOn] != 0.0f) job->bits |= kClip;
  job->skip = s[kApply] == 0.0f;
  const ffi::DataType want[4] = {ffi::DataType::F32, ffi::DataType::F32, ffi::DataType::BF16, ffi::DataType::BF16};
  for (size_t i = 0; i < n_leaves; ++i) {
    void* in[4];
    int64_t size = -1;
    for (int k = 0; k < 4; ++k) {
      auto b = args.get<ffi::AnyBuffer>(2 + 4 * i + k);
      if (!b.has_value() || b->element_type() != want[k] ||
          (size >= 0 && static_cast<int64_t>(b->element_count()) != size)) {
        return ffi::Error::InvalidArgument("jadam_adam_f32_bf16: bad leaf argument");
      }
      size = static_cast<int64_t>(b->element_count());
      in[k] = b->untyped_data();
    }
    void* out[3];
    for (int k = 0; k < 3; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(3 * i + k);
      if (!r.has_value() || (*r)->element_type() != want[k + 1] ||
          static_cast<int64_t>((*r)->element_count()) != size) {
        return ffi::Error::InvalidArgument("jadam_adam_f32_bf16: bad leaf result");
      }
      out[k] = (*r)->untyped_data();
      if (out[k] != in[k + 1]) std::memcpy(out[k], in[k + 1], size * (k == 0 ? 4 : 2));
    }
    if (size == 0) continue;
    job->starts.push_back(job->total);
    job->leaves.push_back(LeafB{static_cast<const float*>(in[0]), static_cast<float*>(out[0]),
                                static_cast<uint16_t*>(out[1]), static_cast<uint16_t*>(out[2]), size,
                                iv[1 + 2 * i], iv[2 + 2 * i]});
    job->total += size;
  }
  if (job->total == 0) return ffi::Error::Success();
  RunChunked(pool, job);
  return ffi::Error::Success();
}


// --- float32 parameters, 8-bit block-quantized moments (jadam/_quantize.py) ----------------------------------
//
// Call frame: scalars (float32), then per leaf g, p (float32), m codes (uint8), m absmax (float32), v codes
// (uint8), v absmax (float32); results p, m codes, m absmax, v codes, v absmax per leaf, aliased. Attribute
// `block_size`: block b of a leaf covers its flat elements [b * block_size, (b + 1) * block_size) (the last one
// possibly partial) and has the absmax of flat index b, whatever the absmax array's shape.
//
// One pass per block, as jadam's generic path computes it: the old moments dequantized (map[code] * absmax), the
// new ones formed in float32 (_ema), the parameter updated from those float32 moments (the stages after
// scale_by_moments read the values that were just requantized, not the stored ones), then each moment's block
// requantized: absmax = min(max |x| over the block's non-NaN values (0 for a block of NaNs), 2^126), so that a
// NaN or an inf never spreads over its block, inv = 1 / max(absmax, 1e-38), y = clip(x * inv, -1, 1), code =
// searchsorted(bounds, y), and a positive v never below code 1. The scalar path finds the code by the key tables of
// _quantize._lookup_tables (two memory lookups); the vector path by arithmetic in registers (_quantize._search_table,
// Search16), and by those tables only for the rare vectors that hold a value within rounding of a boundary.
//
// The maps and the tables come from Python (JadamSetQuantTables, called once when the library is loaded), so
// that _quantize.py stays their one definition. Code table entry: the low 16 bits are `base` (the boundaries below
// the key's interval), the high 16 bits a threshold on the low 16 bits of y (reversed for negative y) that holds
// the interval's boundary, if any: code = base + (low16'(y) > threshold).

// The arithmetic code search of _quantize._search_table: on a = |y|, decade d = d0[exponent] + (a > thr[exponent]),
// code = min(floor(s[d] * a + b[d]), cap[d]), trusted only where s[d] * a + b[d] is at least `window` from an integer.
// The largest block scale (_quantize.SCALE_MAX): an inf in a block leaves its other values finite, and the scale's
// reciprocal 2^-126 is a normal float, which flushing subnormals to zero keeps.
constexpr float kScaleMax = 0x1p126f;

struct SearchTable {
  alignas(64) int32_t d0[32];
  alignas(64) float thr[32];
  alignas(64) float s[16];
  alignas(64) float b[16];
  alignas(64) int32_t cap[16];
  float window;
};

struct QuantTables {
  alignas(64) float map_s[256];
  alignas(64) float map_u[256];
  alignas(64) uint8_t planes_s[4][256];  // byte k of each map value, for the 64-wide lookup
  alignas(64) uint8_t planes_u[4][256];
  SearchTable search_s, search_u;
  uint32_t code_s[1 << 16];
  uint32_t code_u[1 << 16];
};
QuantTables g_quant;
std::atomic<bool> g_quant_ready{false};

inline uint32_t Code(float y, const uint32_t* table) {
  uint32_t bits;
  std::memcpy(&bits, &y, 4);
  const uint32_t e = table[bits >> 16];
  const uint32_t low = (bits ^ ((bits >> 31) ? 0xFFFFu : 0u)) & 0xFFFFu;
  return (e & 0xFFFFu) + (low > (e >> 16) ? 1u : 0u);
}

#if defined(__AVX512F__)
// map[idx] for 16 indices in [0, 256): eight two-register permutes (the low 5 bits) and a blend tree over bits 5-7;
// faster than a gather on CPUs whose gathers are microcoded (AMD Zen 4). `map` is 64-byte aligned.
inline __m512 Lookup256(const float* map, __m512i idx) {
  __m512 r[8];
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_permutex2var_ps(_mm512_load_ps(map + 32 * k), idx, _mm512_load_ps(map + 32 * k + 16));
  }
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  const __m512 s0 = _mm512_mask_blend_ps(b5, r[0], r[1]), s1 = _mm512_mask_blend_ps(b5, r[2], r[3]);
  const __m512 s2 = _mm512_mask_blend_ps(b5, r[4], r[5]), s3 = _mm512_mask_blend_ps(b5, r[6], r[7]);
  return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, s0, s1), _mm512_mask_blend_ps(b6, s2, s3));
}

// Code(y, table) for 16 values: two lookups in the 65536-entry table, by gathers (microcoded, slow on AMD Zen 4).
inline __m512i Code16(__m512 y, const uint32_t* table) {
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i e = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), table, 4);
  const __m512i low = _mm512_and_si512(_mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31)), low16);
  const __m512i base = _mm512_and_si512(e, low16);
  const __mmask16 up = _mm512_cmpgt_epu32_mask(low, _mm512_srli_epi32(e, 16));
  return _mm512_mask_add_epi32(base, up, base, _mm512_set1_epi32(1));
}

// The same codes by arithmetic (SearchTable), in registers: the lanes where it cannot vouch for its answer (within
// the window of a boundary, NaN; for the signed map a = thr exactly, where y < 0 ties the other way; for the
// unsigned map y < 0) are added to `near`, and the caller takes Code16 for those vectors.
template <bool kSigned>
inline __m512i Search16(__m512 y, const SearchTable& t, __mmask16& near) {
  const __m512 a = kSigned ? _mm512_abs_ps(y) : y;
  const __m512i bits = _mm512_castps_si512(a);
  const __m512i e = _mm512_max_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(96));  // mod 32 below
  const __m512i d0 = _mm512_permutex2var_epi32(_mm512_load_si512(t.d0), e, _mm512_load_si512(t.d0 + 16));
  const __m512 thr = _mm512_permutex2var_ps(_mm512_load_ps(t.thr), e, _mm512_load_ps(t.thr + 16));
  const __m512i d = _mm512_mask_add_epi32(d0, _mm512_cmp_ps_mask(a, thr, _CMP_GT_OQ), d0, _mm512_set1_epi32(1));
  const __m512 x = _mm512_fmadd_ps(a, _mm512_permutexvar_ps(d, _mm512_load_ps(t.s)),
                                   _mm512_permutexvar_ps(d, _mm512_load_ps(t.b)));
  __m512i k = _mm512_min_epi32(_mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                               _mm512_permutexvar_epi32(d, _mm512_load_si512(t.cap)));
#if defined(__AVX512DQ__)
  const __m512 r = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // x - round(x)
#else
  const __m512 r = _mm512_sub_ps(x, _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  near |= _mm512_cmp_ps_mask(_mm512_abs_ps(r), _mm512_set1_ps(t.window), _CMP_NGE_UQ);
  const __mmask16 neg = _mm512_cmplt_epi32_mask(_mm512_castps_si512(y), _mm512_setzero_si512());
  if (kSigned) {
    near |= _mm512_cmp_ps_mask(a, thr, _CMP_EQ_OQ);
    const __m512i last = _mm512_set1_epi32(254);
    k = _mm512_mask_sub_epi32(k, neg, last, _mm512_min_epi32(k, last));
  } else {
    near |= neg;
  }
  return k;
}
#endif

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
// map[code] for 64 codes, as four vectors of 16 floats in order: each byte of the float is a 256-entry byte table
// (two 128-byte permutes and a blend on the code's top bit), and the four byte planes are interleaved back into
// floats. The unpacks work within 128-bit lanes, so the codes are shuffled first: out[r] lane L slot s comes from
// position 16L + 4r + s, which must hold code 16r + 4L + s.
struct Shuffle64 {
  alignas(64) uint8_t idx[64];
  constexpr Shuffle64() : idx() {
    for (int l = 0; l < 4; ++l)
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) idx[16 * l + 4 * r + s] = static_cast<uint8_t>(16 * r + 4 * l + s);
  }
};
constexpr Shuffle64 kShuffle64;

inline void Lookup256x64(const uint8_t (*planes)[256], const uint8_t* codes, __m512 out[4]) {
  const __m512i c = _mm512_permutexvar_epi8(_mm512_load_si512(kShuffle64.idx), _mm512_loadu_si512(codes));
  const __mmask64 top = _mm512_movepi8_mask(c);
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(planes[k]), c, _mm512_load_si512(planes[k] + 64));
    const __m512i hi =
        _mm512_permutex2var_epi8(_mm512_load_si512(planes[k] + 128), c, _mm512_load_si512(planes[k] + 192));
    b[k] = _mm512_mask_blend_epi8(top, lo, hi);
  }
  const __m512i w01l = _mm512_unpacklo_epi8(b[0], b[1]), w01h = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i w23l = _mm512_unpacklo_epi8(b[2], b[3]), w23h = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h));
}
#endif

inline float Clip1(float x) { return std::isnan(x) ? x : std::min(std::max(x, -1.0f), 1.0f); }  // jnp.clip

struct LeafQ {
  const float* g;
  float* p;
  uint8_t* cm;
  float* am;
  uint8_t* cv;
  float* av;
  int64_t size;
};

struct TaskQ {
  int64_t leaf, lo, hi;  // blocks [lo, hi) of a leaf
};

struct JobQ {
  std::vector<LeafQ> leaves;
  std::vector<TaskQ> ranges;  // task c runs ranges[c]
  jadam::Tasks tasks;
  int64_t bs = 0;
  int bits = 0;
  bool skip = false;
  float s[kNumScalars];

#if defined(__AVX512F__)
  // 16 values at a time: the update (from the map values of the old codes) and the requantization of a block.
  template <bool kClipped, bool kCoupledL2, bool kDecoupledL2, bool kShrink>
  struct Update {
    __m512 omb1, b1, omb2, b2, r1, r2, eps_root, eps, neg_lr, wd, rn, max_norm, factor, sign, am, av, mx_m, mx_v;
    const float* g;
    float* p;
    const uint8_t* cm;
    const uint8_t* cv;
    float* tm;
    float* tv;
    Update(const float* s, const LeafQ& l, int64_t b, int64_t bs, float* tm_, float* tv_) {
      omb1 = _mm512_set1_ps(s[kOneMinusB1]), b1 = _mm512_set1_ps(s[kB1]);
      omb2 = _mm512_set1_ps(s[kOneMinusB2]), b2 = _mm512_set1_ps(s[kB2]);
      r1 = _mm512_set1_ps(1.0f / s[kC1]), r2 = _mm512_set1_ps(1.0f / s[kC2]);
      eps_root = _mm512_set1_ps(s[kEpsRoot]), eps = _mm512_set1_ps(s[kEps]), neg_lr = _mm512_set1_ps(s[kNegLr]);
      wd = _mm512_set1_ps(s[kWeightDecay]), rn = _mm512_set1_ps(1.0f / s[kClipNorm]);
      max_norm = _mm512_set1_ps(s[kClipMax]), factor = _mm512_set1_ps(s[kDecayFactor]), sign = _mm512_set1_ps(s[kSign]);
      am = _mm512_set1_ps(l.am[b]), av = _mm512_set1_ps(l.av[b]);
      mx_m = _mm512_setzero_ps(), mx_v = _mm512_setzero_ps();  // NaNs ignored: max_ps returns its second operand
      const int64_t off = b * bs;
      g = l.g + off, p = l.p + off, cm = l.cm + off, cv = l.cv + off, tm = tm_, tv = tv_;
    }
    inline void Step16(int64_t i, __m512 m_map, __m512 v_map) {
      __m512 gi = _mm512_loadu_ps(g + i);
      const __m512 pi = _mm512_loadu_ps(p + i);
      if (kClipped) gi = _mm512_mul_ps(_mm512_mul_ps(gi, rn), max_norm);
      gi = _mm512_mul_ps(gi, sign);
      if (kCoupledL2) gi = _mm512_add_ps(gi, _mm512_mul_ps(wd, pi));
      const __m512 mo = _mm512_mul_ps(m_map, am);
      const __m512 vo = _mm512_mul_ps(v_map, av);
      const __m512 mi = _mm512_add_ps(_mm512_mul_ps(omb1, gi), _mm512_mul_ps(b1, mo));
      const __m512 vi = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(omb2, gi), gi), _mm512_mul_ps(b2, vo));
      const __m512 den = _mm512_add_ps(_mm512_sqrt_ps(_mm512_add_ps(_mm512_mul_ps(vi, r2), eps_root)), eps);
      __m512 u = _mm512_div_ps(_mm512_mul_ps(mi, r1), den);
      if (kDecoupledL2) u = _mm512_add_ps(u, _mm512_mul_ps(wd, pi));
      __m512 po;
      if (kShrink) {
        po = _mm512_add_ps(pi, _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(pi, factor), _mm512_mul_ps(neg_lr, u)), pi));
      } else {
        po = _mm512_add_ps(pi, _mm512_mul_ps(neg_lr, u));
      }
      _mm512_storeu_ps(p + i, po);
      _mm512_storeu_ps(tm + i, mi);
      _mm512_storeu_ps(tv + i, vi);
      mx_m = _mm512_max_ps(_mm512_abs_ps(mi), mx_m);
      mx_v = _mm512_max_ps(_mm512_abs_ps(vi), mx_v);
    }
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    inline void Step64(int64_t i) {
      __m512 mq[4], vq[4];
      Lookup256x64(g_quant.planes_s, cm + i, mq);
      Lookup256x64(g_quant.planes_u, cv + i, vq);
      for (int r = 0; r < 4; ++r) Step16(i + 16 * r, mq[r], vq[r]);
    }
#endif
  };

  struct Requantize {
    __m512 inv_m, inv_v;
    const float* tm;
    const float* tv;
    uint8_t* cm;
    uint8_t* cv;
    // Finishes the block's maxima, stores the scales, and gets ready to code the block.
    Requantize(const LeafQ& l, int64_t b, int64_t bs, __m512 mx_m, __m512 mx_v, const float* tm_, const float* tv_)
        : Requantize(l, b, bs, _mm512_reduce_max_ps(mx_m), _mm512_reduce_max_ps(mx_v), tm_, tv_) {}
    Requantize(const LeafQ& l, int64_t b, int64_t bs, float m, float v, const float* tm_, const float* tv_) {
      m = std::min(m, kScaleMax), v = std::min(v, kScaleMax);
      l.am[b] = m;
      l.av[b] = v;
      inv_m = _mm512_set1_ps(1.0f / std::max(m, 1e-38f));
      inv_v = _mm512_set1_ps(1.0f / std::max(v, 1e-38f));
      tm = tm_, tv = tv_, cm = l.cm + b * bs, cv = l.cv + b * bs;
    }
    // The codes of values j..j+15, as int32 lanes.
    inline void Codes16(int64_t j, __m512i& qm, __m512i& qv) const {
      // y = x * inv is not clipped to [-1, 1] here: |x| <= absmax, so |y| exceeds 1 by rounding only, and Search16
      // codes (1, 2) as it codes 1; the exact lookup below gets the clipped values.
      const __m512 ym = _mm512_mul_ps(_mm512_loadu_ps(tm + j), inv_m);
      const __m512 yv = _mm512_mul_ps(_mm512_loadu_ps(tv + j), inv_v);
      __mmask16 near = 0;
      qm = Search16<true>(ym, g_quant.search_s, near);
      qv = Search16<false>(yv, g_quant.search_u, near);
      if (near) {  // within rounding of a boundary (or NaN, or a negative v): the exact lookup, for all 16
        const __m512 one = _mm512_set1_ps(1.0f), neg_one = _mm512_set1_ps(-1.0f);
        qm = Code16(_mm512_min_ps(one, _mm512_max_ps(neg_one, ym)), g_quant.code_s);
        qv = Code16(_mm512_min_ps(one, _mm512_max_ps(neg_one, yv)), g_quant.code_u);
      }
      const __mmask16 pos = _mm512_cmp_ps_mask(yv, _mm512_setzero_ps(), _CMP_GT_OQ);
      qv = _mm512_mask_max_epu32(qv, pos, qv, _mm512_set1_epi32(1));
    }
    inline void Step16(int64_t j) {
      __m512i qm, qv;
      Codes16(j, qm, qv);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cm + j), _mm512_cvtepi32_epi8(qm));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cv + j), _mm512_cvtepi32_epi8(qv));
    }
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    inline void Step64(int64_t j) {
      __m512i qm[4], qv[4];
      for (int r = 0; r < 4; ++r) Codes16(j + 16 * r, qm[r], qv[r]);
      Store64(cm + j, qm);
      Store64(cv + j, qv);
    }
    // 64 codes (four vectors of int32 in [0, 256)) as 64 bytes, by two saturating packs, which work within 128-bit
    // lanes (lane L of the packed bytes holds q[k][4L..4L+3] at dword 4L + k) and one dword permute.
    static inline void Store64(uint8_t* out, const __m512i q[4]) {
      const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]), _mm512_packus_epi32(q[2], q[3]));
      const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      _mm512_storeu_si512(out, _mm512_permutexvar_epi32(order, bytes));
    }
#endif
  };

#endif

  // One block: pass 1 puts the new moments into tm, tv and updates the parameters in place; pass 2 requantizes.
  template <bool kExact, bool kClipped, bool kCoupledL2, bool kDecoupledL2, bool kShrink>
  void Block(const LeafQ& l, int64_t b, float* __restrict tm, float* __restrict tv) const {
    const float omb1 = s[kOneMinusB1], b1 = s[kB1], omb2 = s[kOneMinusB2], b2 = s[kB2];
    const float c1 = s[kC1], c2 = s[kC2], eps_root = s[kEpsRoot], eps = s[kEps], neg_lr = s[kNegLr];
    const float wd = s[kWeightDecay], norm = s[kClipNorm], max_norm = s[kClipMax], factor = s[kDecayFactor];
    const float sign = s[kSign], r1 = 1.0f / c1, r2 = 1.0f / c2, rn = 1.0f / norm;
    const int64_t off = b * bs, n = std::min(bs, l.size - off);
    const float* __restrict g = l.g + off;
    float* __restrict p = l.p + off;
    uint8_t* __restrict cm = l.cm + off;
    uint8_t* __restrict cv = l.cv + off;
    const float am = l.am[b], av = l.av[b];
    const float* map_s = g_quant.map_s;
    const float* map_u = g_quant.map_u;
    // the blocks' maxima from 0, NaNs ignored (_quantize.quantize: a NaN stays in its own value)
    float mx_m = 0.0f, mx_v = 0.0f;
    int64_t i = 0;
#if defined(__AVX512F__)
    if (!kExact) {
      Update<kClipped, kCoupledL2, kDecoupledL2, kShrink> up(s, l, b, bs, tm, tv);
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
      for (; i + 64 <= n; i += 64) up.Step64(i);
#endif
      for (; i + 16 <= n; i += 16) {
        const __m512i km = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cm + i)));
        const __m512i kv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cv + i)));
        up.Step16(i, Lookup256(map_s, km), Lookup256(map_u, kv));
      }
      mx_m = _mm512_reduce_max_ps(up.mx_m);
      mx_v = _mm512_reduce_max_ps(up.mx_v);
    }
#endif
    for (; i < n; ++i) {
      float gi = g[i];
      const float pi = p[i];
      if (kClipped) gi = kExact ? (gi / norm) * max_norm : (gi * rn) * max_norm;
      gi = gi * sign;
      if (kCoupledL2) gi = gi + wd * pi;
      const float mo = map_s[cm[i]] * am;  // _quantize.dequantize
      const float vo = map_u[cv[i]] * av;
      const float mi = omb1 * gi + b1 * mo;
      const float vi = (omb2 * gi) * gi + b2 * vo;  // ((1 - b2) g) g: finite wherever v can hold it
      float u = kExact ? (mi / c1) / (std::sqrt(vi / c2 + eps_root) + eps)
                       : (mi * r1) / (std::sqrt(vi * r2 + eps_root) + eps);
      if (kDecoupledL2) u = u + wd * pi;
      p[i] = kShrink ? pi + ((pi * factor + neg_lr * u) - pi) : pi + neg_lr * u;
      tm[i] = mi;
      tv[i] = vi;
      const float am_i = std::fabs(mi), av_i = std::fabs(vi);
      mx_m = am_i > mx_m ? am_i : mx_m;
      mx_v = av_i > mx_v ? av_i : mx_v;
    }
    // Pass 2: requantize. _quantize.quantize: absmax capped at kScaleMax (an inf stays in its own value),
    // x * (1 / max(absmax, 1e-38)), clipped to [-1, 1], coded.
    mx_m = std::min(mx_m, kScaleMax), mx_v = std::min(mx_v, kScaleMax);
    const float inv_m = 1.0f / std::max(mx_m, 1e-38f);
    const float inv_v = 1.0f / std::max(mx_v, 1e-38f);
    l.am[b] = mx_m;
    l.av[b] = mx_v;
    const uint32_t* code_s = g_quant.code_s;
    const uint32_t* code_u = g_quant.code_u;
    int64_t j = 0;
#if defined(__AVX512F__)
    {
      Requantize rq(l, b, bs, mx_m, mx_v, tm, tv);
      for (; j + 16 <= n; j += 16) rq.Step16(j);
    }
#endif
    for (; j < n; ++j) {
      const float ym = Clip1(tm[j] * inv_m);
      const float yv = Clip1(tv[j] * inv_v);
      cm[j] = static_cast<uint8_t>(Code(ym, code_s));
      const uint32_t qv = Code(yv, code_u);
      cv[j] = static_cast<uint8_t>(yv > 0.0f ? std::max(qv, 1u) : qv);
    }
  }

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  // Whole blocks of a multiple of 64 values, software-pipelined: the requantization of block b (its code search)
  // interleaved with the update of block b + 1 (map permutes, sqrt, division), so that the two kinds of
  // work overlap; the same operations on the same values as Block. Blocks [lo, hi), all whole and a multiple of 64
  // long; tm, tv hold two blocks each.
  template <bool kClipped, bool kCoupledL2, bool kDecoupledL2, bool kShrink>
  void Pipelined(const LeafQ& l, int64_t lo, int64_t hi, float* tm, float* tv) const {
    using U = Update<kClipped, kCoupledL2, kDecoupledL2, kShrink>;
    U up(s, l, lo, bs, tm, tv);
    for (int64_t i = 0; i < bs; i += 64) up.Step64(i);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t cur = (b - lo) & 1;
      Requantize rq(l, b, bs, up.mx_m, up.mx_v, tm + cur * bs, tv + cur * bs);
      if (b + 1 < hi) {
        up = U(s, l, b + 1, bs, tm + (1 - cur) * bs, tv + (1 - cur) * bs);
        for (int64_t i = 0; i < bs; i += 64) {
          up.Step64(i);
          rq.Step64(i);
        }
      } else {
        for (int64_t j = 0; j < bs; j += 64) rq.Step64(j);
      }
    }
  }
#endif

  template <bool kClipped, bool kCoupledL2, bool kDecoupledL2, bool kShrink>
  void RangeT(const LeafQ& l, int64_t lo, int64_t hi, float* tm, float* tv) const {
    if (l.size == 1) {  // as AdamOne: true divisions on a one-element leaf
      Block<true, kClipped, kCoupledL2, kDecoupledL2, kShrink>(l, 0, tm, tv);
      return;
    }
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    if (bs % 64 == 0) {
      const int64_t whole = std::min(hi, l.size / bs);  // blocks before a partial last one
      if (whole > lo) Pipelined<kClipped, kCoupledL2, kDecoupledL2, kShrink>(l, lo, whole, tm, tv);
      for (int64_t b = std::max(lo, whole); b < hi; ++b) {
        Block<false, kClipped, kCoupledL2, kDecoupledL2, kShrink>(l, b, tm, tv);
      }
      return;
    }
#endif
    for (int64_t b = lo; b < hi; ++b) Block<false, kClipped, kCoupledL2, kDecoupledL2, kShrink>(l, b, tm, tv);
  }

  template <bool kClipped, bool kCoupledL2>
  void RangeD(const LeafQ& l, int64_t lo, int64_t hi, float* tm, float* tv) const {
    const bool dec = bits & kDecoupled, shrink = bits & kTorchDecay;
    if (dec && shrink) return RangeT<kClipped, kCoupledL2, true, true>(l, lo, hi, tm, tv);
    if (dec) return RangeT<kClipped, kCoupledL2, true, false>(l, lo, hi, tm, tv);
    if (shrink) return RangeT<kClipped, kCoupledL2, false, true>(l, lo, hi, tm, tv);
    return RangeT<kClipped, kCoupledL2, false, false>(l, lo, hi, tm, tv);
  }

  void Run(const TaskQ& t, float* tm, float* tv) const {
    const LeafQ& l = leaves[t.leaf];
    if (skip) {  // a rejected step: codes and scales stay, the parameters get + 0
      const int64_t lo = t.lo * bs, hi = std::min(l.size, t.hi * bs);
      SkipRange<float>(l.p + lo, hi - lo);
      return;
    }
    const bool clip = bits & kClip, coupled = bits & kCoupled;
    if (clip && coupled) return RangeD<true, true>(l, t.lo, t.hi, tm, tv);
    if (clip) return RangeD<true, false>(l, t.lo, t.hi, tm, tv);
    if (coupled) return RangeD<false, true>(l, t.lo, t.hi, tm, tv);
    return RangeD<false, false>(l, t.lo, t.hi, tm, tv);
  }

  void Work() {
    std::vector<float> tmp(4 * static_cast<size_t>(bs));  // the new m and v of two blocks (Pipelined)
    tasks.Drain([&](int64_t c) { Run(ranges[c], tmp.data(), tmp.data() + 2 * bs); });
  }
};

ffi::Error AdamQ8Impl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t mode,
                      int64_t block_size) {
  if (!g_quant_ready.load(std::memory_order_acquire)) {
    return ffi::Error::Internal("jadam_adam_f32_q8: the quantization tables were not set (JadamSetQuantTables)");
  }
  if (block_size < 1 || (block_size & (block_size - 1))) {
    return ffi::Error::InvalidArgument("jadam_adam_f32_q8: block_size must be a positive power of two");
  }
  if (args.size() < 1 || (args.size() - 1) % 6 != 0 || rets.size() != 5 * ((args.size() - 1) / 6)) {
    return ffi::Error::InvalidArgument("jadam_adam_f32_q8: expected 1 + 6n arguments and 5n results");
  }
  if (mode & kAmsgrad) return ffi::Error::InvalidArgument("jadam_adam_f32_q8: no amsgrad");
  const size_t n_leaves = (args.size() - 1) / 6;
  auto scalars = args.get<ffi::AnyBuffer>(0);
  if (!scalars.has_value() || scalars->element_type() != ffi::DataType::F32 ||
      scalars->element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("jadam_adam_f32_q8: bad scalar buffer");
  }
  auto job = std::make_shared<JobQ>();
  const float* s = reinterpret_cast<const float*>(scalars->untyped_data());
  std::copy(s, s + kNumScalars, job->s);
  job->bs = block_size;
  job->bits = mode & ~kClip;
  if ((mode & kClip) && s[kClipOn] != 0.0f) job->bits |= kClip;
  job->skip = s[kApply] == 0.0f;
  using DT = ffi::DataType;
  const DT want[6] = {DT::F32, DT::F32, DT::U8, DT::F32, DT::U8, DT::F32};
  const size_t width[6] = {4, 4, 1, 4, 1, 4};
  // Tasks of whole blocks, about kChunk elements each.
  const int64_t per_task = std::max<int64_t>(1, kChunk / block_size);
  int64_t total = 0;
  for (size_t i = 0; i < n_leaves; ++i) {
    void* in[6];
    int64_t size = -1;
    for (int k = 0; k < 6; ++k) {
      auto b = args.get<ffi::AnyBuffer>(1 + 6 * i + k);
      if (!b.has_value() || b->element_type() != want[k]) {
        return ffi::Error::InvalidArgument("jadam_adam_f32_q8: bad leaf argument");
      }
      const int64_t count = static_cast<int64_t>(b->element_count());
      if (k == 0) size = count;
      const int64_t expect = (k == 3 || k == 5) ? (size + block_size - 1) / block_size : size;
      if (count != expect) return ffi::Error::InvalidArgument("jadam_adam_f32_q8: leaf sizes differ");
      in[k] = b->untyped_data();
    }
    void* out[5];
    for (int k = 0; k < 5; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(5 * i + k);
      const int64_t expect = (k == 2 || k == 4) ? (size + block_size - 1) / block_size : size;
      if (!r.has_value() || (*r)->element_type() != want[k + 1] ||
          static_cast<int64_t>((*r)->element_count()) != expect) {
        return ffi::Error::InvalidArgument("jadam_adam_f32_q8: bad leaf result");
      }
      out[k] = (*r)->untyped_data();
      if (out[k] != in[k + 1]) std::memcpy(out[k], in[k + 1], expect * width[k + 1]);
    }
    if (size == 0) continue;
    const int64_t leaf = static_cast<int64_t>(job->leaves.size());
    job->leaves.push_back(LeafQ{static_cast<const float*>(in[0]), static_cast<float*>(out[0]),
                                static_cast<uint8_t*>(out[1]), static_cast<float*>(out[2]),
                                static_cast<uint8_t*>(out[3]), static_cast<float*>(out[4]), size});
    const int64_t blocks = (size + block_size - 1) / block_size;
    for (int64_t lo = 0; lo < blocks; lo += per_task) job->ranges.push_back(TaskQ{leaf, lo, std::min(blocks, lo + per_task)});
    total += size;
  }
  if (job->ranges.empty()) return ffi::Error::Success();
  job->tasks.n = static_cast<int64_t>(job->ranges.size());
  jadam::RunOnPool(pool, job, total >= kParallelThreshold);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamAdamF32Bf16, AdamBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("mode"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamAdamF32Q8, AdamQ8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("mode")
                                  .Attr<int64_t>("block_size"));

// The 8-bit kernel's maps (256 float32 each, signed then unsigned), code tables (65536 uint32 each) and search tables
// (113 uint32 words each, as SearchTable), from jadam._quantize.kernel_tables(); called once, before the first 8-bit
// step.
extern "C" __attribute__((visibility("default"))) void JadamSetQuantTables(const float* map_s, const float* map_u,
                                                                          const uint32_t* code_s,
                                                                          const uint32_t* code_u,
                                                                          const uint32_t* search_s,
                                                                          const uint32_t* search_u) {
  static_assert(sizeof(SearchTable) >= 113 * 4 && offsetof(SearchTable, window) == 112 * 4, "SearchTable layout");
  std::memcpy(g_quant.map_s, map_s, sizeof(g_quant.map_s));
  std::memcpy(g_quant.map_u, map_u, sizeof(g_quant.map_u));
  std::memcpy(g_quant.code_s, code_s, sizeof(g_quant.code_s));
  std::memcpy(g_quant.code_u, code_u, sizeof(g_quant.code_u));
  std::memcpy(&g_quant.search_s, search_s, 113 * 4);
  std::memcpy(&g_quant.search_u, search_u, 113 * 4);
  for (int j = 0; j < 256; ++j) {
    uint32_t bs, bu;
    std::memcpy(&bs, map_s + j, 4);
    std::memcpy(&bu, map_u + j, 4);
    for (int k = 0; k < 4; ++k) {
      g_quant.planes_s[k][j] = static_cast<uint8_t>(bs >> (8 * k));
      g_quant.planes_u[k][j] = static_cast<uint8_t>(bu >> (8 * k));
    }
  }
  g_quant_ready.store(true, std::memory_order_release);
}

// For the tests: the codes the 8-bit step gives the values y (already scaled and clipped to [-1, 1]), with the map
// `is_signed` picks, by the same search as the step (16 at a time where it can, then one by one), without the
// positive-v rule.
extern "C" __attribute__((visibility("default"))) void JadamQuantCodes(const float* y, int64_t n, int is_signed,
                                                                      uint8_t* out) {
  const uint32_t* table = is_signed ? g_quant.code_s : g_quant.code_u;
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(y + i);
    __mmask16 near = 0;
    __m512i q = is_signed ? Search16<true>(v, g_quant.search_s, near) : Search16<false>(v, g_quant.search_u, near);
    if (near) q = Code16(v, table);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(q));
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<uint8_t>(Code(y[i], table));
}
