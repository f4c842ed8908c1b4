// model/ training and checkpoints: fine-tuning lowers validation loss,
// resuming from a checkpoint equals an uninterrupted run, cancellation and
// early stopping end a run between steps, files round-trip.
#include "model/trainer.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "model/checkpoint.hpp"
#include "model/pretrain.hpp"
#include "storage/errc.hpp"

using namespace tailor::model;

namespace {

// The test configuration: 2 layers, 2 heads, d_model 32, context 64.
model_config tiny() {
  return *named_config("tailor-test");
}

std::vector<std::string> user_texts() {
  std::vector<std::string> t;
  const char* fruit[] = {"apples", "pears", "plums", "figs", "limes"};
  for (int i = 0; i < 40; ++i)
    t.push_back("I like " + std::string(fruit[i % 5]) + " and " + fruit[(i * 3 + 1) % 5] + ".");
  return t;
}

double max_diff(lora_adapter& a, lora_adapter& b) {
  double m = 0;
  auto na = a.named(), nb = b.named();
  for (std::size_t i = 0; i < na.size(); ++i)
    m = std::max(m, (*na[i].second - *nb[i].second).abs().max().item<double>());
  return m;
}

// Onboarding's steps from the data: 1024 tokens a step, two passes, 100 to
// 1200 steps, 3e-3 scaled by (2 / passes)^0.5 below the floor.
train_options onboarding_recipe() {
  train_options o;
  o.batch_size = 8;
  o.seq_len = 128;
  o.data_epochs = 2;
  o.min_data_steps = 100;
  o.max_data_steps = 1200;
  o.learning_rate = 3e-3;
  o.small_data_lr_power = 0.5;
  return o;
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("tailor-train-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
    base_ = base_weights::init(tiny(), 3);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  train_options quick() {
    train_options o;
    o.steps = 20;
    o.batch_size = 4;
    o.seq_len = 32;
    o.learning_rate = 1e-2;
    o.eval_every = 5;
    o.seed = 7;
    return o;
  }
  // `o`, made to checkpoint every 5 steps into the test's directory, run
  // until step 10 and stopped there (its checkpoint kept).
  caf::expected<train_result> stopped_at_step_10(train_options& o) {
    o.checkpoint_every = 5;
    o.checkpoint_path = (dir_ / "job.ckpt").string();
    int64_t last = 0;
    return train_lora(
        base_, user_texts(), {4, 8, true}, o, [&](const train_progress& p) { last = p.step; },
        [&] { return last >= 10; });
  }
  std::filesystem::path dir_;
  base_weights base_;
};

}  // namespace

TEST_F(TrainerTest, FineTuningLowersTheValidationLoss) {
  auto o = quick();
  o.steps = 150;
  o.learning_rate = 3e-2;
  std::vector<train_progress> seen;
  // On a random (untrained) base only the adapter can learn: give it the MLP too.
  auto r = train_lora(base_, user_texts(), {8, 16, true}, o,
                      [&](const train_progress& p) { seen.push_back(p); });
  ASSERT_TRUE(r) << caf::to_string(r.error());
  ASSERT_TRUE(r->validation_loss);
  EXPECT_LT(*r->validation_loss, r->initial_validation_loss - 0.3)
      << "from " << r->initial_validation_loss << " to " << *r->validation_loss;
  EXPECT_EQ(r->steps_done, 150);
  ASSERT_EQ(seen.size(), 150u);
  for (std::size_t i = 0; i < seen.size(); ++i)
    EXPECT_EQ(seen[i].step, static_cast<int64_t>(i) + 1);
  EXPECT_TRUE(seen.back().validation_loss.has_value());
  // The returned adapter really is what was measured.
  auto stream = token_stream(user_texts());
  EXPECT_LT(evaluate(base_, &r->adapter, stream, 32), evaluate(base_, nullptr, stream, 32));
}

TEST_F(TrainerTest, ResumingFromACheckpointEqualsAnUninterruptedRun) {
  auto o = quick();
  auto whole = train_lora(base_, user_texts(), {4, 8, true}, o);
  ASSERT_TRUE(whole);
  auto first = stopped_at_step_10(o);
  ASSERT_TRUE(first) << caf::to_string(first.error());
  EXPECT_TRUE(first->cancelled);
  EXPECT_EQ(first->steps_done, 10);
  ASSERT_TRUE(std::filesystem::exists(o.checkpoint_path));
  auto resumed = train_lora(base_, user_texts(), {4, 8, true}, o, [&](const train_progress& p) {
    EXPECT_GT(p.step, 10) << "a resumed run starts after the checkpoint";
  });
  ASSERT_TRUE(resumed) << caf::to_string(resumed.error());
  EXPECT_EQ(resumed->steps_done, 20);
  EXPECT_LE(max_diff(resumed->adapter, whole->adapter), 1e-6);
  EXPECT_EQ(resumed->validation_loss, whole->validation_loss);
  EXPECT_GT(whole->best_step, 0);
  EXPECT_EQ(resumed->best_step, whole->best_step);
}

// A checkpoint only saves time: one cut short (a crash as it was written)
// or that is not a checkpoint at all is dropped, and the run starts over
// to the result of an uninterrupted run, rather than failing the job.
TEST_F(TrainerTest, ACheckpointThatCannotBeReadIsDroppedAndTheRunStartsOver) {
  auto o = quick();
  auto whole = train_lora(base_, user_texts(), {4, 8, true}, o);
  ASSERT_TRUE(whole);
  auto first = stopped_at_step_10(o);
  ASSERT_TRUE(first) << caf::to_string(first.error());
  const auto size = std::filesystem::file_size(o.checkpoint_path);
  for (const std::string& damage : {std::string("cut"), std::string("not")}) {
    if (damage == "cut")
      std::filesystem::resize_file(o.checkpoint_path, size / 2);
    else
      std::ofstream(o.checkpoint_path, std::ios::trunc) << "not a checkpoint";
    int64_t first_step = 0;
    auto again = train_lora(base_, user_texts(), {4, 8, true}, o, [&](const train_progress& p) {
      if (first_step == 0) first_step = p.step;
    });
    ASSERT_TRUE(again) << damage << ": " << caf::to_string(again.error());
    EXPECT_NE(again->checkpoint_dropped, "") << damage;
    EXPECT_EQ(first_step, 1) << damage;
    EXPECT_EQ(again->steps_done, 20) << damage;
    EXPECT_LE(max_diff(again->adapter, whole->adapter), 1e-6) << damage;
    EXPECT_EQ(again->validation_loss, whole->validation_loss) << damage;
    EXPECT_EQ(again->best_step, whole->best_step) << damage;
  }
}

TEST_F(TrainerTest, CancellationEndsARunBetweenSteps) {
  int calls = 0;
  auto r = train_lora(base_, user_texts(), {4, 8, false}, quick(), {}, [&] { return ++calls > 3; });
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->cancelled);
  EXPECT_EQ(r->steps_done, 3);
}

