// Paged attention on the CPU that reads K/V where they lie in the block pool: no gathered copy.
//
// One task per (sequence, KV head). The G = Hq / Hkv query heads that share a KV head are handled
// together, so every key and value row is loaded once for all of them (GQA packing, as in
// kvlab/kernels/decode_attention_v2.py). Each query row of a sequence sits at cache index
// context_len - q_len + i and sees the indices max(0, p - W + 1) .. p (W = sliding_window, or all).
// Two passes per query row: scores over the visible keys (into a per-thread buffer), then
// softmax and the weighted sum of the value rows. Arithmetic in float for float/bfloat16/half
// caches, in double for double: the same rule as the PyTorch reference it is tested against
// (kvlab/attention/paged_torch.py; tests/test_attention_cpu_kernel.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// One element widened to the arithmetic type. bfloat16 is the top half of a float32, so the
// conversion is a shift, which the compiler vectorizes (c10's operator float is not always).
template <typename acc_t, typename scalar_t>
inline acc_t widen(scalar_t x) { return static_cast<acc_t>(x); }
template <>
inline float widen<float, c10::BFloat16>(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A row of the cache in the arithmetic type: the row itself when it already is, else widened once
// into buf (each K and V row serves the G query rows of its head).
template <typename scalar_t, typename acc_t>
inline const acc_t* widened(const scalar_t* x, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = widen<acc_t>(x[j]);
    return buf;
  }
}

// kD > 0: the head size known at compile time (fully unrolled); 0: read from D.
template <int kD, typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* q, const scalar_t* k, int64_t D) {
  const int64_t n = kD > 0 ? kD : D;
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += q[d] * widen<acc_t>(k[d]);
  return s;
}

template <int kD, typename scalar_t, typename acc_t>
inline void axpy(acc_t* out, acc_t p, const scalar_t* v, int64_t D) {
  const int64_t n = kD > 0 ? kD : D;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] += p * widen<acc_t>(v[d]);
}

// Ask for the rows of token t + kAhead while token t is computed: a sequence's blocks lie anywhere in
// the pool, so the hardware prefetchers do not find the next block; one token's rows at a time
// keeps the number of lines in flight small.
constexpr int64_t kAhead = 8;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* pool, const int32_t* table, int64_t t, int64_t last, int64_t BS,
                         int64_t row, int64_t h0, int64_t width) {
  t += kAhead;
  if (t > last) return;
  const char* base = reinterpret_cast<const char*>(pool + ((static_cast<int64_t>(table[t / BS]) * BS + t % BS) * row + h0));
  for (int64_t c = 0; c < width * static_cast<int64_t>(sizeof(scalar_t)); c += 64) __builtin_prefetch(base + c);
}

