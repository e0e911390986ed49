// jadam's fused Adam step on CPU: one pass over memory for every leaf.
//
// Per element it reads g, p, m, v and writes p, m, v (28 bytes in float32),
// where XLA:CPU, without multi-output fusion, makes three passes (40 bytes).
// The arithmetic is jadam's generic path, operation for operation and in the
// same order, so that it matches it bitwise; build it without fast-math and
// without floating-point contraction (-ffp-contract=off).
//
// The step is written once (struct Adam: the gradient's stages, the moments, bias correction, the denominator,
// decay, apply), as a template over the lane type (a scalar or a vector of simd.h, so one formula serves the
// vector loops and their tails) and run by one loop (Steps) over a storage policy, which says how the moments
// are read and written and what the stages after scale_by_moments read back:
//   PlainLeaf<T>  float32 / float64 moments, AMSGrad's running maximum (JadamAdamF32, JadamAdamF64);
//   Bf16Leaf      bfloat16 moments with stochastic rounding (JadamAdamF32Bf16);
//   Q8Block       8-bit block-quantized moments with a per-block absmax (JadamAdamF32Q8).
// Each policy's SIMD loads and stores (bfloat16 widening and rounding, the 256-entry map lookup, the code search)
// are its own code, per instruction set where one helps.
//
// Call frame: arg 0 is a 1-d buffer of scalars (kNumScalars, the leaves'
// dtype); then 4 buffers per leaf (g, p, m, v), 5 with amsgrad (+ v_max);
// results are 3 per leaf (p, m, v), 4 with amsgrad, aliased by the caller to
// the donated inputs. The attribute `mode` says which stages are present.
// The bfloat16 and 8-bit variants' frames are described above their handlers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "pool.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using jadam::Abs;
using jadam::BitCast;
using jadam::IsFinite;
using jadam::IsNan;
using jadam::Lane;
using jadam::Select;
using jadam::Sqrt;
using jadam::VecF;
using jadam::VecOf;
using jadam::VecU16;
using jadam::VecU32;

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

// --- Adam's arithmetic, once -----------------------------------------------------------------------------------

// The hyperparameters of a step, from the scalar buffer. XLA rewrites x / broadcast(c) as x * (1 / c): so must
// we (r1, r2, rn), to give its bits, except on a one-element leaf (see Stages::kExact).
template <typename T>
struct Hyper {
  T omb1, b1, omb2, b2, c1, c2, r1, r2, eps_root, eps, neg_lr, wd, norm, rn, max_norm, factor, sign;
  explicit Hyper(const T* s)
      : omb1(s[kOneMinusB1]), b1(s[kB1]), omb2(s[kOneMinusB2]), b2(s[kB2]), c1(s[kC1]), c2(s[kC2]),
        r1(T(1) / s[kC1]), r2(T(1) / s[kC2]), eps_root(s[kEpsRoot]), eps(s[kEps]), neg_lr(s[kNegLr]),
        wd(s[kWeightDecay]), norm(s[kClipNorm]), rn(T(1) / s[kClipNorm]), max_norm(s[kClipMax]),
        factor(s[kDecayFactor]), sign(s[kSign]) {}
};

// The stages present, known at compile time: the vector loops' instantiations. kNegate is never a template flag:
// the sign is a scalar (x * -1 is -x exactly), which halves the instantiations.
template <int kBits>
struct StaticStages {
  static constexpr bool kExact = false;
  static constexpr bool Has(int bit) { return (kBits & bit) != 0; }
};

// The stages present, read at run time: a one-element leaf, where XLA turns broadcast(c) into a reshape and keeps
// x / c a true division, so the divisions by the norm and the corrections stay divisions (kExact: no reciprocal).
struct RuntimeStages {
  static constexpr bool kExact = true;
  int bits;
  bool Has(int bit) const { return (bits & bit) != 0; }
};

// One Adam step of one lane (X: T or a vector of T), the chain's stages in order:
//   g <- clip_by_global_norm(g); g <- sign g (flip_sign); g <- g + wd p (add_l2 before the moments)
//   m <- (1 - b1) g + b1 m;  v <- (1 - b2) g^2 + b2 v                  (scale_by_moments' _ema)
//   [v_max <- max(v_max, v)]                                             (max_nu before bias_correct)
//   u <- (m / c1) / (sqrt(v / c2 + eps_root) + eps)                     (bias_correct, normalize)
//   u <- u + wd p (add_l2 after normalize);  p <- p - lr u, or p + ((p factor - lr u) - p) with decoupled_decay
template <typename Tp, typename S>
struct Adam {
  using T = Tp;
  static constexpr bool kExact = S::kExact;
  Hyper<T> h;  // by value: the loops keep it in registers, as no store through a T* can alias it
  S stages;

