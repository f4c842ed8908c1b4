#include "model/helper_policy.hpp"

#include <algorithm>

namespace tailor::model {

helper_policy::helper_policy(const options& o) : o_(o) {
  o_.block = std::max<int64_t>(1, o_.block);
  o_.pairs = std::max<int64_t>(1, o_.pairs);
}

bool helper_policy::side_with_helper() const {
  const int64_t pair = steps_ / (2 * o_.block);
  const bool first = steps_ % (2 * o_.block) < o_.block;
  // Even pairs start with the helper, odd ones without.
  return first == (pair % 2 == 0);
}

bool helper_policy::use_helper() const { return trying_ ? side_with_helper() : chosen_; }

void helper_policy::observe(int64_t tokens, double seconds) {
  if (!trying_) {
    if (++steps_ >= o_.settle) {
      trying_ = true;
      steps_ = 0;
    }
    return;
  }
  const int side = side_with_helper() ? 1 : 0;
  seconds_[side] += seconds;
  tokens_[side] += tokens;
  if (++steps_ % (2 * o_.block) != 0) return;
  // A pair has ended: its sides' cost per token, compared.
  if (tokens_[0] > 0 && tokens_[1] > 0 && seconds_[0] > 0)
    pair_ratios_.push_back((seconds_[1] / static_cast<double>(tokens_[1])) /
                           (seconds_[0] / static_cast<double>(tokens_[0])));
  seconds_[0] = seconds_[1] = 0;
  tokens_[0] = tokens_[1] = 0;
  if (steps_ < 2 * o_.block * o_.pairs) return;
  // The trial has ended. A pair a preemption or a burst of joins spoiled
  // moves the median little.
  if (!pair_ratios_.empty()) {
    auto mid = pair_ratios_.begin() + static_cast<std::ptrdiff_t>(pair_ratios_.size() / 2);
    std::nth_element(pair_ratios_.begin(), mid, pair_ratios_.end());
    ratio_ = *mid;
    if (pair_ratios_.size() % 2 == 0)
      ratio_ = (ratio_ + *std::max_element(pair_ratios_.begin(), mid)) / 2;
    // The helper comes in after two winning trials in a row and leaves after
    // one lost: where it lost by 6-51 %, one trial of 17 still won by chance
    // (0.94), which cost a settle period with it.
    const bool won = ratio_ < o_.threshold;
    chosen_ = won && (chosen_ || won_before_);
    won_before_ = won;
    ++trials_;
  }
  pair_ratios_.clear();
  trying_ = false;
  steps_ = 0;
}

}  // namespace tailor::model
