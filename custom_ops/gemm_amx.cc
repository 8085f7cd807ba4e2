// Several rows of A on CPUs with AMX-BF16 (Intel Sapphire Rapids and later), float32 or float16
// weights (float16: two bfloat16 parts hold its 11-bit significand exactly, so five products).
//
// The tile unit multiplies bfloat16 at about 15 times the rate of AVX-512 float32 FMAs. To keep
// float32 accuracy, every float32 value x is split into three bfloat16 parts, x = x0 + x1 + x2
// (exact for finite x: each part holds the next 8 bits of the significand), and the six products
// a_i * b_j with i + j <= 2 are accumulated in float32; the three dropped ones are below 2^-24 of
// a * b (a float64 simulation on random data: 2e-8 of max |y|). What remains is the float32
// accumulation, as in the FMA kernels: max error / max |y| against float64 is 1.3-1.9e-6 for both
// at K = 4096 (tests/test_op.py); three products instead of six would add about 4e-6. Values that
// are Inf or NaN (or round to Inf) cannot be split: the caller then uses the AVX-512 kernels, which
// give the contract's exact semantics.
//
// Compiled with AMX flags in this file only (namespace scap::amx), picked at run time.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#include <cfloat>
#include <cstdlib>
#include <cstring>

#include "sparse_gemm.h"

namespace scap {
namespace amx {
namespace {

constexpr int64_t kTile = 16;      // rows of a tile; also columns of a float32 tile
constexpr int64_t kStep = 32;      // k per tile multiply: 16 pairs of bfloat16
constexpr int64_t kChunk = 64;     // k per panel of B: with 1024 columns, panel and accumulators of
                                   // 256 rows stay in L2 (96 measured the same, 512 slower)
constexpr int64_t kTileElems = kTile * kStep;  // bfloat16 per A or B tile (1 KiB)
constexpr int kParts = 3;

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight tiles of 16 rows x 64 bytes: 0-3 accumulate a 32 x 32 float32 block, 4-5 hold two tiles
// of A, 6-7 two tiles of B. At the end the thread's previous tile configuration comes back (other
// AMX code on the pool's threads, such as onnxruntime's int8 GEMM, may configure tiles once per
// thread), or the tiles are released when there was none.
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(&saved_);
    TileConfig config{};
    config.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = kTile;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (saved_.palette_id != 0) {
      _tile_loadconfig(&saved_);
    } else {
      _tile_release();
    }
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  alignas(64) TileConfig saved_{};
};

inline __m256i ToBf16(__m512 x) {  // round to nearest even
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
}
inline __m512 FromBf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// The three parts of 16 floats. `bad` gets the lanes the parts cannot carry: Inf or NaN, values
// that round to Inf in bfloat16 (above 3.39e38), and non-zero values below 2^-100, whose third part
// (about 2^-16 of the value) would be subnormal, which the conversion and the tile unit flush.
inline void Split(__m512 x, __m256i parts[kParts], __mmask16& bad) {
  parts[0] = ToBf16(x);
  const __m512 x0 = FromBf16(parts[0]);
  const __m512 magnitude = _mm512_abs_ps(x);
  bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(x0), _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ) |
         (_mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(0x1p-100f), _CMP_LT_OQ) &
          _mm512_cmp_ps_mask(magnitude, _mm512_setzero_ps(), _CMP_NEQ_OQ));
  const __m512 r1 = _mm512_sub_ps(x, x0);
  parts[1] = ToBf16(r1);
  parts[2] = ToBf16(_mm512_sub_ps(r1, FromBf16(parts[1])));
}

inline __mmask16 TailMask(int64_t count) {
  if (count <= 0) return 0;
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// A per-thread work buffer that only grows (no std:: templates in code compiled with AMX flags:
// the linker could pick this instantiation for callers on other CPUs).
template <typename T>
class Buffer {
 public:
  ~Buffer() { std::free(data_); }
  T* get(int64_t count) {
    if (count > capacity_) {
      std::free(data_);
      data_ = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(RoundUp(count * sizeof(T), 64))));
      capacity_ = data_ != nullptr ? count : 0;
    }
    return data_;
  }

 private:
  T* data_ = nullptr;
  int64_t capacity_ = 0;
};

int64_t PaddedRows(const SparseTiles& act) { return RoundUp(act.rows, 2 * kTile); }
int64_t PaddedDepth(const SparseTiles& act) { return RoundUp(act.kept_count, kStep); }