  // `negate_exactly`: flip_sign as -g on a one-element leaf (the float kernel's rule), else g * sign.
  template <typename X>
  X Gradient(X g, X p, bool negate_exactly) const {
    if (stages.Has(kClip)) g = kExact ? (g / h.norm) * h.max_norm : (g * h.rn) * h.max_norm;  // t / norm as XLA
    if (kExact && negate_exactly) {
      if (stages.Has(kNegate)) g = -g;
    } else {
      g = g * h.sign;  // -1 (exact), else 1
    }
    if (stages.Has(kCoupled)) g = g + h.wd * p;
    return g;
  }

  // _ema's first moment, jadam._stages.moments.first_moment: (1 - d) g + d m; where m is not finite, PyTorch's
  // lerp (m + w (g - m) for w < 1/2, else g - (g - m)(1 - w)), NaN for an infinite m; both computed, one kept.
  // `finite`: the storage never holds a non-finite m (8-bit: map value times a capped scale), the sum alone.
  template <typename X>
  X First(X g, X m, bool finite) const {
    const X sum = h.omb1 * g + h.b1 * m;
    if (finite) return sum;
    const auto ok = IsFinite(m);
    if (!jadam::Any(ok == 0)) return sum;  // all finite, nearly always: the select below would keep the sum
    const X lerp = h.omb1 < T(0.5) ? m + h.omb1 * (g - m) : g - (g - m) * (T(1) - h.omb1);
    return Select(ok, sum, lerp);
  }

  // _ema's second moment: (1 - b2) g^2 + b2 v; `scaled` ((1 - b2) g) g, as the 8-bit stage forms it (finite
  // wherever v can hold it).
  template <typename X>
  X Second(X g, X v, bool scaled) const {
    return scaled ? (h.omb2 * g) * g + h.b2 * v : h.omb2 * (g * g) + h.b2 * v;
  }

  // max_nu: jnp.maximum, NaN-propagating.
  template <typename X>
  X Max(X v, X vm) const {
    return Select(IsNan(v) | IsNan(vm), v + vm, Select(v > vm, v, vm));
  }

  // bias_correct and normalize.
  template <typename X>
  X Direction(X m, X v) const {
    if (kExact) return (m / h.c1) / (Sqrt(v / h.c2 + h.eps_root) + h.eps);
    return (m * h.r1) / (Sqrt(v * h.r2 + h.eps_root) + h.eps);
  }

  // add_l2 after normalize (AdamW), scale_by_lr, decoupled_decay, apply_updates.
  template <typename X>
  X Apply(X p, X u) const {
    if (stages.Has(kDecoupled)) u = u + h.wd * p;
    return stages.Has(kTorchDecay) ? p + ((p * h.factor + h.neg_lr * u) - p) : p + h.neg_lr * u;
  }
};

// One lane of the step on element i of a storage `st` (its g, p, moments), from the old moments mo, vo.
template <typename X, typename A, typename St>
inline void Element(const A& a, St& st, int64_t i, X mo, X vo) {
  const X p = jadam::Load<X>(st.p + i);
  const X g = a.Gradient(jadam::Load<X>(st.g + i), p, St::kExactNegates);
  const X m = st.WriteM(i, a.First(g, mo, St::kFiniteMoments));  // what the stages after the moments read
  X v = st.WriteV(i, a.Second(g, vo, St::kScaledSquare));
  if constexpr (St::kMax) {
    if (a.stages.Has(kAmsgrad)) {
      v = a.Max(v, jadam::Load<X>(st.vmax + i));
      jadam::Store(st.vmax + i, v);
    }
  }
  jadam::Store(st.p + i, a.Apply(p, a.Direction(m, v)));
}

