// Co-occurrence lookups of DynaMo's top-k grid on CPU: the value bits of
// every M-gram of the grid, for orders 2..M, read from the trie of cuckoo
// hash tables of dynamo_jax/cooc/hashtrie.py (layout documented there).
//
// Why: XLA:CPU runs the jnp walk (cooc/lookup.py) as a gather loop per level
// and a gather of the parents that have children (with a cumsum and a
// switch between buffer sizes) before the last level. Here one depth-first
// walk, split between XLA's CPU threads by (batch row, first token), probes
// each parent's K children in turn, and a prefix without children writes its
// subtree's zeros without probing. (Software prefetching of the next
// parents' probes was tried: no measurable change, so it is not here.)
//
// Inputs: ids int32 [B, M, K] (head i's top-k ids in row i), root_off and
// root_mask int32 [V], then the levels order_2 .. order_M, int32 [S_m, C_m]
// (C_m = 4 below the last level, 2 at it). Outputs: for m = 2..M, int32
// [B, K^m], the stored value bits of (ids[b, 0, j_1], .., ids[b, m-1, j_m])
// at flat index j_1 K^(m-1) + .. + j_m, 0 where the m-gram is absent or an id
// is outside [0, V). The bits equal the jnp walk's (tests/test_cpu_cooc.py).

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr uint32_t kSeedA = 0x9E3779B9u;
constexpr uint32_t kSeedB = 0x7F4A7C15u;
constexpr int kMaxOrder = 8;