TEST_F(TrainerTest, EarlyStoppingKeepsTheBestAdapter) {
  auto o = quick();
  o.steps = 200;
  o.learning_rate = 0.5;  // diverges: validation loss rises after the first evaluations
  o.eval_every = 2;
  o.patience = 2;
  std::vector<double> vals;
  auto r = train_lora(base_, user_texts(), {8, 16, false}, o, [&](const train_progress& p) {
    if (p.validation_loss) vals.push_back(*p.validation_loss);
  });
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->stopped_early);
  EXPECT_LT(r->steps_done, 200);
  ASSERT_TRUE(r->validation_loss);
  for (double v : vals) EXPECT_LE(*r->validation_loss, v);
}

// A user whose texts can only teach the adapter what the held-out text is
// not keeps the untrained adapter: the base's answers, not worse ones.
TEST_F(TrainerTest, TrainingThatOnlyHurtsTheHeldOutTextKeepsTheBase) {
  auto o = quick();
  o.steps = 6;
  o.eval_every = 1;
  o.learning_rate = 0.5;
  const std::vector<std::string> texts = {std::string(60, 'q'),
                                          "0123456789 9876543210 0246813579 1357924680"};
  std::vector<double> vals;
  auto r = train_lora(base_, texts, {8, 16, true}, o, [&](const train_progress& p) {
    if (p.validation_loss) vals.push_back(*p.validation_loss);
  });
  ASSERT_TRUE(r) << caf::to_string(r.error());
  ASSERT_EQ(vals.size(), 6u);
  for (double v : vals) ASSERT_GT(v, r->initial_validation_loss) << "training helped after all";
  ASSERT_TRUE(r->validation_loss);
  EXPECT_EQ(*r->validation_loss, r->initial_validation_loss);
  EXPECT_EQ(r->steps_done, 6);
  EXPECT_EQ(r->best_step, 0);
  EXPECT_EQ(r->train_texts, 1);
  EXPECT_EQ(r->validation_texts, 1);
  for (const auto& layer : r->adapter.layers)
    for (const auto& site : layer) EXPECT_EQ(site.b.abs().max().item<double>(), 0.0);
  for (const auto& text : texts) {
    auto stream = token_stream({text});
    EXPECT_EQ(evaluate(base_, &r->adapter, stream, 32), evaluate(base_, nullptr, stream, 32));
  }
}

