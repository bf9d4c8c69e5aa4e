// The TopK SAE's k-sparse kernels for XLA's CPU backend, called through jax's FFI.
//
// XLA's CPU TopK sorts one row at a time (~8 us a row at n = 1024), and its scatter-adds write
// one element at a time; these do the same work at memory speed. Every kernel takes any number
// of leading batch dimensions (the seed axis under vmap) and gives the numbers of the jax
// reference in cpu_kernels.py: top-k exactly (lax.top_k's order, ties to the lower index), the
// sums to float rounding, in an order fixed by the inputs alone (not by the threads).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// fn(begin, end) over [0, total) in chunks, on the calling thread and XLA's intra-op pool.
// The caller takes chunks too and waits only for chunks another thread has started, so a pool
// too busy to run the helpers (two kernels at once on two threads) cannot deadlock it.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t grain, const F& fn) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>(4 * threads, std::max<int64_t>(1, total / grain));
  if (threads == 1 || chunks <= 1) {
    fn(0, total);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t running = 0;
  };
  auto shared = std::make_shared<Shared>();
  int64_t step = (total + chunks - 1) / chunks;
  // Returns once no chunk is left to take; `fn` is only called for a chunk taken, and every
  // chunk is finished before the caller returns, so a late helper never touches freed memory.
  auto work = [shared, chunks, step, total, &fn] {
    {
      std::lock_guard<std::mutex> lock(shared->mu);
      ++shared->running;
    }
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      fn(c * step, std::min(total, (c + 1) * step));
    }
    std::lock_guard<std::mutex> lock(shared->mu);
    if (--shared->running == 0) shared->cv.notify_all();
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->running == 0; });
}

// XLA's total order on float32 as a signed integer: -NaN < -inf < ... < -0 < +0 < ... < +inf
// < NaN, the comparator lax.top_k lowers to.
inline int32_t OrderKey(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// (key, index) packed so that a larger int64 is the better entry: a larger value, or the same
// value at a lower index (the low word falls as the index grows).
inline int64_t Rank(int32_t key, int32_t index) {
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<int64_t>(key)) << 32 |
                              static_cast<uint32_t>(~static_cast<uint32_t>(index)));
}

inline int32_t RankIndex(int64_t rank) {
  return static_cast<int32_t>(~static_cast<uint32_t>(rank & 0xffffffff));
}

// The k best of one row, in two passes. Element i belongs to group i % G; the k-th largest
// of the G group maxima is a bar at most the row's k-th largest value (k groups reach it), so
// only values at or above the bar can be among the k best, and they lie in the few groups
// whose maximum reaches it. The first pass is a vertical maximum over the row's G-wide slices
// (vectorised, no horizontal reductions); the second reads ~k groups and ranks what it finds.
void TopKRow(const float* x, int64_t n, int64_t k, float* vals, int32_t* idx,
             std::vector<int32_t>& group_max, std::vector<int32_t>& scratch,
             std::vector<int64_t>& cand) {
  int64_t groups = std::min(n, std::max(k, n / 16));
  group_max.resize(groups);
  int32_t* gm = group_max.data();
  for (int64_t g = 0; g < groups; ++g) gm[g] = OrderKey(x[g]);
  for (int64_t start = groups; start < n; start += groups) {
    const float* xs = x + start;
    int64_t width = std::min(groups, n - start);
    for (int64_t g = 0; g < width; ++g) gm[g] = std::max(gm[g], OrderKey(xs[g]));
  }
  scratch.assign(gm, gm + groups);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                   std::greater<int32_t>());
  int32_t bar = scratch[k - 1];
  cand.clear();
  for (int64_t g = 0; g < groups; ++g) {
    if (gm[g] < bar) continue;
    for (int64_t j = g; j < n; j += groups) {
      int32_t key = OrderKey(x[j]);
      if (key >= bar) cand.push_back(Rank(key, static_cast<int32_t>(j)));
    }
  }
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), std::greater<int64_t>());
  for (int64_t j = 0; j < k; ++j) {
    idx[j] = RankIndex(cand[j]);
    vals[j] = x[idx[j]];
  }
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k: a scalar has no rows");
  int64_t n = dims.back();
  int64_t k = vals->dimensions().back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("top_k: k must be in [1, n]");
  int64_t rows = n ? x.element_count() / n : 0;
  const float* in = x.typed_data();
  float* out_v = vals->typed_data();
  int32_t* out_i = idx->typed_data();
  ParallelFor(pool, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1)),
              [&](int64_t begin, int64_t end) {
                std::vector<int32_t> group_max, scratch;
                std::vector<int64_t> cand;
                for (int64_t r = begin; r < end; ++r) {
                  TopKRow(in + r * n, n, k, out_v + r * k, out_i + r * k, group_max, scratch,
                          cand);
                }
              });
  return ffi::Error::Success();
}

// The k-sparse row products, per problem l of the leading dimensions:
//   GatherSum:     out[b]    = sum_j coef[b, j] * table[idx[b, j]]       (the decode)
//   GatherDot:     out[b, j] = <rows[b], table[idx[b, j]]>               (its activations' grad)
//   ScatterRows:   out[i]    = sum_{idx[b, j] == i} coef[b, j] * rows[b]  (the weights' grads)
//                  sums[i]   = sum_{idx[b, j] == i} coef[b, j]            (the encoder bias's)
// A table with no leading dimensions is shared by every problem.

// Lane-wise partial sums, so the compiler vectorises the reduction it may not reorder.
inline float Dot(const float* a, const float* b, int64_t d) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[e + l] * b[e + l];
  }
  float s = 0.0f;
  for (; e < d; ++e) s += a[e] * b[e];
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

