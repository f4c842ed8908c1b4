#pragma once
// Ranks 0..n-1 drawn from Zipf(a): rank k with probability proportional to
// 1 / (k + 1)^a, as S-LoRA draws its adapters (a = 1). The serving bench
// draws its users so, and tailor-micro its rows' adapters.

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace tailor::bench {

class zipf {
 public:
  zipf(int n, double a) {
    double sum = 0;
    for (int k = 0; k < n; ++k) cdf_.push_back(sum += 1.0 / std::pow(k + 1, a));
  }
  int operator()(std::mt19937_64& rng) const {
    const double u = std::uniform_real_distribution<double>(0, cdf_.back())(rng);
    return static_cast<int>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin());
  }

 private:
  std::vector<double> cdf_;  // cumulative weights
};

}  // namespace tailor::bench
