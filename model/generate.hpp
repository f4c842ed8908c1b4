#pragma once

// Tokenizer (bytes + end-of-text), sampling, and a continuous batch of
// generations over one shared base: sequences join and leave between steps,
// each with its own adapter, sampling settings and seed.
#include <algorithm>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "model/helper_policy.hpp"
#include "model/step_helper.hpp"
#include "model/transformer.hpp"

namespace tailor::model {

inline constexpr int64_t end_of_text = 256;

std::vector<int64_t> encode(const std::string& text);
// A prompt's tokens as a sequence starts: its bytes after an end-of-text.
inline int64_t prompt_tokens(const std::string& prompt) {
  return static_cast<int64_t>(prompt.size()) + 1;
}
// Why `prompt` cannot be generated from with `cfg` (it fills more than the
// context, so that no token would follow it), for a message that names the
// field; empty when it can. Serving refuses such a prompt rather than drop
// part of it unseen.
std::string prompt_misfit(const model_config& cfg, const std::string& prompt);
// Bytes of the tokens (end-of-text dropped), repaired to valid UTF-8.
std::string decode(const std::vector<int64_t>& tokens);

struct sampling {
  int64_t max_tokens = 64;
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool ignore_end_of_text = false;  // benchmarks: always generate max_tokens
  // Neither end-of-text nor a stop sequence ends a text before this many
  // tokens: a prompt that ends a sentence is otherwise often answered with
  // nothing (vLLM's min_tokens).
  int64_t min_tokens = 0;
};

struct generation {
  std::string text;
  std::string finish_reason;  // stop | length | (given to finish(): cancelled, deadline)
  std::vector<int64_t> tokens;
};

// Rows of one batch. Each row owns a cache slot; `add` starts a row, and
// `step` runs one forward for every row: the next token of each decoding
// row and the whole prompt (what the prefix cache lacks of it) of each row
// that joined since, so joining costs a prompt's tokens, not a forward.
//
// With `prefix_entries` > 0 it keeps the keys and values of up to that many
// recent prompts, each under its adapter's identity in the bank (which
// follows the adapter's weights, not its place): a prompt that begins like
// one its adapter saw before, even in another place, copies that part into
// its slot and prefills only the rest. Keys and values depend on
// the adapter (LoRA adapts the QKV projection), so prompts of different
// adapters never share. A prompt is kept when less than half of it was
// found, so a shared template is stored once per adapter, not per prompt.
// With `prefix_bytes` > 0 the entries' keys and values take at most that
// many bytes (a prompt costs 2 * n_layer * d_model * 4 bytes per token in
// a float cache, half that in float16), however long the prompts: the
// least recently used go first. `precision` says how it keeps keys and
// values and computes the products (float by default, as tests and tools).
struct serving_precision {
  // The key/value cache (kv_cache::make): or kHalf, where the machine
  // converts it in hardware (the AVX-512 row kernels); float otherwise, as
  // widening half in portable code costs more than the reads it saves.
  torch::ScalarType kv = torch::kFloat32;
  // The products (serving_weights): float by default, or bfloat16 on AVX-512
  // BF16's dot product or AMX's tiles, where the machine has them.
  product_kind products = product_kind::float32;
};
class batch_generator {
 public:
  batch_generator(const base_weights& base, const adapter_bank& bank, int64_t max_rows,
                  int64_t prefix_entries = 0, int64_t prefix_bytes = 0,
                  serving_precision precision = {});
  ~batch_generator();

