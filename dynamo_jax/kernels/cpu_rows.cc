// Few-row float32 matmul for XLA:CPU decode steps: y[R, N] = x[R, K] w[K, N]
// with w stored in the panel layout of dynamo_jax/kernels/cpu_matmul.py.
//
// Why: a decode pass multiplies 1..17 activation rows by every weight of the
// model. XLA:CPU sends one row to a matrix-vector loop and 2..17 rows to a
// library matmul that is 2-3x slower per weight in the decode loop, so a pass
// that feeds 3 tokens costs ~2x one that feeds one, although both read the
// same weights. Here the weight is read once, as one sequential stream, for
// up to 8 rows at a time (a sweep per 8 rows), split by columns between the
// threads of XLA's intra-op pool.
//
// Panel layout of a [K, N] weight (NP = N - N % 32 columns in P = NP / 32
// panels, then the rest): P blocks of [K, 32] (block p holds columns
// 32p..32p+31, row by row), then one [K, N % 32] block. Same element count
// as w, so the packed weight keeps w's shape.
//
// Each output element is sum_k x[r, k] * w[k, n] accumulated in order
// k = 0..K-1 (fused multiply-adds where the CPU has them) whatever R is, so
// a row's result does not depend on the other rows fed with it.

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 32;  // columns per panel
constexpr int kMaxRows = 8;     // rows per sweep over the weight
constexpr int64_t kChunkPanels = 8;  // panels per task (256 columns)

// Rows [0, R) of x times one block of `width` (<= kLanes) columns stored as
// [K, width]; writes y[r, col0 .. col0 + width). kFull: width is kLanes, a
// compile-time constant, so the lane loops vectorize.
template <int R, bool kFull>
void block(const float* __restrict x, const float* __restrict w,
           float* __restrict y, int64_t K, int64_t N, int64_t col0,
           int64_t width) {
  const int64_t n = kFull ? kLanes : width;
  float acc[R][kLanes];
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) acc[r][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * n;
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      for (int64_t j = 0; j < n; ++j) acc[r][j] += xr * wk[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) y[r * N + col0 + j] = acc[r][j];
}

// Rows [0, R) times panels [p0, p1) (and the last block when p1 is the end).
template <int R>
void rows(const float* x, const float* w, float* y, int64_t K, int64_t N,
          int64_t p0, int64_t p1) {
  const int64_t panels = N / kLanes;
  for (int64_t p = p0; p < p1; ++p)
    block<R, true>(x, w + p * K * kLanes, y, K, N, p * kLanes, kLanes);
  if (p1 == panels && N % kLanes)
    block<R, false>(x, w + panels * K * kLanes, y, K, N, panels * kLanes,
                    N % kLanes);
}

// All R rows times panels [p0, p1), in sweeps of up to kMaxRows rows.
void all_rows(const float* x, const float* w, float* y, int64_t R, int64_t K,
              int64_t N, int64_t p0, int64_t p1) {
  int64_t r = 0;
  for (; r + kMaxRows <= R; r += kMaxRows)
    rows<kMaxRows>(x + r * K, w, y + r * N, K, N, p0, p1);
  const float* xr = x + r * K;
  float* yr = y + r * N;
  switch (R - r) {
    case 7: rows<7>(xr, w, yr, K, N, p0, p1); break;
    case 6: rows<6>(xr, w, yr, K, N, p0, p1); break;
    case 5: rows<5>(xr, w, yr, K, N, p0, p1); break;
    case 4: rows<4>(xr, w, yr, K, N, p0, p1); break;
    case 3: rows<3>(xr, w, yr, K, N, p0, p1); break;
    case 2: rows<2>(xr, w, yr, K, N, p0, p1); break;
    case 1: rows<1>(xr, w, yr, K, N, p0, p1); break;
    default: break;
  }
}

// One product split into chunks of panels. Threads claim chunks from `next`;
// a task of XLA's pool that starts after every chunk is claimed returns at
// once, so the caller never waits for a task that has not started (no
// deadlock when the pool's threads are busy), only for claimed chunks.
struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t R, K, N, panels, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t p0 = c * panels / chunks, p1 = (c + 1) * panels / chunks;
      all_rows(x, w, y, R, K, N, p0, p1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[1]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "dynamo_rows_matmul: shapes must be x [R, K], "
                      "w [K, N], y [R, N]");
  }
  const int64_t R = xd[0], K = wd[0], N = wd[1];
  if (R == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {  // an empty sum
    for (int64_t i = 0; i < R * N; ++i) y->typed_data()[i] = 0.f;
    return ffi::Error::Success();
  }
  const int64_t panels = N / kLanes;
  const int64_t threads = pool.num_threads();
  int64_t chunks = panels / kChunkPanels;
  if (chunks > threads) chunks = threads;
  if (chunks < 2) {  // one task: no scheduling
    all_rows(x.typed_data(), w.typed_data(), y->typed_data(), R, K, N, 0,
             panels);
    return ffi::Error::Success();
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->R = R;
  job->K = K;
  job->N = N;
  job->panels = panels;
  job->chunks = chunks;
  for (int64_t t = 1; t < chunks; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < chunks) {
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynamoRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