// The step on elements [lo, hi) of a storage: groups of St::kGroup vectors where its loads come in groups, then
// vectors, then one element at a time.
template <typename A, typename St>
inline void Steps(const A& a, St& storage, int64_t lo, int64_t hi) {
  St st = storage;  // a local copy, whose running values (the 8-bit block's maxima) can stay in registers
  using T = typename A::T;
  using V = typename VecOf<T>::type;
  constexpr int64_t kN = Lane<V>::kN;
  int64_t i = lo;
  if constexpr (St::kGroup > 1) {
    for (; i + St::kGroup * kN <= hi; i += St::kGroup * kN) {
      V mo[St::kGroup], vo[St::kGroup];
      st.ReadGroup(i, mo, vo);
      for (int r = 0; r < St::kGroup; ++r) Element<V>(a, st, i + r * kN, mo[r], vo[r]);
    }
  }
  for (; i + kN <= hi; i += kN) {
    V mo, vo;
    st.Read(i, mo, vo);
    Element<V>(a, st, i, mo, vo);
  }
  for (; i < hi; ++i) {
    T mo, vo;
    st.Read(i, mo, vo);
    Element<T>(a, st, i, mo, vo);
  }
  storage = st;
}

// A rejected step (optax.apply_if_finite): the state stays, the parameters get + 0 as apply_updates adds.
template <typename T>
void SkipRange(T* __restrict p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] + T(0);
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

// --- plain moments (float32, float64) --------------------------------------------------------------------------

template <typename Tp>
struct PlainLeaf {
  using T = Tp;
  static constexpr bool kExactNegates = true, kFiniteMoments = false, kScaledSquare = false, kMax = true;
  static constexpr int kGroup = 1;
  static constexpr int kStages = 63;
  const T* g;
  T* p;  // in place: the results are aliased to the inputs
  T* m;
  T* v;
  T* vmax;  // amsgrad only
  int64_t size;

  template <typename X>
  void Read(int64_t i, X& mo, X& vo) const {
    mo = jadam::Load<X>(m + i);
    vo = jadam::Load<X>(v + i);
  }
  template <typename X>
  X WriteM(int64_t i, X x) const {
    jadam::Store(m + i, x);
    return x;
  }
  template <typename X>
  X WriteV(int64_t i, X x) const {
    jadam::Store(v + i, x);
    return x;
  }
};

// --- bfloat16 moments with jadam/_storage/bf16.py's stochastic rounding ------------------------------------------

