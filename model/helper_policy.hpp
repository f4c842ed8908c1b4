#pragma once

// Whether a batch step splits its kernels with the step helper
// (model/step_helper.hpp), decided by timing steps with it and without.
//
// What the helper gains depends on what a process cannot see: whether its
// two cores share a cache, and how busy the other core is. On this
// project's 2-core VM the helper once cut a 64-row step from 1009 to 754 us;
// on another day, with a round trip between its two vCPUs taking 420 ns
// (cores that share no cache), the same step took 600 us with it against
// 505 without, and serving lost 11 % to it (docs/measurements.md). So
// the loop keeps measuring: a trial alternates blocks of steps with and
// without the helper, pair by pair (the order flipping from pair to pair,
// so a trend in the load favours neither), and compares their cost per
// token by the median pair; then the winner runs until the next trial (the
// helper once it has won two trials in a row).
// Only the steps the helper could take (`observe`d) count.
//
// No LibTorch and no clock here: the caller times its steps.
#include <cstdint>
#include <vector>

namespace tailor::model {

class helper_policy {
 public:
  struct options {
    int64_t block = 16;    // steps a side of each pair
    int64_t pairs = 6;     // pairs a trial
    int64_t settle = 4096; // steps between trials
    // The helper wins when its cost per token is below this share of the
    // cost without it: it takes a core the broker and the engine's other
    // threads could use, so a step a few per cent shorter is not worth it.
    double threshold = 0.95;
  };
  helper_policy() : helper_policy(options{}) {}
  explicit helper_policy(const options& o);

  // Whether the next step runs with the helper.
  bool use_helper() const;
  // That step's tokens and seconds.
  void observe(int64_t tokens, double seconds);

  // The last trial's cost per token with the helper over without (the
  // median pair's; 0 before a trial has ended), the choice until the next
  // trial, and the trials ended so far.
  double ratio() const { return ratio_; }
  bool chosen() const { return chosen_; }
  int64_t trials() const { return trials_; }

 private:
  bool side_with_helper() const;

  options o_;
  bool trying_ = true;  // a trial runs from the first step
  int64_t steps_ = 0;   // into the current trial, or since it ended
  double seconds_[2] = {0, 0};  // this pair's sides: [without, with]
  int64_t tokens_[2] = {0, 0};
  std::vector<double> pair_ratios_;
  double ratio_ = 0;
  bool chosen_ = false;
  bool won_before_ = false;  // the last trial ended found the helper faster
  int64_t trials_ = 0;
};

}  // namespace tailor::model
