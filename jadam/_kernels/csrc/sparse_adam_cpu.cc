// jadam's fused SparseAdam step on CPU: one table's lazy Adam step, in place, O(k d).
//
// The XLA path (jadam/_sparse.py) sorts the k row ids, sums the duplicates with
// a scatter, gathers the touched rows of m, v and the table, and scatters three
// results back: a dozen passes over (k, d) blocks and as many small loops. Here
// one call does it all: the ids are numbered by row with a small hash table,
// the values summed per row in one sequential pass, then each touched row of
// the table, m and v is read and written once, its next rows prefetched.
//
// The arithmetic is the generic path's, operation for operation and rounded
// as it rounds each operation (built with -ffp-contract=off: no fused
// multiply-adds), so that it gives the bits of `tx.update` + `apply_updates`
// run op by op:
//   - duplicates summed in position order, starting from zero (XLA's scatter-add
//     into zeros), the sign of `maximize` applied to each value first;
//   - m + (g - m)(1 - b1) and v + (g g - v)(1 - b2) (scale_by_sparse_moments);
//   - u = m / (sqrt(v + eps_root) + eps) * scale, the scale being
//     bias_correct(into_step=True)'s sqrt(1 - b2^t) / (1 - b1^t), then u * -lr
//     added to the row.
// A jitted generic step differs from this by an ulp here and there: XLA:CPU's
// LLVM backend contracts some of those a * b + c into fused multiply-adds,
// which ones depending on the shapes (with d = 16, every column but the first).
//
// Call frame: scalars (kNumSparseScalars, the table's dtype), ids (k,) int32,
// data (k, ...), table p (V, ...), m, v; results p, m, v, aliased by the caller
// to the donated inputs (copied from them only where XLA did not alias). Ids
// outside [0, V) are padding: neither read nor written. Attribute `unique`:
// the ids are known unique (no summation, values taken as they are).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum SparseScalar { kOneMinusB1, kOneMinusB2, kScale, kEpsRoot, kEps, kNegLr, kSign, kApply, kNumSparseScalars };

// The distinct rows of a step, numbered in order of first appearance: rows[u] is row u's index in the table,
// slot[pos] the number of the row at position pos (-1 for padding), first[u] its first position.
struct Groups {
  std::vector<int32_t> keys, number, rows, slot, first;

  // Groups the valid ids (in [0, rows)) by value with an open-addressing hash table; returns the number of rows.
  int64_t Build(const int32_t* ids, int64_t k, int64_t num_rows) {
    int shift = 32;
    int64_t cap = 1;
    while (cap < 2 * k) cap <<= 1, --shift;
    if (cap < 16) cap = 16, shift = 28;
    keys.assign(cap, -1);
    number.resize(cap);
    rows.resize(k);
    slot.resize(k);
    first.resize(k);
    const uint32_t mask = static_cast<uint32_t>(cap - 1);
    int32_t n = 0;
    for (int64_t pos = 0; pos < k; ++pos) {
      const int32_t r = ids[pos];
      if (r < 0 || r >= num_rows) {
        slot[pos] = -1;
        continue;
      }
      uint32_t h = (static_cast<uint32_t>(r) * 0x9E3779B1u) >> shift;
      while (keys[h] != -1 && keys[h] != r) h = (h + 1) & mask;
      if (keys[h] == -1) {
        keys[h] = r;
        number[h] = n;
        rows[n] = r;
        first[n] = static_cast<int32_t>(pos);
        ++n;
      }
      slot[pos] = number[h];
    }
    return n;
  }
};

inline void Prefetch(const void* row, int64_t bytes) {
  const char* c = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 1, 1);
}

// One row's Adam step from its gradient g (d values).
template <typename T>
inline void RowStep(const T* __restrict g, T* __restrict p, T* __restrict m, T* __restrict v, int64_t d,
                    const T* s) {
  const T omb1 = s[kOneMinusB1], omb2 = s[kOneMinusB2], scale = s[kScale];
  const T eps_root = s[kEpsRoot], eps = s[kEps], neg_lr = s[kNegLr];
  for (int64_t j = 0; j < d; ++j) {
    const T gj = g[j], mo = m[j], vo = v[j];
    const T mn = mo + (gj - mo) * omb1;  // scale_by_sparse_moments
    const T vn = vo + (gj * gj - vo) * omb2;
    const T u = (mn / (std::sqrt(vn + eps_root) + eps)) * scale;  // normalize, with bias_correct's step scale
    m[j] = mn;
    v[j] = vn;
    p[j] = p[j] + u * neg_lr;  // scale_by_lr, apply_updates
  }
}