// _storage.bf16.hash_bits: murmur3's fmix32 of the flat index and the step (U: uint32 or a vector of them).
template <typename U>
inline U HashBits(U i, uint32_t t_term, uint32_t offset) {
  U h = i * 0x9E3779B1u + (t_term + offset);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// _storage.bf16.round_to_bfloat16's 16 bits (in the low half of each 32-bit lane), branch-free: x + r truncated,
// NaN quieted, an infinity kept.
template <typename X>
inline typename Lane<X>::UInt RoundToBf16(X x, typename Lane<X>::UInt r) {
  using U = typename Lane<X>::UInt;
  using I = typename Lane<X>::Int;
  const U bits = BitCast<U>(x);
  const I mag = BitCast<I>(bits & 0x7FFFFFFFu);
  const U rounded = ((bits + r) & 0xFFFF0000u) >> 16;
  if (!jadam::Any(mag >= 0x7F800000)) return rounded;  // all finite, nearly always
  const U special = Select(mag > 0x7F800000, ((bits >> 16) & 0x8000u) | 0x7FC0u, bits >> 16);  // NaN, inf
  return Select(mag < 0x7F800000, rounded, special);
}

struct Bf16Leaf {
  using T = float;
  static constexpr bool kExactNegates = false, kFiniteMoments = false, kScaledSquare = false, kMax = false;
  static constexpr int kGroup = 1;
  static constexpr int kStages = 63 & ~kAmsgrad;
  const float* g;
  float* p;
  uint16_t* m;
  uint16_t* v;
  int64_t size;
  uint32_t off_m, off_v;  // the hash offsets of the two streams
  uint32_t t_term;  // the step's term of the hash

  template <typename X>
  static X Widen(const uint16_t* b) {
    if constexpr (std::is_same_v<X, float>) {
      return BitCast<float>(static_cast<uint32_t>(*b) << 16);
    } else {
      return BitCast<X>(__builtin_convertvector(jadam::Load<VecU16>(b), VecU32) << 16);
    }
  }
  template <typename X>
  void Read(int64_t i, X& mo, X& vo) const {
    mo = Widen<X>(m + i);
    vo = Widen<X>(v + i);
  }
  // Stores x rounded stochastically with the bits of hash_bits(i, t, stream); returns the stored value, which the
  // corrections read, as jadam's stages do.
  template <typename X>
  X Round(uint16_t* out, int64_t i, X x, uint32_t off) const {
    using U = typename Lane<X>::UInt;
    U idx;
    if constexpr (std::is_same_v<X, float>) {
      idx = static_cast<uint32_t>(i);
    } else {
      idx = static_cast<uint32_t>(i) + jadam::Iota();
    }
    const U b = RoundToBf16(x, HashBits(idx, t_term, off) >> 16);
    if constexpr (std::is_same_v<X, float>) {
      out[i] = static_cast<uint16_t>(b);
    } else {
      jadam::Store(out + i, __builtin_convertvector(b, VecU16));
    }
    return BitCast<X>(b << 16);
  }
  template <typename X>
  X WriteM(int64_t i, X x) const {
    return Round(m, i, x, off_m);
  }
  template <typename X>
  X WriteV(int64_t i, X x) const {
    return Round(v, i, x, off_v);
  }
};

// --- the jobs of the float and bfloat16 kernels: leaves end to end, cut into chunks ---------------------------

template <typename LeafT>
using RangeFn = void (*)(const Hyper<typename LeafT::T>&, const LeafT&, int64_t, int64_t);

template <typename LeafT, int kBits>
void RangeOf(const Hyper<typename LeafT::T>& h, const LeafT& l, int64_t lo, int64_t n) {
  const Adam<typename LeafT::T, StaticStages<kBits>> a{h, {}};
  LeafT st = l;
  Steps(a, st, lo, lo + n);
}

template <typename LeafT, size_t... I>
RangeFn<LeafT> PickRange(int bits, std::index_sequence<I...>) {
  static constexpr RangeFn<LeafT> table[] = {
      &RangeOf<LeafT, static_cast<int>(I) & LeafT::kStages & ~kNegate>...};
  return table[bits & 63];
}

template <typename LeafT>
struct ChunkJob {
  using T = typename LeafT::T;
  std::vector<LeafT> leaves;
  std::vector<int64_t> starts;  // starts[i]: global index of leaf i's first element
  int64_t total = 0;
  int64_t chunk = 0;  // elements a task
  jadam::Tasks tasks;
  RangeFn<LeafT> range = nullptr;
  int bits = 0;
  bool skip = false;
  Hyper<T> h;

  ChunkJob(const T* s, int bits_) : bits(bits_), skip(s[kApply] == T(0)), h(s) {
    range = PickRange<LeafT>(bits, std::make_index_sequence<64>{});
  }

  void Run(int64_t lo, int64_t hi) {
    ForEachPiece(leaves, starts, lo, hi, [this](const LeafT& l, int64_t off, int64_t n) {
      if (skip) {
        SkipRange<T>(l.p + off, n);
      } else if (l.size == 1) {
        const Adam<T, RuntimeStages> a{h, {bits}};
        LeafT st = l;
        Steps(a, st, 0, 1);
      } else {
        range(h, l, off, n);
      }
    });
  }

  void Work() {
    tasks.Drain([this](int64_t c) { Run(c * chunk, std::min(total, (c + 1) * chunk)); });
  }
};

// Runs a job over its `total` elements in tasks of kChunk elements (all of them in one task on the calling thread
// below kParallelThreshold).
template <typename Job>
void RunChunked(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job) {
  const bool parallel = job->total >= kParallelThreshold;
  job->chunk = parallel ? kChunk : job->total;
  job->tasks.n = (job->total + job->chunk - 1) / job->chunk;
  jadam::RunOnPool(pool, job, parallel);
}

// The stages the step runs: `mode`, with the clip only where the norm is above max_norm.
template <typename T>
int StagesOf(int32_t mode, const T* s) {
  int bits = mode & ~kClip;
  if ((mode & kClip) && s[kClipOn] != T(0)) bits |= kClip;
  return bits;
}

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
  const T* s = reinterpret_cast<const T*>(scalars->untyped_data());
  auto job = std::make_shared<ChunkJob<PlainLeaf<T>>>(s, StagesOf(mode, s));
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
    job->leaves.push_back(PlainLeaf<T>{in[0], out[0], out[1], out[2], ams ? out[3] : nullptr, size});
    job->total += size;
  }
  if (job->total == 0) return ffi::Error::Success();
  RunChunked(pool, job);
  return ffi::Error::Success();
}

