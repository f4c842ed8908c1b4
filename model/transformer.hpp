#pragma once

// The base model family (GPT-2 style: pre-norm, learned positions, causal
// self-attention, GELU MLP) and LoRA adapters, as plain tensors so that the
// base can be shared read-only and adapters stacked into banks for one
// batched forward over rows that each use a different adapter.
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tailor::model {

struct model_config {
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t d_model = 256;
  int64_t context = 256;
  int64_t vocab = 257;  // bytes + end-of-text

  int64_t head_dim() const { return d_model / n_head; }
  // Weights of the matrix products every token goes through (each layer's
  // QKV, attention output and two MLP projections, and the output head tied
  // to the embeddings): what a one-row serving step reads, and what
  // batching shares between rows.
  int64_t product_params() const {
    return n_layer * 12 * d_model * d_model + d_model * vocab;
  }
  std::map<std::string, std::string> to_metadata() const;
  // Reads a config from safetensors metadata; an error message on failure.
  static std::optional<model_config> from_metadata(const std::map<std::string, std::string>& m,
                                                   std::string& err);
};

// The frozen, shared base model.
struct base_weights {
  struct layer {
    torch::Tensor ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w,
        out_b;
  };
  model_config cfg;
  torch::Tensor wte, wpe, lnf_w, lnf_b;  // the output head is tied to wte
  std::vector<layer> layers;

  static base_weights init(const model_config& cfg, uint64_t seed);
  // Every tensor with its safetensors name.
  std::vector<std::pair<std::string, torch::Tensor*>> named();
};

// Where adapters attach: the attention projections, optionally the MLP.
enum site : int { site_qkv = 0, site_proj = 1, site_fc = 2, site_out = 3 };

struct lora_config {
  int64_t rank = 8;
  double alpha = 16.0;
  bool mlp = false;
};

// One user's adapter: per layer and site, A [in, rank] and B [rank, out];
// the projection becomes W x + (alpha / rank) * (x A) B.
struct lora_adapter {
  struct pair {
    torch::Tensor a, b;
  };
  lora_config cfg;
  std::vector<std::vector<pair>> layers;  // [layer][site]; sites beyond 2 only with mlp

  // A ~ small random, B = 0: a fresh adapter leaves the base unchanged.
  static lora_adapter init(const model_config& mc, const lora_config& lc, uint64_t seed);
  // Factors of the right shapes, uninitialised: for a loader that fills them all.
  static lora_adapter shaped(const model_config& mc, const lora_config& lc);
  double scale() const { return cfg.alpha / static_cast<double>(cfg.rank); }
  int sites() const { return cfg.mlp ? 4 : 2; }
  std::vector<torch::Tensor> parameters() const;
  std::vector<std::pair<std::string, torch::Tensor*>> named();
};

// The base with one adapter folded into its weights: the reference that a
// batched forward must equal, and the "merged" serving baseline.
base_weights merge(const base_weights& base, const lora_adapter& adapter);

// One adapter's factors as a bank place holds them: bfloat16 bits (rounded
// to nearest even), A [in, rank] and B [rank, out] with the scale folded in
// (multiplied in float), per layer and site. Packing converts; placing a
// packed adapter in a bank copies, so the host tier keeps adapters packed
// and a device miss costs the batch loop a copy (bm_place_adapter).
struct packed_adapter {
  struct site {
    std::vector<uint16_t> a, b;
  };
  lora_config cfg;
  std::vector<std::vector<site>> layers;  // [layer][site]
  static packed_adapter of(const lora_adapter& adapter);
};

// Adapters stacked for the batched forward. Row index 0 is "no adapter"
// (zeros); adapter i of `build` is index i + 1. Factors are kept in
// bfloat16, as GPU LoRA servers keep them: a decode step reads every row's
// factors, and at many adapters that read is what a step waits for; sums
// stay in float. Ranks may differ: a place holds its A packed [in, rank] at
// its start (a row reads no padding), and its B's first rank rows, with its
// own scale folded in.
struct adapter_bank {
  // [layer][site] -> bfloat16 A [n + 1, in, r] (each place packed [in, rank]), B [n + 1, r, out]
  std::vector<std::vector<torch::Tensor>> a, b;
  std::vector<int64_t> ranks;  // per place (0: empty): a decode step skips the padding
  // Per place, which adapter weights it holds: what was computed with them
  // (cached prompt keys and values) is valid wherever and whenever the same
  // identity is placed again, and only then. 0: no adapter.
  std::vector<uint64_t> identities;
  int64_t size = 0;  // adapters, not counting index 0
  bool mlp = false;
  int64_t rank = 0;  // of the stacked factors: the largest rank a place holds

  static adapter_bank build(const model_config& mc,
                            const std::vector<const lora_adapter*>& adapters);
  // `capacity` empty places (indices 1..capacity) for adapters of rank at
  // most `rank`, to be filled and refilled with set() (a serving cache).
  static adapter_bank make(const model_config& mc, int64_t capacity, int64_t rank, bool mlp);
  // Puts `adapter` at `index` (1..size); false when it does not fit the bank
  // (rank above the bank's, or MLP sites in a bank without them). `key`
  // names the adapter's weights (the same key must always mean the same
  // weights, e.g. a hash of an immutable model id); 0 gives it an identity
  // of its own that no other set() shares.
  bool set(int64_t index, const lora_adapter& adapter, uint64_t key = 0);
  bool set(int64_t index, const packed_adapter& adapter, uint64_t key = 0);
  // Empties `index` (1..size): its factors zeroed, so that the weights of
  // an adapter that must go (its user was deleted) do not stay in memory.
  void clear(int64_t index);
  // The identity set() gives the adapter of `key` (not 0).
  static uint64_t identity_of_key(uint64_t key);
};

// The adapters of a batch's rows: the bank's factors read in place at each
// row's place (nothing is copied per step; Punica's BGMV reads the same
// way). Valid while the bank's places used by `rows` keep their adapters.
struct row_adapters {
  // [layer][site]: the bank's A and B (adapter_bank's layout); empty: no adapters
  std::vector<std::vector<torch::Tensor>> a, b;
  std::vector<int64_t> rows;   // each row's place in the bank
  std::vector<int64_t> ranks;  // each row's adapter rank (0: none)
  // The rows that have an adapter, by place (then row): the order in which
  // add_lora_rows runs them, so that rows sharing an adapter are neighbours.
  // Sorted once here, not at each layer and site of a forward.
  std::vector<int64_t> by_place;
  bool mlp = false;
  static row_adapters of(const adapter_bank& bank, std::vector<int64_t> rows);
  // The same adapters for the rows `keep` (indices into `rows`), in its order.
  row_adapters subset(const std::vector<int64_t>& keep) const;
};

// Per-sequence key/value cache for `slots` sequences of up to cfg.context
// tokens, in float or, at half the memory and reads, in IEEE half (kHalf):
// the forward computes in float and rounds what it stores.
struct kv_cache {
  std::vector<torch::Tensor> k, v;  // [layer] -> [slots, heads, context, head_dim]
  static kv_cache make(const model_config& cfg, int64_t slots,
                       torch::ScalarType type = torch::kFloat32);
};

// Copies positions [0, n) of every head from slot `from_slot` of `from` to
// slot `to_slot` of `to`, both [slots, heads, length, head_dim] of one type
// (a cache layer, or a prefix entry of one slot). A memcpy per head: a step
// moves a few rows' caches, and ATen's copy of such a strided half view
// cost ~9 us each, a tenth of a serving step (perf, docs/measurements.md).
void copy_positions(const torch::Tensor& from, int64_t from_slot, const torch::Tensor& to,
                    int64_t to_slot, int64_t n);

// Logits [B, T, vocab] of B independent sequences, with one adapter (or none)
// applied unmerged; differentiable (training). Tokens sit at positions
// first_position .. first_position + T - 1.
torch::Tensor forward_single(const base_weights& base, const lora_adapter* adapter,
                             const torch::Tensor& tokens, int64_t first_position = 0);

// The base as the serving forward reads it: its matrices also transposed
// to [in, out], the layout of dense() (model/dense.hpp), whose products do
// not depend on the batch. Built once per batch generator; it refers to
// `base`, which must outlive it and not change.
//
// `products` says how it computes the products (serving.products): in
// float over `t`, or on bfloat16 inputs over packed copies of the matrices
// (`packed`), with AVX-512 BF16's dot product (`bfloat16`, twice the
// multiply-adds per cycle of float) or AMX's tiles (`amx`, 6-7x `bfloat16`
// from 16 rows, ~0.85x at one): see dense_bf16.
enum class product_kind { float32, bfloat16, amx };
const char* product_name(product_kind k);  // "float32", "bfloat16", "amx"
// `wanted` where this machine runs it, else the next one down: amx, then
// bfloat16, then float32.
product_kind runnable_products(product_kind wanted);
struct serving_weights {
  struct matrix {
    torch::Tensor t;                // [in, out]
    std::vector<uint16_t> packed;  // packed_bf16(t), when the products are bfloat16
  };
  struct layer {
    matrix qkv, proj, fc, out;
  };
  const base_weights* base = nullptr;
  std::vector<layer> layers;
  matrix head;  // wte transposed: [d_model, vocab]
  product_kind products = product_kind::float32;  // what runs: runnable_products(wanted)
  static serving_weights of(const base_weights& base,
                            product_kind wanted = product_kind::float32);
};

// The batched multi-adapter forward over a rectangle of tokens (forward_tokens
// below, with every row T tokens long): rows `slots` of the cache, each with
// its adapter index `adapter_idx` (into `bank`), T new `tokens` per row
// starting at position `start` (per row). Writes the new keys/values into
// the cache and returns logits [B, T, vocab]; with `logits_at` ([B], an
// index into T per row) only those, [B, 1, vocab]. It prepares the base
// (serving_weights) on every call: for tests and tools, not a serving loop.
torch::Tensor forward_batched(const base_weights& base, const adapter_bank& bank,
                              const torch::Tensor& adapter_idx, const torch::Tensor& tokens,
                              const torch::Tensor& start, const torch::Tensor& slots,
                              kv_cache& cache, const torch::Tensor& logits_at = {});

// Memory for a forward's temporaries, reused forward after forward: each
// is a view of one buffer, from its start again at every begin(), so that
// once the buffer has grown to the largest step a serving step allocates
// no activations. Through malloc each of a step's ~20 temporaries was a
// search of a heap that the cached prompts and adapters had fragmented:
// 5 % of the batch loop at 1,000 adapters (perf, docs/measurements.md). A
// tensor it gives is valid until the next begin() and must not outlive it.
class forward_scratch {
 public:
  // Blocks of at least `min_floats` (a step of tailor-base takes ~3.6k a token).
  explicit forward_scratch(int64_t min_floats = int64_t{1} << 16) : min_floats_(min_floats) {}
  // A new forward; what the last one took is reused from here on. Its
  // overflow blocks, if it took more than the buffer held, become one.
  void begin();
  // An uninitialized float tensor of `shape`, 64-byte aligned.
  torch::Tensor floats(c10::IntArrayRef shape);
  int64_t capacity_bytes() const;

 private:
  int64_t min_floats_;
  std::vector<torch::Tensor> blocks_;  // the buffer, then this forward's overflow
  int64_t used_ = 0;                   // floats taken from the last block
  int64_t taken_ = 0;                  // floats taken since begin()
};

// One forward over tokens of several sequences (a continuous batch's step:
// the next token of each decoding row and the prompt tokens of rows joining
// it). Token n is tokens[n] at position positions[n] of cache slot
// slots[n], with adapter adapters.rows[n]; its key and value go into the
// cache and it attends to its slot's positions 0..positions[n], so a
// prompt's tokens see the earlier ones of the same forward. A sequence's
// positions must follow what its slot already holds. Returns the logits
// [logits_of.size(), vocab] of the tokens logits_of (increasing indices
// into tokens);
// the others stop at the last layer's keys and values, which is all later
// tokens need of them. With `scratch`, its temporaries and the logits come
// from it (the logits valid until its next begin()); without, from malloc.
torch::Tensor forward_tokens(const serving_weights& weights, const row_adapters& adapters,
                             const std::vector<int64_t>& tokens,
                             const std::vector<int64_t>& positions,
                             const std::vector<int64_t>& slots, kv_cache& cache,
                             const std::vector<int64_t>& logits_of,
                             forward_scratch* scratch = nullptr);

}  // namespace tailor::model