// The split activations are A tiles, each 16 rows x 32 k contiguous (the tile loads then read
// whole cache lines, never rows a power of two apart): tile (step s, part p, row tile r) starts at
// ATile(s, p, r, row_tiles).
inline int64_t ATile(int64_t step, int64_t part, int64_t row_tile, int64_t row_tiles) {
  return ((step * kParts + part) * row_tiles + row_tile) * kTileElems;
}

int64_t PartsElements(const SparseTiles& act) { return kParts * PaddedRows(act) * PaddedDepth(act); }

bool SplitRows(const SparseTiles& act, int64_t m0, int64_t m1, uint16_t* parts) {
  const int64_t depth = PaddedDepth(act), row_tiles = PaddedRows(act) / kTile;
  __mmask16 bad = 0;
  for (int64_t m = m0; m < m1; ++m) {
    const float* src = act.values + m * act.row_stride;
    for (int64_t i = 0; i < depth; i += 16) {
      const int64_t count = m < act.rows ? act.kept_count - i : 0;
      const __m512 x = count > 0 ? _mm512_maskz_loadu_ps(TailMask(count), src + i) : _mm512_setzero_ps();
      __m256i h[kParts];
      Split(x, h, bad);
      const int64_t within = (m % kTile) * kStep + i % kStep;
      for (int p = 0; p < kParts; ++p) {
        uint16_t* dst = parts + ATile(i / kStep, p, m / kTile, row_tiles) + within;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h[p]);
      }
    }
  }
  return bad == 0;
}

// Parts of B's values: float16 has an 11-bit significand, which two bfloat16 parts hold exactly.
template <typename TW>
constexpr int BParts() {
  return sizeof(TW) == 2 ? 2 : kParts;
}

inline __m512 LoadB(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 LoadB(__mmask16 mask, const uint16_t* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)); }

inline void StoreY(__mmask16 mask, float* p, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
inline void StoreY(__mmask16 mask, uint16_t* p, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Kept rows [c0, c0 + steps * 32) of B's columns [n0, n0 + w) as B tiles: for step s, part p and
// column tile t, 16 rows (pairs of k) of 16 columns x 2 interleaved bfloat16, the layout the tile
// multiply reads. Rows past kept_count and columns past w are 0. False if B holds Inf or NaN there.
template <typename TW>
bool PackPanel(const SparseTiles& act, const TW* b, int64_t n, int64_t c0, int64_t steps, int64_t n0, int64_t w,
               int64_t column_tiles, uint16_t* panel) {
  constexpr int b_parts = BParts<TW>();
  // (e0, o0, e1, o1, ...): even k's part in the low half of the source, odd k's in the high half.
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  __mmask16 bad = 0;
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t i = c0 + s * kStep + 2 * r;
      const TW* even = i < act.kept_count ? b + static_cast<int64_t>(act.kept[i]) * n + n0 : nullptr;
      const TW* odd = i + 1 < act.kept_count ? b + static_cast<int64_t>(act.kept[i + 1]) * n + n0 : nullptr;
      for (int64_t t = 0; t < column_tiles; ++t) {
        const __mmask16 mask = TailMask(w - t * kTile);
        const __m512 xe = even != nullptr && mask ? LoadB(mask, even + t * kTile) : _mm512_setzero_ps();
        const __m512 xo = odd != nullptr && mask ? LoadB(mask, odd + t * kTile) : _mm512_setzero_ps();
        __m256i he[kParts], ho[kParts];
        Split(xe, he, bad);
        Split(xo, ho, bad);
        for (int p = 0; p < b_parts; ++p) {
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(he[p]), ho[p], 1);
          uint16_t* tile = panel + ((s * b_parts + p) * column_tiles + t) * kTileElems;
          _mm512_storeu_si512(tile + r * kStep, _mm512_permutexvar_epi16(interleave, both));
        }
      }
    }
  }
  return bad == 0;
}