// Call frame: scalars (float32), then uint32[1 + 2n]: the step count t and, per leaf, the hash offsets of its
// two streams ((2k + moment) * 0xC2B2AE3D, k the leaf's position); then g, p (float32), m, v (bfloat16) per
// leaf; results p, m, v per leaf, aliased. Each moment is formed in float32 from the stored one, rounded
// stochastically with the bits of hash_bits(flat index, t, stream), and the corrections read the
// stored (rounded) value, as jadam's stages do.
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
  const float* s = reinterpret_cast<const float*>(scalars->untyped_data());
  auto job = std::make_shared<ChunkJob<Bf16Leaf>>(s, StagesOf(mode, s));
  const uint32_t* iv = reinterpret_cast<const uint32_t*>(ints->untyped_data());
  const uint32_t t_term = iv[0] * 0x85EBCA77u;
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
    job->leaves.push_back(Bf16Leaf{static_cast<const float*>(in[0]), static_cast<float*>(out[0]),
                                   static_cast<uint16_t*>(out[1]), static_cast<uint16_t*>(out[2]), size,
                                   iv[1 + 2 * i], iv[2 + 2 * i], t_term});
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

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// The AVX2 forms of the lookups above, 8 lanes at a time; the same values, bit for bit.

// map[idx] for 8 indices in [0, 256): one gather (a 256-entry table is 32 registers: gathering beats permuting).
inline __m256 Lookup256(const float* map, __m256i idx) { return _mm256_i32gather_ps(map, idx, 4); }

// t[idx mod 32] and t[idx mod 16] for 8 indices: in-register permutes, then blends on bits 3 and 4 (moved into the
// sign bit, which blendv reads). `t` is 32-byte aligned.
inline __m256 Table32(const float* t, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(_mm256_load_ps(t), idx);
  const __m256 b = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8), idx);
  const __m256 c = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 16), idx);
  const __m256 d = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 24), idx);
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
  const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
  return _mm256_blendv_ps(_mm256_blendv_ps(a, b, bit3), _mm256_blendv_ps(c, d, bit3), bit4);
}
inline __m256 Table16(const float* t, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(_mm256_load_ps(t), idx);
  const __m256 b = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8), idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Code(y, table) for 8 values: two lookups in the 65536-entry table, by a gather.
inline __m256i Code8(__m256 y, const uint32_t* table) {
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i e = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), _mm256_srli_epi32(bits, 16), 4);
  const __m256i low = _mm256_and_si256(_mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31)), low16);
  const __m256i base = _mm256_and_si256(e, low16);
  // both below 2^16: the signed comparison is the unsigned one; true lanes are -1, so base - up adds 1
  return _mm256_sub_epi32(base, _mm256_cmpgt_epi32(low, _mm256_srli_epi32(e, 16)));
}

// Search16 on 8 lanes: the same arithmetic (the same fused multiply-add), the same lanes sent to Code8.
template <bool kSigned>
inline __m256i Search8(__m256 y, const SearchTable& t, __m256& near) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 a = kSigned ? _mm256_and_ps(y, abs_mask) : y;
  const __m256i e = _mm256_max_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 23), _mm256_set1_epi32(96));
  const __m256i d0 = _mm256_castps_si256(Table32(reinterpret_cast<const float*>(t.d0), e));
  const __m256 thr = Table32(t.thr, e);
  const __m256i d = _mm256_sub_epi32(d0, _mm256_castps_si256(_mm256_cmp_ps(a, thr, _CMP_GT_OQ)));
  const __m256 x = _mm256_fmadd_ps(a, Table16(t.s, d), Table16(t.b, d));
  __m256i k = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_floor_ps(x)),
                               _mm256_castps_si256(Table16(reinterpret_cast<const float*>(t.cap), d)));
  const __m256 r = _mm256_sub_ps(x, _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  near = _mm256_or_ps(near, _mm256_cmp_ps(_mm256_and_ps(r, abs_mask), _mm256_set1_ps(t.window), _CMP_NGE_UQ));
  const __m256i neg = _mm256_cmpgt_epi32(_mm256_setzero_si256(), _mm256_castps_si256(y));
  if (kSigned) {
    near = _mm256_or_ps(near, _mm256_cmp_ps(a, thr, _CMP_EQ_OQ));
    const __m256i last = _mm256_set1_epi32(254);
    k = _mm256_blendv_epi8(k, _mm256_sub_epi32(last, _mm256_min_epi32(k, last)), neg);
  } else {
    near = _mm256_or_ps(near, _mm256_castsi256_ps(neg));
  }
  return k;
}

// 8 codes (int32 lanes in [0, 256)) as 8 bytes.
inline void Store8(uint8_t* out, __m256i q) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}
#endif

// --- what the 8-bit storage does per vector, on each instruction set --------------------------------------------

// map[codes[k]] for the kN codes of a vector.
inline VecF LookupMap(const float* map, const uint8_t* codes) {
#if defined(__AVX512F__)
  return (VecF)Lookup256(map, _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
#elif defined(__AVX2__) && defined(__FMA__)
  return (VecF)Lookup256(map, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes))));