template <ffi::DataType kDtype>
ffi::Error SparseAdamImpl(ffi::Buffer<kDtype> scalars, ffi::Buffer<ffi::DataType::S32> ids, ffi::Buffer<kDtype> data,
                          ffi::Buffer<kDtype> p_in, ffi::Buffer<kDtype> m_in, ffi::Buffer<kDtype> v_in,
                          ffi::ResultBuffer<kDtype> p_out, ffi::ResultBuffer<kDtype> m_out,
                          ffi::ResultBuffer<kDtype> v_out, int32_t unique) {
  using T = ffi::NativeType<kDtype>;
  if (scalars.element_count() != kNumSparseScalars) {
    return ffi::Error::InvalidArgument("jadam_sparse_adam: bad scalar buffer");
  }
  const auto dims = p_in.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("jadam_sparse_adam: the table needs a row dimension");
  const int64_t rows = dims[0];
  const int64_t size = static_cast<int64_t>(p_in.element_count());
  const int64_t d = rows ? size / rows : 0;
  const int64_t k = static_cast<int64_t>(ids.element_count());
  if (static_cast<int64_t>(m_in.element_count()) != size || static_cast<int64_t>(v_in.element_count()) != size ||
      static_cast<int64_t>(p_out->element_count()) != size || static_cast<int64_t>(m_out->element_count()) != size ||
      static_cast<int64_t>(v_out->element_count()) != size ||
      static_cast<int64_t>(data.element_count()) != k * d) {
    return ffi::Error::InvalidArgument("jadam_sparse_adam: the table, its moments and the values differ in shape");
  }
  T* p = p_out->typed_data();
  T* m = m_out->typed_data();
  T* v = v_out->typed_data();
  // XLA honours the aliases of donated inputs; should it not, start from the inputs (an O(V d) copy).
  if (p != p_in.typed_data()) std::memcpy(p, p_in.typed_data(), size * sizeof(T));
  if (m != m_in.typed_data()) std::memcpy(m, m_in.typed_data(), size * sizeof(T));
  if (v != v_in.typed_data()) std::memcpy(v, v_in.typed_data(), size * sizeof(T));
  if (k == 0 || size == 0) return ffi::Error::Success();
  const T* s = scalars.typed_data();
  const int32_t* id = ids.typed_data();
  const T* x = data.typed_data();
  if (s[kApply] == T(0)) {
    // A rejected step (optax.apply_if_finite): the state stays; the generic path adds its zeroed update, whose
    // ids are all 0, to row 0.
    for (int64_t j = 0; j < d; ++j) p[j] = p[j] + T(0);
    return ffi::Error::Success();
  }
  const T sign = s[kSign];
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  constexpr int64_t kAhead = 6;  // rows prefetched ahead: enough to cover DRAM latency for 256-byte rows

  if (unique) {  // ids flagged unique (jadam.value_and_sparse_grad's): each valid position is its own row
    thread_local std::vector<T> g;
    g.resize(d);
    thread_local std::vector<int32_t> valid;
    valid.clear();
    for (int64_t pos = 0; pos < k; ++pos) {
      if (id[pos] >= 0 && id[pos] < rows) valid.push_back(static_cast<int32_t>(pos));
    }
    const int64_t n = static_cast<int64_t>(valid.size());
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        const int64_t r = id[valid[i + kAhead]];
        Prefetch(p + r * d, row_bytes), Prefetch(m + r * d, row_bytes), Prefetch(v + r * d, row_bytes);
      }
      const int64_t pos = valid[i], r = id[pos];
      const T* xr = x + pos * d;
      for (int64_t j = 0; j < d; ++j) g[j] = sign * xr[j];  // flip_sign; no summation
      RowStep<T>(g.data(), p + r * d, m + r * d, v + r * d, d, s);
    }
    return ffi::Error::Success();
  }

  // Coalesce: each row's values summed in position order from zero (XLA's scatter-add into zeros), in one
  // sequential pass over the values into a (rows, d) block.
  thread_local Groups groups;
  thread_local std::vector<T> sums;
  const int64_t n = groups.Build(id, k, rows);
  sums.resize(n * d);
  const int32_t* slot = groups.slot.data();
  const int32_t* first = groups.first.data();
  T* sum = sums.data();
  for (int64_t pos = 0; pos < k; ++pos) {
    const int32_t u = slot[pos];
    if (u < 0) continue;
    const T* xr = x + pos * d;
    T* acc = sum + static_cast<int64_t>(u) * d;
    if (first[u] == pos) {
      for (int64_t j = 0; j < d; ++j) acc[j] = T(0) + sign * xr[j];
    } else {
      for (int64_t j = 0; j < d; ++j) acc[j] = acc[j] + sign * xr[j];
    }
  }
  const int32_t* row_of = groups.rows.data();
  for (int64_t u = 0; u < n; ++u) {
    if (u + kAhead < n) {
      const int64_t r = row_of[u + kAhead];
      Prefetch(p + r * d, row_bytes), Prefetch(m + r * d, row_bytes), Prefetch(v + r * d, row_bytes);
    }
    const int64_t r = row_of[u];
    RowStep<T>(sum + u * d, p + r * d, m + r * d, v + r * d, d, s);
  }
  if (sums.capacity() * sizeof(T) > (size_t{64} << 20)) std::vector<T>().swap(sums);  // keep no huge block
  return ffi::Error::Success();
}

}  // namespace

#define JADAM_SPARSE_BIND(kDtype)                  \
  ffi::Ffi::Bind()                                 \
      .Arg<ffi::Buffer<kDtype>>()                  \
      .Arg<ffi::Buffer<ffi::DataType::S32>>()      \
      .Arg<ffi::Buffer<kDtype>>()                  \
      .Arg<ffi::Buffer<kDtype>>()                  \
      .Arg<ffi::Buffer<kDtype>>()                  \
      .Arg<ffi::Buffer<kDtype>>()                  \
      .Ret<ffi::Buffer<kDtype>>()                  \
      .Ret<ffi::Buffer<kDtype>>()                  \
      .Ret<ffi::Buffer<kDtype>>()                  \
      .Attr<int32_t>("unique")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamSparseAdamF32, SparseAdamImpl<ffi::DataType::F32>,
                              JADAM_SPARSE_BIND(ffi::DataType::F32));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JadamSparseAdamF64, SparseAdamImpl<ffi::DataType::F64>,
                              JADAM_SPARSE_BIND(ffi::DataType::F64));
