// TimedChoice: the faster of two ways to compute a call, found by timing both on the kernel's first
// calls of each kind. Where the break-even point between two paths moves with the CPU's
// microarchitecture rather than with its instruction set, a constant measured on one machine
// is wrong on the next: on a Zen 4 EPYC (256-bit FMA units) the pair lists beat the register tiles
// from 64 rows at half sparsity, on a Zen 5 EPYC (512-bit units, same AVX-512) the tiles win there
// by 20-40% (docs/kernel_benchmarks.md, "Tiles or pairs, timed").
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <limits>
#include <mutex>

namespace scap {

template <int kKinds>
class TimedChoice {
 public:
  // Timings of each way per kind before the faster is kept: the least of two, so that one call
  // slowed by the host's other work does not decide.
  static constexpr int kTrials = 2;

  // The way (0 or 1) the next call of `kind` takes: the one chosen, or while trying, the one
  // timed fewer times.
  int Next(int kind) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Kind& k = kinds_[static_cast<size_t>(kind)];
    if (k.chosen >= 0) return k.chosen;
    return k.count[0] <= k.count[1] ? 0 : 1;
  }

  // A call of `kind` that took `seconds` the way `way`.
  void Record(int kind, int way, double seconds) {
    std::lock_guard<std::mutex> lock(mutex_);
    Kind& k = kinds_[static_cast<size_t>(kind)];
    if (k.chosen >= 0) return;
    if (seconds < k.best[way]) k.best[way] = seconds;
    ++k.count[way];
    if (k.count[0] >= kTrials && k.count[1] >= kTrials) k.chosen = k.best[1] < k.best[0] ? 1 : 0;
  }

 private:
  struct Kind {
    double best[2] = {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    int count[2] = {0, 0};
    int chosen = -1;
  };
  std::mutex mutex_;
  std::array<Kind, kKinds> kinds_{};
};

// Seconds since `start` on the steady clock.
inline double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace scap