#else
  VecF r;
  for (int k = 0; k < Lane<VecF>::kN; ++k) r[k] = map[codes[k]];
  return r;
#endif
}

// One value's codes, as the scalar path finds them: y clipped to [-1, 1], a positive v never below code 1.
inline void CodesOne(float ym, float yv, uint8_t* cm, uint8_t* cv) {
  ym = Clip1(ym), yv = Clip1(yv);
  *cm = static_cast<uint8_t>(Code(ym, g_quant.code_s));
  const uint32_t qv = Code(yv, g_quant.code_u);
  *cv = static_cast<uint8_t>(yv > 0.0f ? std::max(qv, 1u) : qv);
}

#if defined(__AVX512F__)
// The codes of 16 scaled values ym, yv (as CodesOne), as int32 lanes. y = x * inv is not clipped to [-1, 1] here:
// |x| <= absmax, so |y| exceeds 1 by rounding only, and Search16 codes (1, 2) as it codes 1; the exact lookup
// gets the clipped values.
inline void Codes16(__m512 ym, __m512 yv, __m512i& qm, __m512i& qv) {
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
#endif

// The codes of a vector of scaled values, stored.
inline void CodesV(VecF ym, VecF yv, uint8_t* cm, uint8_t* cv) {
#if defined(__AVX512F__)
  __m512i qm, qv;
  Codes16((__m512)ym, (__m512)yv, qm, qv);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(cm), _mm512_cvtepi32_epi8(qm));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(cv), _mm512_cvtepi32_epi8(qv));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 y_m = (__m256)ym, y_v = (__m256)yv;
  __m256 near = _mm256_setzero_ps();
  __m256i qm = Search8<true>(y_m, g_quant.search_s, near);
  __m256i qv = Search8<false>(y_v, g_quant.search_u, near);
  if (_mm256_movemask_ps(near)) {  // as Codes16
    const __m256 one = _mm256_set1_ps(1.0f), neg_one = _mm256_set1_ps(-1.0f);
    qm = Code8(_mm256_min_ps(one, _mm256_max_ps(neg_one, y_m)), g_quant.code_s);
    qv = Code8(_mm256_min_ps(one, _mm256_max_ps(neg_one, y_v)), g_quant.code_u);
  }
  const __m256i pos = _mm256_castps_si256(_mm256_cmp_ps(y_v, _mm256_setzero_ps(), _CMP_GT_OQ));
  qv = _mm256_blendv_epi8(qv, _mm256_max_epu32(qv, _mm256_set1_epi32(1)), pos);
  Store8(cm, qm);
  Store8(cv, qv);
#else
  for (int k = 0; k < Lane<VecF>::kN; ++k) CodesOne(ym[k], yv[k], cm + k, cv + k);
#endif
}

struct LeafQ {
  const float* g;
  float* p;
  uint8_t* cm;
  float* am;
  uint8_t* cv;
  float* av;
  int64_t size;
};

// The storage of one block of 8-bit moments, for the step: the old moments dequantized (map[code] * absmax), the
// new ones kept in float32 (tm, tv: what the stages after the moments read) with their blocks' absolute maxima,
// then requantized by Requant once the block is done.
struct Q8Block {
  using T = float;
  static constexpr bool kExactNegates = false, kFiniteMoments = true, kScaledSquare = true, kMax = false;
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  static constexpr int kGroup = 4;  // Lookup256x64: 64 codes at once
#else
  static constexpr int kGroup = 1;
#endif
  static constexpr int kStages = 63 & ~kAmsgrad;
  const float* g;
  float* p;
  const uint8_t* cm;
  const uint8_t* cv;
  float am, av;
  float* tm;
  float* tv;
  // the blocks' maxima from 0, NaNs ignored (_quantize.quantize: a NaN stays in its own value)
  VecF vmx_m = {}, vmx_v = {};
  float mx_m = 0.0f, mx_v = 0.0f;

  Q8Block(const LeafQ& l, int64_t b, int64_t bs, float* tm_, float* tv_)
      : g(l.g + b * bs), p(l.p + b * bs), cm(l.cm + b * bs), cv(l.cv + b * bs), am(l.am[b]), av(l.av[b]),
        tm(tm_), tv(tv_) {}

