// The kernels' vectors: GCC/Clang vector extensions as wide as the variant's registers (AVX-512: 64 bytes,
// AVX/AVX2: 32, otherwise 16, which SSE2 and NEON hold), and helpers that take a scalar or a vector alike, so that
// an element-wise formula is written once and runs on a whole vector in the loops and on one value in their tails.
//
// Every operation here is exactly rounded as IEEE asks (+, -, *, /, sqrt; no contraction under -ffp-contract=off),
// so that a lane of a vector gives the bits its scalar gives, on every variant.

#ifndef JADAM_KERNELS_SIMD_H_
#define JADAM_KERNELS_SIMD_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace jadam {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

typedef float VecF __attribute__((vector_size(kVecBytes)));
typedef double VecD __attribute__((vector_size(kVecBytes)));
typedef int32_t VecI32 __attribute__((vector_size(kVecBytes)));
typedef uint32_t VecU32 __attribute__((vector_size(kVecBytes)));
typedef int64_t VecI64 __attribute__((vector_size(kVecBytes)));
typedef uint64_t VecU64 __attribute__((vector_size(kVecBytes)));
typedef uint16_t VecU16 __attribute__((vector_size(kVecBytes / 2)));  // as many lanes as VecF
typedef uint8_t VecU8 __attribute__((vector_size(kVecBytes / 4)));

// What a lane type X (a scalar or a vector) is made of: its element, its integer views, its lane count.
template <typename X>
struct Lane;
template <>
struct Lane<float> {
  using Elem = float;
  using Int = int32_t;
  using UInt = uint32_t;
  static constexpr int kN = 1;
  static constexpr Int kExpMask = 0x7F800000;
};
template <>
struct Lane<double> {
  using Elem = double;
  using Int = int64_t;
  using UInt = uint64_t;
  static constexpr int kN = 1;
  static constexpr Int kExpMask = 0x7FF0000000000000LL;
};
template <>
struct Lane<VecF> {
  using Elem = float;
  using Int = VecI32;
  using UInt = VecU32;
  static constexpr int kN = kVecBytes / 4;
  static constexpr int32_t kExpMask = 0x7F800000;
};
template <>
struct Lane<VecD> {
  using Elem = double;
  using Int = VecI64;
  using UInt = VecU64;
  static constexpr int kN = kVecBytes / 8;
  static constexpr int64_t kExpMask = 0x7FF0000000000000LL;
};

// The vector of a scalar type.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VecF;
};
template <>
struct VecOf<double> {
  using type = VecD;
};

template <typename To, typename From>
inline To BitCast(From x) {
  static_assert(sizeof(To) == sizeof(From), "BitCast between different sizes");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// Unaligned loads and stores of a whole lane type from/to memory of its elements.
template <typename X, typename E>
inline X Load(const E* p) {
  X x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <typename X, typename E>
inline void Store(E* p, X x) {
  std::memcpy(p, &x, sizeof x);
}

// c ? a : b, lane by lane: a plain conditional on scalars, the vector extensions' on vectors (c a lane mask).
template <typename C, typename X>
inline X Select(C c, X a, X b) {
  return c ? a : b;
}

template <typename X>
inline auto IsNan(X x) {
  return x != x;
}

template <typename X>
inline auto IsFinite(X x) {
  using L = Lane<X>;
  const typename L::Int bits = BitCast<typename L::Int>(x);
  return (bits & L::kExpMask) != L::kExpMask;
}

template <typename X>
inline X Abs(X x) {
  using L = Lane<X>;
  using E = typename Lane<typename L::Elem>::Int;
  return BitCast<X>(BitCast<typename L::Int>(x) & std::numeric_limits<E>::max());  // the sign bit cleared
}

// Whether any lane of a comparison's mask is set (a scalar: the condition itself).
inline bool Any(bool c) { return c; }
inline bool Any(VecI32 m) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif defined(__AVX__)
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#elif defined(__SSE2__)
  return _mm_movemask_epi8((__m128i)m) != 0;
#else
  int32_t any = 0;
  for (int k = 0; k < Lane<VecF>::kN; ++k) any |= m[k];
  return any != 0;
#endif
}
inline bool Any(VecI64 m) { return Any((VecI32)m); }

// The lanes' indices 0, 1, ..., N - 1 as uint32.
inline VecU32 Iota() {
  VecU32 r;
  for (int k = 0; k < Lane<VecF>::kN; ++k) r[k] = static_cast<uint32_t>(k);
  return r;
}

inline float Sqrt(float x) { return std::sqrt(x); }
inline double Sqrt(double x) { return std::sqrt(x); }

inline VecF Sqrt(VecF x) {
#if defined(__AVX512F__)
  return (VecF)(_mm512_sqrt_ps((__m512)(x)));
#elif defined(__AVX__)
  return (VecF)(_mm256_sqrt_ps((__m256)(x)));
#elif defined(__SSE2__)
  return (VecF)(_mm_sqrt_ps((__m128)(x)));
#else
  for (int k = 0; k < Lane<VecF>::kN; ++k) x[k] = std::sqrt(x[k]);
  return x;
#endif
}

inline VecD Sqrt(VecD x) {
#if defined(__AVX512F__)
  return (VecD)(_mm512_sqrt_pd((__m512d)(x)));
#elif defined(__AVX__)
  return (VecD)(_mm256_sqrt_pd((__m256d)(x)));
#elif defined(__SSE2__)
  return (VecD)(_mm_sqrt_pd((__m128d)(x)));
#else
  for (int k = 0; k < Lane<VecD>::kN; ++k) x[k] = std::sqrt(x[k]);
  return x;
#endif
}

// a > b ? a : b, lane by lane (the x86 max instruction's own rule: b where either is NaN).
inline float Max(float a, float b) { return a > b ? a : b; }
inline VecF Max(VecF a, VecF b) {
#if defined(__AVX512F__)
  return (VecF)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
  return (VecF)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (VecF)_mm_max_ps((__m128)a, (__m128)b);
#else
  return Select(a > b, a, b);
#endif
}

// The largest lane (the lanes are never NaN where this is used).
inline float MaxLane(VecF x) {
  float m = x[0];
  for (int k = 1; k < Lane<VecF>::kN; ++k) m = x[k] > m ? x[k] : m;
  return m;
}

}  // namespace jadam

#endif  // JADAM_KERNELS_SIMD_H_