template <int kD, typename scalar_t>
void attend(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& query_start_loc,
            const torch::Tensor& context_lens, double scale, int64_t window, torch::Tensor& out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t S = context_lens.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  const int64_t M = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int64_t row = Hkv * D;          // stride between two tokens of a block
  const int64_t NB = k_cache.size(0);
  for (int64_t s = 0; s < S; ++s) {     // every block a query reads must exist: checked before reading
    const int64_t q_len = qsl[s + 1] - qsl[s], L = ctx[s];
    TORCH_CHECK(q_len >= 0 && q_len <= L && qsl[s + 1] <= q.size(0),
                "sequence ", s, ": ", q_len, " query rows for a context of ", L);
    TORCH_CHECK(L <= M * BS, "sequence ", s, ": context_len ", L, " exceeds its block table (", M, " x ", BS, ")");
    for (int64_t b = 0; b < (L + BS - 1) / BS; ++b)
      TORCH_CHECK(tables[s * M + b] >= 0 && tables[s * M + b] < NB, "sequence ", s, ": block table entry ", b,
                  " is ", tables[s * M + b], ", outside the pool of ", NB, " blocks");
  }
  const acc_t sc = static_cast<acc_t>(scale);

  // A task is one sequence and HT of its KV heads (R = HT * G query rows). With many sequences a
  // task takes all heads, so it streams through each block's rows [BS, Hkv, D] in order; with few,
  // one head, so that the threads have tasks to share.
  const int64_t HT = S >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t R = HT * G;
  // Tasks are handed out one at a time, longest context first (contexts in a batch differ by 10x and
  // more: a static split would leave one thread with most of the work).
  const int64_t num_tasks = S * (Hkv / HT);
  std::vector<int64_t> order(num_tasks);
  for (int64_t j = 0; j < num_tasks; ++j) order[j] = j;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t sa = a / (Hkv / HT), sb = b / (Hkv / HT);
    return (qsl[sa + 1] - qsl[sa]) * ctx[sa] > (qsl[sb + 1] - qsl[sb]) * ctx[sb];
  });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scores, qrows(R * D), acc(R * D), mx(R), total(R), krow(HT * D), vrow(HT * D);
    for (int64_t j = next++; j < num_tasks; j = next++) {
      const int64_t task = order[j];
      const int64_t s = task / (Hkv / HT), h0 = task % (Hkv / HT) * HT;
      const int64_t q0 = qsl[s], q_len = qsl[s + 1] - q0, L = ctx[s];
      const int32_t* table = tables + s * M;
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t p = L - q_len + i;                       // this query's cache index
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        const int64_t n = p + 1 - lo;
        if (static_cast<int64_t>(scores.size()) < R * n) scores.resize(R * n);
        // query rows r = 0 .. R - 1 are query heads h0 * G + r (pre-scaled); row r reads KV head h0 + r / G
        const scalar_t* src = qp + ((q0 + i) * Hq + h0 * G) * D;
        for (int64_t j = 0; j < R * D; ++j) qrows[j] = widen<acc_t>(src[j]) * sc;
        // pass 1: scores; each key row is read once for the G rows of its head
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc_t>::infinity());
        for (int64_t t = lo; t <= p; ++t) {
          prefetch_row(kp, table, t, p, BS, row, h0 * D, HT * D);
          const scalar_t* k = kp + (static_cast<int64_t>(table[t / BS]) * BS + t % BS) * row + h0 * D;
          const acc_t* kw = widened(k, krow.data(), HT * D);
          for (int64_t r = 0; r < R; ++r) {
            const acc_t x = dot<kD, acc_t, acc_t>(qrows.data() + r * D, kw + (r / G) * D, D);
            scores[r * n + t - lo] = x;
            mx[r] = std::max(mx[r], x);
          }
        }
        for (int64_t r = 0; r < R; ++r) {                      // softmax numerators and sums
          acc_t sum = 0;
          acc_t* sr = scores.data() + r * n;
          const acc_t m = mx[r];
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            sr[j] = std::exp(sr[j] - m);
            sum += sr[j];
          }
          total[r] = sum;
        }
        // pass 2: the weighted sum of value rows; each value row is widened once for all its rows
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t t = lo; t <= p; ++t) {
          prefetch_row(vp, table, t, p, BS, row, h0 * D, HT * D);
          const scalar_t* v = vp + (static_cast<int64_t>(table[t / BS]) * BS + t % BS) * row + h0 * D;
          const acc_t* vw = widened(v, vrow.data(), HT * D);
          for (int64_t r = 0; r < R; ++r)
            axpy<kD, acc_t, acc_t>(acc.data() + r * D, scores[r * n + t - lo], vw + (r / G) * D, D);
        }
        scalar_t* dst = op + ((q0 + i) * Hq + h0 * G) * D;
        for (int64_t r = 0; r < R; ++r) {
          const acc_t inv = acc_t(1) / total[r];
          for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<scalar_t>(acc[r * D + d] * inv);
        }
      }
    }
  });
}

}  // namespace

// q [N, Hq, D] packed queries; k_cache, v_cache [NB, BS, Hkv, D] in q's dtype; block_tables
// [S, M] int32; query_start_loc [S + 1] int32; context_lens [S] int32; window 0 = none.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start_loc,
                              torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q must be [N, Hq, D] and the caches [NB, BS, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share one dtype");
  TORCH_CHECK(query_start_loc.numel() == context_lens.numel() + 1 && block_tables.size(0) == context_lens.numel(),
              "one block table row and one context length per sequence, and S + 1 query starts");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "head_dim must match and Hq must be a multiple of Hkv");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && query_start_loc.scalar_type() == torch::kInt32 &&
              context_lens.scalar_type() == torch::kInt32, "block tables and lengths must be int32");
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the block pools must be contiguous");
  block_tables = block_tables.contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const auto qsl = query_start_loc.contiguous();
    const auto lens = context_lens.contiguous();
    if (q.size(2) == 64) attend<64, scalar_t>(q, k_cache, v_cache, block_tables, qsl, lens, scale, window, out);
    else if (q.size(2) == 128) attend<128, scalar_t>(q, k_cache, v_cache, block_tables, qsl, lens, scale, window, out);
    else attend<0, scalar_t>(q, k_cache, v_cache, block_tables, qsl, lens, scale, window, out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over the block pool, in place (CPU)");
}