  void Read(int64_t i, float& mo, float& vo) const {
    mo = g_quant.map_s[cm[i]] * am;  // _quantize.dequantize
    vo = g_quant.map_u[cv[i]] * av;
  }
  void Read(int64_t i, VecF& mo, VecF& vo) const {
    mo = LookupMap(g_quant.map_s, cm + i) * am;
    vo = LookupMap(g_quant.map_u, cv + i) * av;
  }
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  void ReadGroup(int64_t i, VecF* mo, VecF* vo) const {
    __m512 mq[4], vq[4];
    Lookup256x64(g_quant.planes_s, cm + i, mq);
    Lookup256x64(g_quant.planes_u, cv + i, vq);
    for (int r = 0; r < 4; ++r) mo[r] = (VecF)mq[r] * am, vo[r] = (VecF)vq[r] * av;
  }
#endif
  template <typename X>
  static void Keep(X x, float* out, X& mx) {
    jadam::Store(out, x);
    mx = jadam::Max(Abs(x), mx);
  }
  template <typename X>
  X WriteM(int64_t i, X x) {
    if constexpr (std::is_same_v<X, float>) {
      Keep(x, tm + i, mx_m);
    } else {
      Keep(x, tm + i, vmx_m);
    }
    return x;
  }
  template <typename X>
  X WriteV(int64_t i, X x) {
    if constexpr (std::is_same_v<X, float>) {
      Keep(x, tv + i, mx_v);
    } else {
      Keep(x, tv + i, vmx_v);
    }
    return x;
  }
  float MaxM() const { return std::max(jadam::MaxLane(vmx_m), mx_m); }
  float MaxV() const { return std::max(jadam::MaxLane(vmx_v), mx_v); }
};

// Requantizes a block from its new moments tm, tv and their maxima: _quantize.quantize's absmax capped at
// kScaleMax (an inf stays in its own value), x * (1 / max(absmax, 1e-38)), clipped to [-1, 1], coded.
struct Requant {
  float inv_m, inv_v;
  const float* tm;
  const float* tv;
  uint8_t* cm;
  uint8_t* cv;
  Requant(const LeafQ& l, int64_t b, int64_t bs, float m, float v, const float* tm_, const float* tv_) {
    m = std::min(m, kScaleMax), v = std::min(v, kScaleMax);
    l.am[b] = m;
    l.av[b] = v;
    inv_m = 1.0f / std::max(m, 1e-38f);
    inv_v = 1.0f / std::max(v, 1e-38f);
    tm = tm_, tv = tv_, cm = l.cm + b * bs, cv = l.cv + b * bs;
  }
  inline void Step(int64_t j) const {
    CodesV(jadam::Load<VecF>(tm + j) * inv_m, jadam::Load<VecF>(tv + j) * inv_v, cm + j, cv + j);
  }
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  inline void Step64(int64_t j) const {
    __m512i qm[4], qv[4];
    for (int r = 0; r < 4; ++r) {
      const __m512 ym = _mm512_mul_ps(_mm512_loadu_ps(tm + j + 16 * r), _mm512_set1_ps(inv_m));
      const __m512 yv = _mm512_mul_ps(_mm512_loadu_ps(tv + j + 16 * r), _mm512_set1_ps(inv_v));
      Codes16(ym, yv, qm[r], qv[r]);
    }
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
  void Run(int64_t n) const {
    constexpr int64_t kN = Lane<VecF>::kN;
    int64_t j = 0;
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    for (; j + 64 <= n; j += 64) Step64(j);
#endif
    for (; j + kN <= n; j += kN) Step(j);
    for (; j < n; ++j) CodesOne(tm[j] * inv_m, tv[j] * inv_v, cm + j, cv + j);
  }
};

struct TaskQ {
  int64_t leaf, lo, hi;  // blocks [lo, hi) of a leaf
};

struct JobQ;
using TaskFn = void (*)(const JobQ&, const TaskQ&, float*, float*);

struct JobQ {
  std::vector<LeafQ> leaves;
  std::vector<TaskQ> ranges;  // task c runs ranges[c]
  jadam::Tasks tasks;
  int64_t bs = 0;
  int bits = 0;
  bool skip = false;
  Hyper<float> h;
  TaskFn run = nullptr;

  JobQ(const float* s, int bits_, int64_t bs_);