inline uint32_t mix32(uint32_t x) {  // MurmurHash3's finaliser (hashtrie.py)
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

struct Level {
  const int32_t* rows;
  int64_t slots;
  int64_t cols;
};

// One batch row's walk below one first token (a unit of work).
struct Walk {
  int M;
  int64_t K;
  const Level* level;         // level[m], m = 2..M
  int32_t* out[kMaxOrder + 1];  // out[m]: this batch row's [K^m]
  // Per head i and candidate j of this row (index i * K + j): hashes and the
  // query token (-2, which no slot holds, for an id outside [0, V)).
  const uint32_t* ha;
  const uint32_t* hb;
  const int32_t* query;
  bool corrupt = false;  // a sub-table reaching past its level

  // The slot of head i's candidate j among the children (off, mask), or the
  // sentinel 0. Every slot lies in [off, off + mask] inside the level.
  inline int64_t find(const Level& lv, int64_t off, uint32_t mask, int i,
                      int64_t j) const {
    const int64_t c = i * K + j;
    const uint32_t a = ha[c] & mask;
    const uint32_t b = a ^ (((hb[c] & mask) | 1u) & mask);
    const int64_t sa = off + a, sb = off + b;
    const int32_t q = query[c];
    if (lv.rows[sa * lv.cols] == q) return sa;
    if (lv.rows[sb * lv.cols] == q) return sb;
    return 0;
  }

  // Zeros for the whole subtree of prefix `index` at level m (and below).
  void zeros(int m, int64_t index) {
    int64_t first = index * K, count = K;
    for (int l = m; l <= M; ++l, first *= K, count *= K)
      std::memset(out[l] + first, 0, count * sizeof(int32_t));
  }

  // Level m's K children of the (m-1)-gram prefix `index` whose sub-table
  // is (off, mask); recurses into each child's own children.
  void visit(int m, int64_t off, uint32_t mask, int64_t index) {
    if (off == 0) {  // no children: every longer n-gram is absent
      zeros(m, index);
      return;
    }
    const Level& lv = level[m];
    if (off < 0 || off + static_cast<int64_t>(mask) >= lv.slots) {
      corrupt = true;  // reported once the walk is over; never read past
      zeros(m, index);
      return;
    }
    int32_t* out_m = out[m] + index * K;
    if (m == M) {
      for (int64_t j = 0; j < K; ++j)
        out_m[j] = lv.rows[find(lv, off, mask, m - 1, j) * lv.cols + 1];
      return;
    }
    for (int64_t j = 0; j < K; ++j) {
      const int32_t* row = lv.rows + find(lv, off, mask, m - 1, j) * lv.cols;
      out_m[j] = row[1];
      visit(m + 1, row[2], static_cast<uint32_t>(row[3]), index * K + j);
    }
  }
};

// The whole lookup, split into units (b, j): batch row b below its first
// head's candidate j. Threads claim units from `next` (as in cpu_rows.cc: a
// task that starts after every unit is claimed returns at once).
struct Job {
  int M;
  int64_t B, K, V;
  Level level[kMaxOrder + 1];
  int32_t* out[kMaxOrder + 1];  // [B, K^m] each
  int64_t size[kMaxOrder + 1];  // K^m
  const int32_t* ids;
  const int32_t* root_off;
  const int32_t* root_mask;
  std::vector<uint32_t> ha, hb;  // [B, M, K]
  std::vector<int32_t> query;
  int64_t units, per_task;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> corrupt{false};

  void work() {
    for (int64_t u0; (u0 = next.fetch_add(per_task)) < units;) {
      const int64_t u1 = u0 + per_task < units ? u0 + per_task : units;
      for (int64_t u = u0; u < u1; ++u) unit(u / K, u % K);
      done.fetch_add(u1 - u0, std::memory_order_release);
    }
  }

  void unit(int64_t b, int64_t j) {
    Walk w;
    w.M = M;
    w.K = K;
    w.level = level;
    for (int m = 2; m <= M; ++m) w.out[m] = out[m] + b * size[m];
    w.ha = ha.data() + b * M * K;
    w.hb = hb.data() + b * M * K;
    w.query = query.data() + b * M * K;
    const int32_t t = ids[b * M * K + j];
    const bool valid = t >= 0 && t < V;
    w.visit(2, valid ? root_off[t] : 0,
            valid ? static_cast<uint32_t>(root_mask[t]) : 0u, j);
    if (w.corrupt) corrupt.store(true, std::memory_order_relaxed);
  }
};

ffi::Error CoocLookup(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ids,
                      ffi::Buffer<ffi::S32> root_off,
                      ffi::Buffer<ffi::S32> root_mask, ffi::RemainingArgs levels,
                      ffi::RemainingRets outs) {
  const auto d = ids.dimensions();
  if (d.size() != 3 || d[1] < 2 || d[1] > kMaxOrder) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
        "dynamo_cooc_lookup: ids must be [B, M, K] with 2 <= M <= 8");
  }
  const int64_t B = d[0], M = d[1], K = d[2];
  const int64_t V = root_off.element_count();
  if (root_mask.element_count() != V ||
      static_cast<int64_t>(levels.size()) != M - 1 ||
      static_cast<int64_t>(outs.size()) != M - 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
        "dynamo_cooc_lookup: needs root_off, root_mask [V], the levels "
        "2..M and one output per level");
  }
  auto job = std::make_shared<Job>();
  job->M = static_cast<int>(M);
  job->B = B;
  job->K = K;
  job->V = V;
  int64_t size = K;
  for (int m = 2; m <= M; ++m) {
    auto lv = levels.get<ffi::Buffer<ffi::S32>>(m - 2);
    auto out = outs.get<ffi::Buffer<ffi::S32>>(m - 2);
    if (lv.has_error()) return lv.error();
    if (out.has_error()) return out.error();
    const auto ld = lv->dimensions();
    const int64_t cols = m < M ? 4 : 2;
    size *= K;
    if (ld.size() != 2 || ld[0] < 1 || ld[1] < cols ||
        (*out)->element_count() != B * size) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
          "dynamo_cooc_lookup: a level is not [S, C] (C >= 4 below the last,"
          " >= 2 at it) or an output is not [B, K^m]");
    }
    job->level[m] = Level{lv->typed_data(), ld[0], ld[1]};
    job->size[m] = size;
    job->out[m] = (*out)->typed_data();
  }
  if (B == 0 || K == 0) return ffi::Error::Success();
  job->ids = ids.typed_data();
  job->root_off = root_off.typed_data();
  job->root_mask = root_mask.typed_data();
  job->ha.resize(B * M * K);
  job->hb.resize(B * M * K);
  job->query.resize(B * M * K);
  for (int64_t c = 0; c < B * M * K; ++c) {
    const int32_t t = job->ids[c];
    const bool valid = t >= 0 && t < V;
    const uint32_t safe = valid ? static_cast<uint32_t>(t) : 0u;
    job->ha[c] = mix32(safe ^ kSeedA);
    job->hb[c] = mix32(safe ^ kSeedB);
    job->query[c] = valid ? t : -2;
  }
  job->units = B * K;
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  // A few units per claim: enough claims to balance uneven subtrees.
  job->per_task = job->units / (8 * threads) > 1 ? job->units / (8 * threads)
                                                 : 1;
  const int64_t tasks = threads < job->units ? threads : job->units;
  for (int64_t t = 1; t < tasks; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->units) {
    std::this_thread::yield();
  }
  if (job->corrupt.load()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "dynamo_cooc_lookup: a sub-table of the co-occurrence "
                      "trie reaches past its level (corrupt device table)");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynamoCoocLookup, CoocLookup,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