  // Starts a sequence with the bank's adapter `adapter` (0: none). Returns its
  // id, or nothing when all rows are busy. The whole prompt is read, and the
  // sequence ends `length` at the context if max_tokens has not ended it
  // before; of a prompt longer than the context (prompt_misfit: callers
  // refuse it) only the last context's worth is read.
  std::optional<int64_t> add(const std::string& prompt, int64_t adapter, const sampling& s);
  struct new_sequence {
    std::string prompt;
    int64_t adapter = 0;
    sampling s;
  };
  // Starts several sequences (their prompts are computed by the next step);
  // their ids in order, or none at all when there are not enough free rows
  // for every one.
  std::vector<int64_t> add_batch(const std::vector<new_sequence>& seqs);
  // One step: prompts of rows that joined (up to prefill_chunk tokens of
  // them), and the next token of every row past its prompt; returns the ids
  // of sequences that finished in it (or already in add(), with max_tokens 0).
  std::vector<int64_t> step();
  // Sequences whose prompt the last step completed (their first token).
  const std::vector<int64_t>& started() const { return started_; }
  // At most this many prompt tokens a step (0: every prompt whole in the
  // step after it joins). A chunk's keys and values are the whole prompt's:
  // the text does not depend on it, only how long one step can take when
  // many prompts join at once.
  void set_prefill_chunk(int64_t tokens) { prefill_chunk_ = std::max<int64_t>(0, tokens); }
  // Starts a helper thread (model/step_helper.hpp) that takes chunks of
  // the steps of at least `min_tokens` tokens on a core nothing else
  // wants: of every such step, or with `adaptive`, of those a
  // helper_policy with these options picks. False, with the reason in
  // `err`, when it cannot start.
  bool start_helper(const std::string& thread_name, int64_t min_tokens, std::string& err,
                    std::optional<helper_policy::options> adaptive = std::nullopt);
  // The adaptive helper's policy (null without one).
  const helper_policy* helper_choice() const { return policy_ ? &*policy_ : nullptr; }
  // Steps the helper could have taken, and those it did.
  int64_t helper_eligible_steps() const { return eligible_steps_; }
  int64_t helper_steps() const { return helped_steps_; }
  // The chunks of work the helper has taken so far, and the times the step
  // waited long for one (0 without a helper).
  int64_t helper_chunks() const { return helper_ ? helper_->chunks_run() : 0; }
  int64_t helper_late_waits() const { return helper_ ? helper_->late_waits() : 0; }
  int64_t helper_cores_lent() const { return helper_ ? helper_->cores_lent() : 0; }
  bool idle() const;
  std::size_t active() const;
  // Ends an active sequence now with `reason` (cancelled, deadline): its
  // text so far is taken like any other. False if it is not active.
  bool finish(int64_t id, const std::string& reason);
  // The finished sequence's result (once).
  generation take(int64_t id);
  // Prompt tokens since construction: copied from the prefix cache, and
  // computed by prefill.
  int64_t prompt_tokens_reused() const { return reused_tokens_; }
  int64_t prompt_tokens_computed() const { return computed_tokens_; }
  // Drops the prefix cache's prompts of the adapter `identity`
  // (adapter_bank::identities): their keys and values are its user's.
  void forget_prefixes(uint64_t identity);
  // Bytes of keys and values the prefix cache holds now.
  int64_t prefix_cache_bytes() const { return prefix_used_; }
  // How the products run (what was asked for, where the machine can), and
  // the key/value cache's type.
  product_kind products() const { return weights_.products; }
  torch::ScalarType kv_type() const { return cache_.k.front().scalar_type(); }

 private:
  struct row;
  void emit(row& r, int64_t token);
  // Moves rows down so that row i sits in cache slot i. The forward would
  // read any slot in place, but in slot order it walks the cache in address
  // order: measured faster than leaving holes (docs/measurements.md).
  void compact();
  int64_t sample(row& r, const float* logits, int64_t vocab);
  struct prefix_entry {
    uint64_t identity = 0;  // the adapter's (adapter_bank::identities)
    std::vector<int64_t> tokens;
    std::vector<torch::Tensor> k, v;  // [layer] -> [1, heads, tokens, head_dim]
    int64_t bytes = 0;                // of k and v
  };
  using prefix_list = std::list<prefix_entry>;
  // The cached prompt of `place` sharing the longest prefix with `tokens`,
  // and that length (0 and prefixes_.end() when none does). Looks at that
  // adapter's entries only.
  std::pair<prefix_list::iterator, int64_t> longest_prefix(int64_t place,
                                                           const std::vector<int64_t>& tokens);
  void remember_prompt(int64_t place, const std::vector<int64_t>& tokens, int64_t slot);
  uint64_t identity_of(int64_t place) const;  // of the adapter at the bank's place

  const model_config& cfg() const { return weights_.base->cfg; }
  serving_weights weights_;  // the base as the forward reads it
  const adapter_bank& bank_;
  kv_cache cache_;
  forward_scratch scratch_;  // the step's temporaries and logits
  std::vector<std::optional<int64_t>> slot_owner_;
  std::vector<std::unique_ptr<row>> rows_;
  std::map<int64_t, generation> done_;
  std::vector<int64_t> finished_early_;
  int64_t next_id_ = 0;
  std::vector<float> sample_weights_;                    // reused by sample()
  std::vector<std::pair<float, int64_t>> sample_buffer_;  // reused by sample() for top-k/p
  int64_t prefix_entries_ = 0;
  int64_t prefix_bytes_ = 0;  // 0: no limit but the entries'
  int64_t prefix_used_ = 0;
  // Least recently used first; and by adapter identity. A lookup scanned
  // every entry and each new entry searched all of them for the oldest:
  // O(entries) per admission, growing with serving.prefix_cache_entries.
  prefix_list prefixes_;
  std::unordered_multimap<uint64_t, prefix_list::iterator> prefix_index_;
  int64_t reused_tokens_ = 0, computed_tokens_ = 0;
  int64_t prefill_chunk_ = 0;
  std::unique_ptr<step_helper> helper_;
  int64_t helper_min_tokens_ = 0;
  std::optional<helper_policy> policy_;
  int64_t eligible_steps_ = 0, helped_steps_ = 0;
  std::vector<int64_t> started_;
};

// Convenience: every prompt at once, batched; results in order.
std::vector<generation> generate_all(const base_weights& base, const adapter_bank& bank,
                                     const std::vector<std::string>& prompts,
                                     const std::vector<int64_t>& adapters,
                                     const std::vector<sampling>& settings);

}  // namespace tailor::model