  // One block: the step puts the new moments into tm, tv and updates the parameters in place; then requantized.
  template <typename A>
  void Block(const A& a, const LeafQ& l, int64_t b, float* tm, float* tv) const {
    Q8Block st(l, b, bs, tm, tv);
    const int64_t n = std::min(bs, l.size - b * bs);
    Steps(a, st, 0, n);
    Requant(l, b, bs, st.MaxM(), st.MaxV(), tm, tv).Run(n);
  }

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  // Whole blocks of a multiple of 64 values, software-pipelined: the requantization of block b (its code search)
  // interleaved with the update of block b + 1 (map permutes, sqrt, division), so that the two kinds of
  // work overlap; the same operations on the same values as Block. Blocks [lo, hi), all whole and a multiple of 64
  // long; tm, tv hold two blocks each.
  template <typename A>
  void Pipelined(const A& a, const LeafQ& l, int64_t lo, int64_t hi, float* tm, float* tv) const {
    Q8Block st(l, lo, bs, tm, tv);
    Steps(a, st, 0, bs);
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t cur = (b - lo) & 1;
      const Requant rq(l, b, bs, st.MaxM(), st.MaxV(), tm + cur * bs, tv + cur * bs);
      if (b + 1 < hi) {
        st = Q8Block(l, b + 1, bs, tm + (1 - cur) * bs, tv + (1 - cur) * bs);
        for (int64_t i = 0; i < bs; i += 64) {
          Steps(a, st, i, i + 64);
          rq.Step64(i);
        }
      } else {
        for (int64_t j = 0; j < bs; j += 64) rq.Step64(j);
      }
    }
  }
#endif

  template <int kBits>
  static void Task(const JobQ& job, const TaskQ& t, float* tm, float* tv) {
    const Adam<float, StaticStages<kBits>> a{job.h, {}};
    const LeafQ& l = job.leaves[t.leaf];
    const int64_t bs = job.bs;
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
    if (bs % 64 == 0) {
      const int64_t whole = std::min(t.hi, l.size / bs);  // blocks before a partial last one
      if (whole > t.lo) job.Pipelined(a, l, t.lo, whole, tm, tv);
      for (int64_t b = std::max(t.lo, whole); b < t.hi; ++b) job.Block(a, l, b, tm, tv);
      return;
    }
#endif
    for (int64_t b = t.lo; b < t.hi; ++b) job.Block(a, l, b, tm, tv);
  }

  void Run(const TaskQ& t, float* tm, float* tv) const {
    const LeafQ& l = leaves[t.leaf];
    if (skip) {  // a rejected step: codes and scales stay, the parameters get + 0
      const int64_t lo = t.lo * bs, hi = std::min(l.size, t.hi * bs);
      SkipRange<float>(l.p + lo, hi - lo);
    } else if (l.size == 1) {  // true divisions on a one-element leaf
      Block(Adam<float, RuntimeStages>{h, {bits}}, l, 0, tm, tv);
    } else {
      run(*this, t, tm, tv);
    }
  }

  void Work() {
    std::vector<float> tmp(4 * static_cast<size_t>(bs));  // the new m and v of two blocks (Pipelined)
    tasks.Drain([&](int64_t c) { Run(ranges[c], tmp.data(), tmp.data() + 2 * bs); });
  }
};

template <size_t... I>
TaskFn PickTask(int bits, std::index_sequence<I...>) {
  static constexpr TaskFn table[] = {&JobQ::Task<static_cast<int>(I) & Q8Block::kStages & ~kNegate>...};
  return table[bits & 63];
}

JobQ::JobQ(const float* s, int bits_, int64_t bs_)
    : bs(bs_), bits(bits_), skip(s[kApply] == 0.0f), h(s) {
  run = PickTask(bits, std::make_index_sequence<64>{});
}

// Call frame: scalars (float32), then per leaf g, p (float32), m codes (uint8), m absmax (float32), v codes
// (uint8), v absmax (float32); results p, m codes, m absmax, v codes, v absmax per leaf, aliased. Attribute
// `block_size`: block b of a leaf covers its flat elements [b * block_size, (b + 1) * block_size) (the last one
// possibly partial) and has the absmax of flat index b, whatever the absmax array's shape.
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
  const float* s = reinterpret_cast<const float*>(scalars->untyped_data());
  auto job = std::make_shared<JobQ>(s, StagesOf(mode, s), block_size);
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
// `is_signed` picks, by the same search as the step (a vector at a time where it can, then one by one), without
// the positive-v rule.
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
#elif defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(y + i);
    __m256 near = _mm256_setzero_ps();
    __m256i q = is_signed ? Search8<true>(v, g_quant.search_s, near) : Search8<false>(v, g_quant.search_u, near);
    if (_mm256_movemask_ps(near)) q = Code8(v, table);
    Store8(out + i, q);
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<uint8_t>(Code(y[i], table));
}