TEST_F(TrainerTest, BadInputIsAnErrorNotACrash) {
  auto r = train_lora(base_, {"", ""}, {8, 16, false}, quick());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().category(), caf::atom("tailor_mdl"));
  auto o = quick();
  o.steps = -1;  // 0 is "from the data"
  EXPECT_FALSE(train_lora(base_, user_texts(), {8, 16, false}, o));
  o = quick();
  o.batch_size = 0;
  EXPECT_FALSE(train_lora(base_, user_texts(), {8, 16, false}, o));
  o = quick();
  o.steps = 0;
  o.data_epochs = 0;
  EXPECT_FALSE(train_lora(base_, user_texts(), {8, 16, false}, o));
  // A single short text trains; nothing is held out, and the last step is kept.
  auto single = train_lora(base_, {"hi"}, {2, 4, false}, quick());
  ASSERT_TRUE(single);
  EXPECT_FALSE(single->validation_loss);
  EXPECT_EQ(single->validation_texts, 0);
  EXPECT_EQ(single->best_step, single->steps_done);
}

TEST_F(TrainerTest, BaseAndAdapterFilesRoundTrip) {
  auto path = (dir_ / "base.safetensors").string();
  ASSERT_FALSE(save_base(path, base_, {{"trained_on", "test"}}));
  auto loaded = load_base(path);
  ASSERT_TRUE(loaded) << caf::to_string(loaded.error());
  EXPECT_EQ(loaded->cfg.d_model, 32);
  auto a = base_.named(), b = loaded->named();
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(a[i].second->equal(*b[i].second)) << a[i].first;

  auto ad = lora_adapter::init(tiny(), {4, 8, true}, 5);
  ad.layers[1][0].b.fill_(0.25);
  auto apath = (dir_ / "u1.safetensors").string();
  ASSERT_FALSE(save_adapter(apath, ad, tiny()));
  auto back = load_adapter(apath, tiny());
  ASSERT_TRUE(back) << caf::to_string(back.error());
  EXPECT_EQ(back->cfg.rank, 4);
  EXPECT_TRUE(back->cfg.mlp);
  EXPECT_EQ(max_diff(*back, ad), 0.0);
  // An adapter of another base shape is refused.
  auto other = tiny();
  other.d_model = 64;
  auto wrong = load_adapter(apath, other);
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.error(), tailor::storage::errc::shape_mismatch);
}