// acc (32 x 32 float32 block, `acc_stride` floats apart) += row tiles r0, r0 + 1 of A times column
// tiles t0, t0 + 1 of the panel (b_parts parts of B) over `steps` steps from step s0: the products
// of parts a_i * b_j with i + j <= 2.
void MultiplyBlock(const uint16_t* parts, int64_t row_tiles, int64_t r0, int64_t s0, const uint16_t* panel,
                   int b_parts, int64_t steps, int64_t column_tiles, int64_t t0, float* acc, int64_t acc_stride,
                   bool first) {
  const int64_t acc_bytes = acc_stride * 4;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc, acc_bytes);
    _tile_loadd(1, acc + kTile, acc_bytes);
    _tile_loadd(2, acc + kTile * acc_stride, acc_bytes);
    _tile_loadd(3, acc + kTile * acc_stride + kTile, acc_bytes);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* b_step = panel + s * b_parts * column_tiles * kTileElems + t0 * kTileElems;
    // a_i with b_0 .. b_(2 - i): A's part loaded once for the B parts it meets.
    for (int i = 0; i < kParts; ++i) {
      const uint16_t* a_part = parts + ATile(s0 + s, i, r0, row_tiles);
      _tile_loadd(4, a_part, 64);
      _tile_loadd(5, a_part + kTileElems, 64);
      for (int j = 0; i + j < kParts && j < b_parts; ++j) {
        const uint16_t* b_part = b_step + j * column_tiles * kTileElems;
        _tile_loadd(6, b_part, 64);
        _tile_loadd(7, b_part + kTileElems, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, acc, acc_bytes);
  _tile_stored(1, acc + kTile, acc_bytes);
  _tile_stored(2, acc + kTile * acc_stride, acc_bytes);
  _tile_stored(3, acc + kTile * acc_stride + kTile, acc_bytes);
}

template <typename TW>
bool TileColumns(const SparseTiles& act, const uint16_t* parts, const TW* b, int64_t n, const float* bias, TW* y,
                 int64_t n0, int64_t n1) {
  constexpr int b_parts = BParts<TW>();
  const int64_t w = n1 - n0, width = RoundUp(w, 2 * kTile), column_tiles = width / kTile;
  const int64_t rows = PaddedRows(act), depth = PaddedDepth(act), row_tiles = rows / kTile;
  thread_local Buffer<uint16_t> panel_buffer;
  thread_local Buffer<float> acc_buffer;
  uint16_t* panel = panel_buffer.get(b_parts * kChunk * width);
  float* acc = acc_buffer.get(rows * width);
  if (panel == nullptr || acc == nullptr) return false;
  if (depth == 0) std::memset(acc, 0, static_cast<size_t>(rows * width) * sizeof(float));  // every element dropped
  TileScope tiles;
  for (int64_t c0 = 0; c0 < depth; c0 += kChunk) {
    const int64_t steps = (c0 + kChunk <= depth ? kChunk : depth - c0) / kStep;
    if (!PackPanel(act, b, n, c0, steps, n0, w, column_tiles, panel)) return false;
    // Column tiles outside, row tiles inside: B's tiles stay in L1 for every row tile of A.
    // (Prefetching the next chunk's rows of B between blocks was slower.)
    for (int64_t t = 0; t < column_tiles; t += 2) {
      for (int64_t r = 0; r < row_tiles; r += 2) {
        MultiplyBlock(parts, row_tiles, r, c0 / kStep, panel, b_parts, steps, column_tiles, t,
                      acc + r * kTile * width + t * kTile, width, c0 == 0);
      }
    }
  }
  // Finite parts can still give what float32 would not: a rounded-up x0 * w0 overflowing where
  // x * w does not, or products flushed to zero below FLT_MIN. Outputs that are not finite, or all
  // below 2^-80 (where flushed products could matter), send the range to the float32 kernels,
  // which then overwrite it.
  __mmask16 not_finite = 0;
  __m512 largest = _mm512_setzero_ps();
  for (int64_t m = 0; m < act.rows; ++m) {
    const float* src = acc + m * width;
    TW* dst = y + m * n + n0;
    for (int64_t j = 0; j < w; j += 16) {
      const __mmask16 mask = TailMask(w - j);
      __m512 v = _mm512_maskz_loadu_ps(mask, src + j);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n0 + j));
      const __m512 magnitude = _mm512_abs_ps(v);
      not_finite |= _mm512_mask_cmp_ps_mask(mask, magnitude, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);
      largest = _mm512_max_ps(largest, magnitude);
      StoreY(mask, dst + j, v);
    }
  }
  const bool tiny = depth > 0 && _mm512_reduce_max_ps(largest) < 0x1p-80f;
  return not_finite == 0 && !tiny;
}

// The CPU has AMX-TILE, AMX-BF16 and AVX512-BF16, and the kernel lets this process use tile data.
bool Available() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  const bool avx512 = ((ebx >> 16) & 1) && ((ebx >> 30) & 1) && ((ebx >> 31) & 1);  // F, BW, VL
  if (!amx_bf16 || !amx_tile || !avx512) return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !((eax >> 5) & 1)) return false;  // AVX512-BF16
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace
}  // namespace amx

const AmxGemm* AmxKernelsIfAvailable() {
  static const AmxGemm kernels{&amx::PartsElements, &amx::SplitRows, &amx::TileColumns<float>,
                               &amx::TileColumns<uint16_t>, 2 * amx::kTile, 2 * amx::kTile};
  static const AmxGemm* available = amx::Available() ? &kernels : nullptr;
  return available;
}

}  // namespace scap