ffi::Error CheckIndices(ffi::Buffer<ffi::S32>& idx, int64_t n) {
  const int32_t* p = idx.typed_data();
  for (size_t e = 0; e < idx.element_count(); ++e) {
    if (p[e] < 0 || p[e] >= n) return ffi::Error::InvalidArgument("index out of range");
  }
  return ffi::Error::Success();
}

// The rows a gather reads, table[idx[r, j]] for token row r (over all problems), and the sizes
// both gathers need; a table with no leading dimensions is every problem's.
struct Gathered {
  Gathered(ffi::Buffer<ffi::S32>& idx, ffi::Buffer<ffi::F32>& table) {
    auto td = table.dimensions(), id = idx.dimensions();
    n = td[td.size() - 2], d = td.back(), k = id.back(), batch = id[id.size() - 2];
    rows = idx.element_count() / std::max<int64_t>(k, 1);
    shared = static_cast<int64_t>(table.element_count()) == n * d;
    ix = idx.typed_data(), t = table.typed_data();
  }
  const float* Row(int64_t r, int64_t j) const {
    return t + (shared ? 0 : (r / batch) * n * d) + static_cast<int64_t>(ix[r * k + j]) * d;
  }
  int64_t Grain() const { return std::max<int64_t>(1, 8192 / std::max<int64_t>(k * d, 1)); }

  int64_t n, d, k, batch, rows;
  bool shared;
  const int32_t* ix;
  const float* t;
};

ffi::Error GatherSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coef,
                         ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> table,
                         ffi::ResultBuffer<ffi::F32> out) {
  Gathered g(idx, table);
  if (auto err = CheckIndices(idx, g.n); err.failure()) return err;
  const float* c = coef.typed_data();
  float* o = out->typed_data();
  ParallelFor(pool, g.rows, g.Grain(), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* acc = o + r * g.d;
      std::fill(acc, acc + g.d, 0.0f);
      for (int64_t j = 0; j < g.k; ++j) {
        float a = c[r * g.k + j];
        const float* row = g.Row(r, j);
        for (int64_t e = 0; e < g.d; ++e) acc[e] += a * row[e];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> rows,
                         ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> table,
                         ffi::ResultBuffer<ffi::F32> out) {
  Gathered g(idx, table);
  if (auto err = CheckIndices(idx, g.n); err.failure()) return err;
  const float* x = rows.typed_data();
  float* o = out->typed_data();
  ParallelFor(pool, g.rows, g.Grain(), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < g.k; ++j) o[r * g.k + j] = Dot(x + r * g.d, g.Row(r, j), g.d);
    }
  });
  return ffi::Error::Success();
}

// Entries are bucketed by latent first (a counting sort, in (b, j) order within a latent), so
// each output row is summed in one place and written once, and threads split the latents.
ffi::Error ScatterRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coef,
                           ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> rows,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> sums) {
  auto od = out->dimensions();
  int64_t n = od[od.size() - 2], d = od.back(), k = idx.dimensions().back();
  int64_t batch = idx.dimensions()[idx.dimensions().size() - 2];
  int64_t problems = idx.element_count() / std::max<int64_t>(batch * k, 1);
  if (auto err = CheckIndices(idx, n); err.failure()) return err;
  const float* c = coef.typed_data();
  const int32_t* ix = idx.typed_data();
  const float* x = rows.typed_data();
  float* o = out->typed_data();
  float* s = sums->typed_data();
  std::vector<int32_t> start(n + 1), order(batch * k);
  for (int64_t p = 0; p < problems; ++p) {
    const int32_t* pi = ix + p * batch * k;
    std::fill(start.begin(), start.end(), 0);
    for (int64_t e = 0; e < batch * k; ++e) ++start[pi[e] + 1];
    for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
    std::vector<int32_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < batch * k; ++e) order[fill[pi[e]]++] = static_cast<int32_t>(e);
    const float* pc = c + p * batch * k;
    const float* px = x + p * batch * d;
    float* po = o + p * n * d;
    float* ps = s + p * n;
    ParallelFor(pool, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)),
                [&](int64_t begin, int64_t end) {
                  for (int64_t i = begin; i < end; ++i) {
                    float* acc = po + i * d;
                    std::fill(acc, acc + d, 0.0f);
                    float total = 0.0f;
                    for (int32_t q = start[i]; q < start[i + 1]; ++q) {
                      int32_t e = order[q];
                      float a = pc[e];
                      total += a;
                      const float* row = px + static_cast<int64_t>(e / k) * d;
                      for (int64_t f = 0; f < d; ++f) acc[f] += a * row[f];
                    }
                    ps[i] = total;
                  }
                });
  }
  return ffi::Error::Success();
}

// The two gathers' signature: (coef or rows [..., B, k or d], idx [..., B, k], table) -> out.
auto GatherBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeGatherSum, GatherSumImpl, GatherBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeGatherDot, GatherDotImpl, GatherBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeScatterRows, ScatterRowsImpl,
                              GatherBinding().Ret<ffi::Buffer<ffi::F32>>());

// Not an XLA kernel: the store's reader calls it through ctypes (jaxsae.store, which releases
// the GIL for it) to gather a batch's rows from several shards in one copy, in batch order:
// out row i is row_bytes bytes at bases[shard[i]] + row[i] * stride. numpy needs two copies
// for the same (a take per shard, then a scatter into batch order).
extern "C" void JaxsaeGatherRows(const char* const* bases, const int64_t* shard,
                                 const int64_t* row, int64_t n, int64_t row_bytes,
                                 int64_t stride, char* out) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(out + i * row_bytes, bases[shard[i]] + row[i] * stride, row_bytes);
  }
}