// Without a step count, the data sets it: `data_epochs` passes over the
// training split, never fewer than min_data_steps nor more than max_data_steps.
TEST(StepsForData, PassesOverTheDataWithinBounds) {
  auto o = onboarding_recipe();
  EXPECT_EQ(steps_for_data(o, 10'000), 100);      // a few KB: the floor
  EXPECT_EQ(steps_for_data(o, 200'000), 391);     // ceil(2 * 200000 / 1024)
  EXPECT_EQ(steps_for_data(o, 3'000'000), 1200);  // a corpus: the ceiling
  o.data_epochs = 1;
  EXPECT_EQ(steps_for_data(o, 200'000), 196);
}

// A user's few texts, stretched to the step floor, would be passed over
// dozens of times at the full learning rate and learned by heart before the
// first evaluation: the rate is scaled down by how many more passes than
// data_epochs the floor makes.
TEST(LearningRateForData, ScaledDownOnlyWhereTheFloorMakesMorePasses) {
  auto o = onboarding_recipe();
  EXPECT_EQ(learning_rate_for_data(o, 200'000), 3e-3);  // 391 steps: the data's own
  EXPECT_EQ(learning_rate_for_data(o, 51'200), 3e-3);   // the floor is two passes
  EXPECT_DOUBLE_EQ(learning_rate_for_data(o, 10'240), 3e-3 * std::sqrt(0.2));  // 10 passes
  EXPECT_DOUBLE_EQ(learning_rate_for_data(o, 1'024), 3e-3 * std::sqrt(0.02));  // 100 passes
  o.small_data_lr_power = 1;
  EXPECT_DOUBLE_EQ(learning_rate_for_data(o, 10'240), 3e-3 * 0.2);
  o.small_data_lr_power = 0;
  EXPECT_EQ(learning_rate_for_data(o, 10'240), 3e-3);
}

// Steps from the data on a few texts train at the scaled rate, and say so:
// the same run with those steps and that rate given is the same adapter (as
// a resumed run is, to 1e-6).
TEST_F(TrainerTest, AFewTextsTrainAtTheScaledLearningRate) {
  auto o = quick();
  o.steps = 0;
  o.min_data_steps = 20;
  o.data_epochs = 1;
  const auto all = user_texts();
  const std::vector<std::string> few(all.begin(), all.begin() + 3);
  auto scaled = train_lora(base_, few, {4, 8, false}, o);
  ASSERT_TRUE(scaled) << caf::to_string(scaled.error());
  EXPECT_EQ(scaled->steps_done, 20);
  // Two training texts of ~25 tokens each, 20 steps of 4 x 32: ~50 passes.
  EXPECT_LT(scaled->learning_rate, o.learning_rate / 5);
  EXPECT_GT(scaled->learning_rate, o.learning_rate / 20);
  auto given = o;
  given.steps = scaled->steps_done;
  given.learning_rate = scaled->learning_rate;
  auto same = train_lora(base_, few, {4, 8, false}, given);
  ASSERT_TRUE(same);
  EXPECT_EQ(same->learning_rate, scaled->learning_rate);
  EXPECT_LE(max_diff(same->adapter, scaled->adapter), 1e-6);
  EXPECT_EQ(same->best_step, scaled->best_step);
  // Without the scaling: the full rate, another adapter.
  o.small_data_lr_power = 0;
  auto full = train_lora(base_, few, {4, 8, false}, o);
  ASSERT_TRUE(full);
  EXPECT_EQ(full->learning_rate, o.learning_rate);
  EXPECT_GT(max_diff(full->adapter, scaled->adapter), 1e-3);
}

TEST_F(TrainerTest, StepsZeroTrainsForTheStepsTheDataCallsFor) {
  auto o = quick();
  o.steps = 0;
  o.data_epochs = 1;
  o.min_data_steps = 3;
  o.max_data_steps = 1000;
  auto texts = user_texts();
  int64_t last_steps = 0;
  auto r = train_lora(base_, texts, {4, 8, false}, o,
                      [&](const train_progress& p) { last_steps = p.steps; });
  ASSERT_TRUE(r) << caf::to_string(r.error());
  EXPECT_GT(r->steps_done, o.min_data_steps);
  EXPECT_EQ(r->steps_done, last_steps);
  // One pass over 36 training entries of ~25 tokens in steps of 4 x 32
  // tokens: about 7 steps.
  EXPECT_LT(r->steps_done, 20);

  o.max_data_steps = 4;
  auto capped = train_lora(base_, texts, {4, 8, false}, o);
  ASSERT_TRUE(capped);
  EXPECT_EQ(capped->steps_done, 4);

}
