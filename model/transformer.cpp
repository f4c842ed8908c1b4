#include "model/transformer.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>

#include "model/dense.hpp"
#include "model/huge_pages.hpp"
#include "model/row_kernels.hpp"
#include "model/step_helper.hpp"
#ifdef TAILOR_WITH_CUDA
#include "model/cuda/bgmv.hpp"
#endif

namespace tailor::model {

namespace {

torch::Tensor normal(std::vector<int64_t> shape, double std, torch::Generator& gen) {
  return torch::randn(shape, gen, torch::kFloat32) * std;
}

int64_t site_in(const model_config& c, int site) {
  return site == site_out ? 4 * c.d_model : c.d_model;
}

int64_t site_out_dim(const model_config& c, int site) {
  switch (site) {
    case site_qkv: return 3 * c.d_model;
    case site_fc: return 4 * c.d_model;
    default: return c.d_model;
  }
}

// x [.., in] -> (x A) B for one adapter.
torch::Tensor lora_single(const torch::Tensor& x, const lora_adapter::pair& p, double scale) {
  return torch::matmul(torch::matmul(x, p.a), p.b) * scale;
}

// The bank's bfloat16 factors as their raw bits, for our loops and kernels.
const uint16_t* bf16_bits(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

#ifdef TAILOR_WITH_CUDA
// add_lora_rows on a CUDA device, by our kernels (model/cuda/bgmv.cu):
// every token of a row uses the row's adapter, so a prefill's [B, T] tokens
// go as B * T rows of one launch.
void add_lora_rows_cuda(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                        const row_adapters& ra, torch::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
              x.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
              a.scalar_type() == torch::kBFloat16 && b.scalar_type() == torch::kBFloat16);
  const int64_t B = x.size(0), T = x.size(1), in = a.size(1), r = a.size(2), n_out = b.size(2);
  const auto longs = torch::TensorOptions().dtype(torch::kLong);
  auto places = torch::tensor(ra.rows, longs).repeat_interleave(T).to(x.device());
  auto ranks = torch::tensor(ra.ranks, longs).repeat_interleave(T).to(x.device());
  auto xc = x.reshape({B * T, in}).contiguous();
  auto xa = torch::empty({B * T, r}, x.options());
  auto err = cuda::bgmv(xc.data_ptr<float>(), bf16_bits(a), bf16_bits(b),
                        places.data_ptr<int64_t>(), ranks.data_ptr<int64_t>(),
                        out.data_ptr<float>(), xa.data_ptr<float>(), B * T, in, r, n_out, nullptr);
  TORCH_CHECK(err.empty(), err);
}
#endif

// Rows of x use different adapters (`ra`, factors of one layer and site: a
// [n + 1, in, r] with each place's A packed [in, rank], b [n + 1, r, out]);
// adds x·A·B of each row to `out` [B, T, out], reading the bank in place up
// to the row's own rank (the shape of Punica's BGMV). Every token of a row
// uses the row's adapter, so a prefill's tokens run the same loop as a
// decode step's rows (lora_rows: over inputs, then outputs, each output
// element once; rows that share an adapter read its B together). With
// Debian's MKL-less LibTorch, bmm issues one small product per row, and a
// gather plus multiply-and-sum copies [B, in, r] and [B, r, out] per step;
// products per row cost more in dispatch than the loop in arithmetic. The
// CUDA kernels compute the same sums one output element per thread
// (model/cuda/bgmv_math.hpp).
void add_lora_rows(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                   const row_adapters& ra, torch::Tensor& out) {
#ifdef TAILOR_WITH_CUDA
  if (x.is_cuda()) return add_lora_rows_cuda(x, a, b, ra, out);
#endif
  const auto xc = x.contiguous();
  TORCH_CHECK(out.is_contiguous() && a.is_contiguous() && b.is_contiguous() &&
              out.scalar_type() == torch::kFloat32 && xc.scalar_type() == torch::kFloat32 &&
              a.scalar_type() == torch::kBFloat16 && b.scalar_type() == torch::kBFloat16);
  const int64_t B = xc.size(0), T = xc.size(1), in = a.size(1), r = a.size(2),
                n_out = b.size(2);
  const float* xp = xc.data_ptr<float>();
  const uint16_t* ap = bf16_bits(a);
  const uint16_t* bp = bf16_bits(b);
  float* op = out.data_ptr<float>();
  // Token rows (row * T + t) by adapter place, in runs of up to lora_group
  // that share one: lora_rows reads the run's B once. A chunk that a step's
  // helper may take holds whole runs, lora_group rows at most: with a chunk
  // per run, most of them one row at 100 adapters, the step's hand-overs to
  // the helper rose by a fifth.
  TORCH_CHECK(static_cast<int64_t>(ra.rows.size()) == B, "add_lora_rows: ", ra.rows.size(),
              " rows' adapters for ", B, " rows");
  std::vector<int64_t> order;
  order.reserve(ra.by_place.size() * static_cast<std::size_t>(T));
  for (auto row : ra.by_place)
    for (int64_t t = 0; t < T; ++t) order.push_back(row * T + t);
  auto place_of = [&](int64_t token_row) {
    return ra.rows[static_cast<std::size_t>(token_row / T)];
  };
  std::vector<std::size_t> starts;  // each run's first index in `order`, then the end
  for (std::size_t i = 0; i < order.size(); ++i)
    if (i == 0 || place_of(order[i]) != place_of(order[i - 1]) ||
        static_cast<int64_t>(i - starts.back()) == lora_group)
      starts.push_back(i);
  starts.push_back(order.size());
  std::vector<std::size_t> chunks;  // each chunk's first run, then the end
  for (std::size_t run = 0; run + 1 < starts.size(); ++run)
    if (chunks.empty() ||
        starts[run + 1] - starts[chunks.back()] > static_cast<std::size_t>(lora_group))
      chunks.push_back(run);
  chunks.push_back(starts.size() - 1);
  parallel_chunks(static_cast<int64_t>(chunks.size()) - 1, [&](int64_t chunk) {
    for (auto run = chunks[static_cast<std::size_t>(chunk)];
         run < chunks[static_cast<std::size_t>(chunk) + 1]; ++run) {
      const auto begin = starts[run], end = starts[run + 1];
      const int64_t place = place_of(order[begin]);
      const int64_t rank = ra.ranks[static_cast<std::size_t>(order[begin] / T)];
      // The next run's factors start streams the hardware prefetcher has
      // not seen yet: ask for them while this run computes.
      if (end < order.size() && place_of(order[end]) != place) {
        const int64_t next = place_of(order[end]);
        const int64_t next_rank = ra.ranks[static_cast<std::size_t>(order[end] / T)];
        const uint16_t* na = ap + next * in * r;
        const uint16_t* nb = bp + next * r * n_out;
        for (int64_t i = 0; i < in * next_rank; i += 32) __builtin_prefetch(na + i);
        for (int64_t i = 0; i < n_out * next_rank; i += 32) __builtin_prefetch(nb + i);
      }
      const float* xs[lora_group];
      float* outs[lora_group];
      for (auto i = begin; i < end; ++i) {
        xs[i - begin] = xp + order[i] * in;
        outs[i - begin] = op + order[i] * n_out;
      }
      lora_rows(xs, static_cast<int64_t>(end - begin), ap + place * in * r,
                bp + place * r * n_out, in, rank, n_out, outs);
    }
  });
}

// A float tensor for a forward's temporary: from the scratch when the
// forward has one (a serving step), else from malloc.
torch::Tensor new_floats(forward_scratch* scratch, c10::IntArrayRef shape) {
  return scratch ? scratch->floats(shape) : torch::empty(shape);
}

// Attention of single query tokens: q [B, H, hd] (any strides) against the
// cache's keys and values [slots, H, context, hd] (last dim contiguous), row
// b reading slot slot[b] at positions 0..last[b]. Returns [B, 1, H * hd].
// The cache's values as the row kernels read them (float or float16 bits).
template <typename T>
T* cache_data(const torch::Tensor& t) {
  if constexpr (std::is_same_v<T, float>)
    return t.data_ptr<float>();
  else
    return reinterpret_cast<float16*>(t.data_ptr<c10::Half>());
}

template <typename T>
torch::Tensor decode_attention_of(const torch::Tensor& q, const torch::Tensor& K,
                                  const torch::Tensor& V, const std::vector<int64_t>& slot,
                                  const std::vector<int64_t>& last, double scale,
                                  forward_scratch* scratch) {
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2);
  auto y = new_floats(scratch, {B, 1, H * hd});
  float* yp = y.data_ptr<float>();
  // A view of the fused projection as a rule: read in place (a copy is one
  // more op per layer, which a batch of one feels).
  const auto qc = q.stride(2) == 1 ? q : q.contiguous();
  const float* qp = qc.data_ptr<float>();
  const auto qs = qc.strides();
  const T* kp = cache_data<T>(K);
  const T* vp = cache_data<T>(V);
  const auto ks = K.strides();
  const auto vs = V.strides();
  const auto sc = static_cast<float>(scale);
  // A row is a chunk a step's helper may take; each thread its own scores.
  parallel_chunks(B, [&](int64_t b) {
    thread_local std::vector<float> p;
    const int64_t n = last[static_cast<std::size_t>(b)] + 1;
    p.resize(static_cast<std::size_t>(n));
    const int64_t sb = slot[static_cast<std::size_t>(b)];
    for (int64_t h = 0; h < H; ++h) {
      const float* qr = qp + b * qs[0] + h * qs[1];
      const T* kb = kp + sb * ks[0] + h * ks[1];
      const T* vb = vp + sb * vs[0] + h * vs[1];
      attend(qr, kb, ks[2], vb, vs[2], n, hd, sc, p.data(), yp + (b * H + h) * hd);
    }
  });
  return y;
}

// A loop per (row, head) reads the cache in place, once; ATen's
// multiply-and-sum materializes [B, H, L, hd] twice per layer, and a gather
// of the rows' slots would copy them.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& K,
                               const torch::Tensor& V, const std::vector<int64_t>& slot,
                               const std::vector<int64_t>& last, double scale,
                               forward_scratch* scratch) {
  TORCH_CHECK(K.stride(3) == 1 && V.stride(3) == 1 && K.scalar_type() == V.scalar_type() &&
              q.scalar_type() == torch::kFloat32);
  if (K.scalar_type() == torch::kHalf)
    return decode_attention_of<float16>(q, K, V, slot, last, scale, scratch);
  TORCH_CHECK(K.scalar_type() == torch::kFloat32, "a key/value cache is float or half");
  return decode_attention_of<float>(q, K, V, slot, last, scale, scratch);
}

// Writes each token's keys or values (`x` [N, heads, head_dim], last
// dimension contiguous) into the cache `into` [slots, heads, context,
// head_dim] at its slot and position, converted to the cache's type.
template <typename T>
void write_cache_of(const torch::Tensor& x, const std::vector<int64_t>& slots,
                    const std::vector<int64_t>& positions, torch::Tensor& into) {
  const int64_t N = x.size(0), H = x.size(1), hd = x.size(2);
  const auto xs = x.strides();
  const auto cs = into.strides();
  const float* xp = x.data_ptr<float>();
  T* cp = cache_data<T>(into);
  for (int64_t n = 0; n < N; ++n) {
    const auto s = slots[static_cast<std::size_t>(n)], p = positions[static_cast<std::size_t>(n)];
    TORCH_CHECK(s >= 0 && s < into.size(0) && p >= 0 && p < into.size(2),
                "forward_tokens: slot ", s, " or position ", p, " outside the cache");
    for (int64_t h = 0; h < H; ++h) {
      const float* from = xp + n * xs[0] + h * xs[1];
      T* to = cp + s * cs[0] + h * cs[1] + p * cs[2];
      if constexpr (std::is_same_v<T, float>)
        std::copy(from, from + hd, to);
      else
        to_float16(from, hd, to);
    }
  }
}

void write_cache(const torch::Tensor& x, const std::vector<int64_t>& slots,
                 const std::vector<int64_t>& positions, torch::Tensor& into) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.stride(2) == 1 && into.stride(3) == 1);
  if (into.scalar_type() == torch::kHalf) return write_cache_of<float16>(x, slots, positions, into);
  TORCH_CHECK(into.scalar_type() == torch::kFloat32, "a key/value cache is float or half");
  write_cache_of<float>(x, slots, positions, into);
}

}  // namespace

std::map<std::string, std::string> model_config::to_metadata() const {
  return {{"n_layer", std::to_string(n_layer)},
          {"n_head", std::to_string(n_head)},
          {"d_model", std::to_string(d_model)},
          {"context", std::to_string(context)},
          {"vocab", std::to_string(vocab)}};
}

std::optional<model_config> model_config::from_metadata(const std::map<std::string, std::string>& m,
                                                        std::string& err) {
  model_config c;
  auto get = [&](const char* key, int64_t& out) {
    auto it = m.find(key);
    if (it == m.end()) {
      err = std::string("metadata has no ") + key;
      return false;
    }
    try {
      std::size_t used = 0;
      out = std::stoll(it->second, &used);
      if (used != it->second.size() || out <= 0) throw std::invalid_argument(key);
    } catch (const std::exception&) {
      err = std::string("metadata ") + key + " is not a positive integer";
      return false;
    }
    return true;
  };
  if (!get("n_layer", c.n_layer) || !get("n_head", c.n_head) || !get("d_model", c.d_model) ||
      !get("context", c.context) || !get("vocab", c.vocab))
    return std::nullopt;
  if (c.d_model % c.n_head != 0) {
    err = "d_model is not a multiple of n_head";
    return std::nullopt;
  }
  return c;
}

base_weights base_weights::init(const model_config& cfg, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto d = cfg.d_model;
  const double out_std = 0.02 / std::sqrt(2.0 * static_cast<double>(cfg.n_layer));
  base_weights w;
  w.cfg = cfg;
  w.wte = normal({cfg.vocab, d}, 0.02, gen);
  w.wpe = normal({cfg.context, d}, 0.01, gen);
  w.lnf_w = torch::ones({d});
  w.lnf_b = torch::zeros({d});
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    layer l;
    l.ln1_w = torch::ones({d});
    l.ln1_b = torch::zeros({d});
    l.qkv_w = normal({3 * d, d}, 0.02, gen);
    l.qkv_b = torch::zeros({3 * d});
    l.proj_w = normal({d, d}, out_std, gen);
    l.proj_b = torch::zeros({d});
    l.ln2_w = torch::ones({d});
    l.ln2_b = torch::zeros({d});
    l.fc_w = normal({4 * d, d}, 0.02, gen);
    l.fc_b = torch::zeros({4 * d});
    l.out_w = normal({d, 4 * d}, out_std, gen);
    l.out_b = torch::zeros({d});
    w.layers.push_back(std::move(l));
  }
  return w;
}

std::vector<std::pair<std::string, torch::Tensor*>> base_weights::named() {
  std::vector<std::pair<std::string, torch::Tensor*>> out = {
      {"wte", &wte}, {"wpe", &wpe}, {"ln_f.weight", &lnf_w}, {"ln_f.bias", &lnf_b}};
  for (std::size_t i = 0; i < layers.size(); ++i) {
    auto p = "h." + std::to_string(i) + ".";
    auto& l = layers[i];
    for (auto [n, t] : std::initializer_list<std::pair<const char*, torch::Tensor*>>{
             {"ln_1.weight", &l.ln1_w},
             {"ln_1.bias", &l.ln1_b},
             {"attn.qkv.weight", &l.qkv_w},
             {"attn.qkv.bias", &l.qkv_b},
             {"attn.proj.weight", &l.proj_w},
             {"attn.proj.bias", &l.proj_b},
             {"ln_2.weight", &l.ln2_w},
             {"ln_2.bias", &l.ln2_b},
             {"mlp.fc.weight", &l.fc_w},
             {"mlp.fc.bias", &l.fc_b},
             {"mlp.out.weight", &l.out_w},
             {"mlp.out.bias", &l.out_b}})
      out.emplace_back(p + n, t);
  }
  return out;
}

lora_adapter lora_adapter::shaped(const model_config& mc, const lora_config& lc) {
  lora_adapter ad;
  ad.cfg = lc;
  for (int64_t i = 0; i < mc.n_layer; ++i) {
    std::vector<pair> sites;
    for (int s = 0; s < ad.sites(); ++s)
      sites.push_back(
          {torch::empty({site_in(mc, s), lc.rank}), torch::empty({lc.rank, site_out_dim(mc, s)})});
    ad.layers.push_back(std::move(sites));
  }
  return ad;
}

lora_adapter lora_adapter::init(const model_config& mc, const lora_config& lc, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto ad = shaped(mc, lc);
  for (auto& sites : ad.layers)
    for (auto& p : sites) {
      const auto in = p.a.size(0);
      p.a = normal({in, lc.rank}, 1.0 / std::sqrt(static_cast<double>(in)), gen);
      p.b.zero_();
    }
  return ad;
}

std::vector<torch::Tensor> lora_adapter::parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& l : layers)
    for (const auto& p : l) {
      out.push_back(p.a);
      out.push_back(p.b);
    }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor*>> lora_adapter::named() {
  static const char* site_names[] = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.out"};
  std::vector<std::pair<std::string, torch::Tensor*>> out;
  for (std::size_t i = 0; i < layers.size(); ++i)
    for (std::size_t s = 0; s < layers[i].size(); ++s) {
      auto p = "h." + std::to_string(i) + "." + site_names[s] + ".lora_";
      out.emplace_back(p + "A", &layers[i][s].a);
      out.emplace_back(p + "B", &layers[i][s].b);
    }
  return out;
}

base_weights merge(const base_weights& base, const lora_adapter& adapter) {
  torch::NoGradGuard no_grad;
  base_weights m = base;
  m.layers.clear();
  for (std::size_t i = 0; i < base.layers.size(); ++i) {
    auto l = base.layers[i];
    auto delta = [&](int s) {
      return (torch::matmul(adapter.layers[i][s].a, adapter.layers[i][s].b) * adapter.scale()).t();
    };
    l.qkv_w = l.qkv_w + delta(site_qkv);
    l.proj_w = l.proj_w + delta(site_proj);
    if (adapter.cfg.mlp) {
      l.fc_w = l.fc_w + delta(site_fc);
      l.out_w = l.out_w + delta(site_out);
    }
    m.layers.push_back(std::move(l));
  }
  return m;
}

namespace {

// Identities of adapter weights in banks: fresh ones count up from 1; those
// made from a caller's key have the top bit set, so the two never meet.
constexpr uint64_t keyed_bit = uint64_t{1} << 63;
std::atomic<uint64_t> next_identity{1};
uint64_t fresh_identity() {
  return next_identity.fetch_add(1) & ~keyed_bit;
}

}  // namespace

namespace {

// Place `index` of one site's bank factors: A [n + 1, in, r] and B [n + 1,
// r, out] (CPU, bfloat16). Writes one site of a packed adapter (null: none)
// and zeroes the rest of the place. A copy: a device miss places an
// adapter on the batch loop's thread.
void put_factors(const torch::Tensor& a, const torch::Tensor& b, int64_t index,
                 const packed_adapter::site* p, int64_t rank) {
  TORCH_CHECK(a.is_cpu() && b.is_cpu() && a.is_contiguous() && b.is_contiguous() &&
              a.scalar_type() == torch::kBFloat16 && b.scalar_type() == torch::kBFloat16);
  const int64_t in = a.size(1), r = a.size(2), out = b.size(2);
  auto* ap = reinterpret_cast<uint16_t*>(a.data_ptr<at::BFloat16>()) + index * in * r;
  auto* bp = reinterpret_cast<uint16_t*>(b.data_ptr<at::BFloat16>()) + index * r * out;
  int64_t na = 0, nb = 0;  // values of the adapter's own
  if (p) {
    TORCH_CHECK(rank <= r && static_cast<int64_t>(p->a.size()) == in * rank &&
                static_cast<int64_t>(p->b.size()) == rank * out);
    na = in * rank;
    nb = rank * out;
    std::memcpy(ap, p->a.data(), static_cast<std::size_t>(na) * sizeof(uint16_t));
    std::memcpy(bp, p->b.data(), static_cast<std::size_t>(nb) * sizeof(uint16_t));
  }
  std::fill(ap + na, ap + in * r, uint16_t{0});
  std::fill(bp + nb, bp + r * out, uint16_t{0});
}

}  // namespace

packed_adapter packed_adapter::of(const lora_adapter& ad) {
  torch::NoGradGuard no_grad;
  packed_adapter p;
  p.cfg = ad.cfg;
  const auto s = static_cast<float>(ad.scale());
  for (const auto& layer : ad.layers) {
    auto& sites = p.layers.emplace_back();
    for (int k = 0; k < ad.sites(); ++k) {
      const auto fa = layer[static_cast<std::size_t>(k)].a.to(torch::kFloat32).contiguous();
      const auto fb = layer[static_cast<std::size_t>(k)].b.to(torch::kFloat32).contiguous();
      auto& site = sites.emplace_back();
      site.a.resize(static_cast<std::size_t>(fa.numel()));
      site.b.resize(static_cast<std::size_t>(fb.numel()));
      const float* pa = fa.data_ptr<float>();
      const float* pb = fb.data_ptr<float>();
      for (std::size_t i = 0; i < site.a.size(); ++i) site.a[i] = c10::BFloat16(pa[i]).x;
      for (std::size_t i = 0; i < site.b.size(); ++i) site.b[i] = c10::BFloat16(pb[i] * s).x;
    }
  }
  return p;
}

adapter_bank adapter_bank::build(const model_config& mc,
                                 const std::vector<const lora_adapter*>& adapters) {
  torch::NoGradGuard no_grad;
  adapter_bank bank;
  bank.size = static_cast<int64_t>(adapters.size());
  int64_t rank = 1;
  for (const auto* ad : adapters) {
    rank = std::max(rank, ad->cfg.rank);
    bank.mlp = bank.mlp || ad->cfg.mlp;
  }
  const int sites = bank.mlp ? 4 : 2;
  std::vector<packed_adapter> packed;
  for (const auto* ad : adapters) packed.push_back(packed_adapter::of(*ad));
  bank.a.resize(mc.n_layer);
  bank.b.resize(mc.n_layer);
  for (int64_t i = 0; i < mc.n_layer; ++i) {
    for (int s = 0; s < sites; ++s) {
      auto a = torch::zeros({bank.size + 1, site_in(mc, s), rank}, torch::kBFloat16);
      auto b = torch::zeros({bank.size + 1, rank, site_out_dim(mc, s)}, torch::kBFloat16);
      for (int64_t k = 0; k < bank.size; ++k) {
        const auto& p = packed[static_cast<std::size_t>(k)];
        if (s >= static_cast<int>(p.layers[i].size())) continue;
        put_factors(a, b, k + 1, &p.layers[i][s], p.cfg.rank);
      }
      bank.a[i].push_back(a);
      bank.b[i].push_back(b);
    }
  }
  bank.rank = rank;
  bank.ranks.assign(1, 0);
  for (const auto* ad : adapters) bank.ranks.push_back(ad->cfg.rank);
  bank.identities.assign(1, 0);
  for (std::size_t i = 0; i < adapters.size(); ++i) bank.identities.push_back(fresh_identity());
  return bank;
}

adapter_bank adapter_bank::make(const model_config& mc, int64_t capacity, int64_t rank, bool mlp) {
  adapter_bank bank;
  bank.size = capacity;
  bank.rank = rank;
  bank.ranks.assign(static_cast<std::size_t>(capacity) + 1, 0);
  bank.identities.assign(static_cast<std::size_t>(capacity) + 1, 0);
  bank.mlp = mlp;
  const int sites = mlp ? 4 : 2;
  bank.a.resize(mc.n_layer);
  bank.b.resize(mc.n_layer);
  for (int64_t i = 0; i < mc.n_layer; ++i)
    for (int s = 0; s < sites; ++s) {
      bank.a[i].push_back(
          huge_page_zeros({capacity + 1, site_in(mc, s), rank}, torch::kBFloat16));
      bank.b[i].push_back(
          huge_page_zeros({capacity + 1, rank, site_out_dim(mc, s)}, torch::kBFloat16));
    }
  return bank;
}

bool adapter_bank::set(int64_t index, const lora_adapter& ad, uint64_t key) {
  return set(index, packed_adapter::of(ad), key);
}

bool adapter_bank::set(int64_t index, const packed_adapter& p, uint64_t key) {
  if (index < 1 || index > size || p.cfg.rank > rank || (p.cfg.mlp && !mlp) ||
      p.layers.size() != a.size())
    return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t s = 0; s < a[i].size(); ++s)
      put_factors(a[i][s], b[i][s], index, s < p.layers[i].size() ? &p.layers[i][s] : nullptr,
                  p.cfg.rank);
  ranks[static_cast<std::size_t>(index)] = p.cfg.rank;
  identities[static_cast<std::size_t>(index)] = key != 0 ? key | keyed_bit : fresh_identity();
  return true;
}

void adapter_bank::clear(int64_t index) {
  if (index < 1 || index > size) return;
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t s = 0; s < a[i].size(); ++s) put_factors(a[i][s], b[i][s], index, nullptr, 0);
  ranks[static_cast<std::size_t>(index)] = 0;
  identities[static_cast<std::size_t>(index)] = 0;
}

uint64_t adapter_bank::identity_of_key(uint64_t key) {
  return key | keyed_bit;
}

kv_cache kv_cache::make(const model_config& cfg, int64_t slots, torch::ScalarType type) {
  TORCH_CHECK(type == torch::kFloat32 || type == torch::kHalf,
              "a key/value cache is float or half");
  kv_cache c;
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    c.k.push_back(huge_page_zeros({slots, cfg.n_head, cfg.context, cfg.head_dim()}, type));
    c.v.push_back(huge_page_zeros({slots, cfg.n_head, cfg.context, cfg.head_dim()}, type));
  }
  return c;
}

void copy_positions(const torch::Tensor& from, int64_t from_slot, const torch::Tensor& to,
                    int64_t to_slot, int64_t n) {
  TORCH_CHECK(from.dim() == 4 && to.dim() == 4 && from.size(1) == to.size(1) &&
                  from.size(3) == to.size(3) && from.scalar_type() == to.scalar_type(),
              "copy_positions: caches of different shapes or types");
  TORCH_CHECK(n >= 0 && n <= from.size(2) && n <= to.size(2) && from_slot >= 0 &&
                  from_slot < from.size(0) && to_slot >= 0 && to_slot < to.size(0),
              "copy_positions: slot or length outside the cache");
  if (n == 0 || (from_slot == to_slot && from.data_ptr() == to.data_ptr())) return;
  const bool plain = from.is_cpu() && to.is_cpu() && from.stride(3) == 1 && to.stride(3) == 1 &&
                     from.stride(2) == from.size(3) && to.stride(2) == to.size(3);
  if (!plain) {
    to[to_slot].narrow(1, 0, n).copy_(from[from_slot].narrow(1, 0, n));
    return;
  }
  const auto item = static_cast<int64_t>(from.element_size());
  const auto bytes = static_cast<std::size_t>(n * from.size(3) * item);
  const auto* src = static_cast<const char*>(from.data_ptr()) + from_slot * from.stride(0) * item;
  auto* dst = static_cast<char*>(to.data_ptr()) + to_slot * to.stride(0) * item;
  for (int64_t h = 0; h < from.size(1); ++h)
    std::memcpy(dst + h * to.stride(1) * item, src + h * from.stride(1) * item, bytes);
}

torch::Tensor forward_single(const base_weights& w, const lora_adapter* ad,
                             const torch::Tensor& tokens, int64_t first_position) {
  const auto& c = w.cfg;
  const int64_t B = tokens.size(0), T = tokens.size(1), H = c.n_head, hd = c.head_dim(),
                D = c.d_model;
  auto x = w.wte.index_select(0, tokens.reshape({-1})).view({B, T, D}) +
           w.wpe.narrow(0, first_position, T);
  auto causal = torch::ones({T, T}, torch::kBool).tril();
  const double scale = ad ? ad->scale() : 0.0;
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    const auto& l = w.layers[i];
    auto h = torch::layer_norm(x, {D}, l.ln1_w, l.ln1_b, 1e-5);
    auto qkv = torch::linear(h, l.qkv_w, l.qkv_b);
    if (ad) qkv = qkv + lora_single(h, ad->layers[i][site_qkv], scale);
    auto parts = qkv.split(D, -1);
    auto q = parts[0].view({B, T, H, hd}).transpose(1, 2);
    auto k = parts[1].view({B, T, H, hd}).transpose(1, 2);
    auto v = parts[2].view({B, T, H, hd}).transpose(1, 2);
    auto att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
    att =
        att.masked_fill(causal.logical_not(), -std::numeric_limits<float>::infinity()).softmax(-1);
    auto y = torch::matmul(att, v).transpose(1, 2).reshape({B, T, D});
    auto proj = torch::linear(y, l.proj_w, l.proj_b);
    if (ad) proj = proj + lora_single(y, ad->layers[i][site_proj], scale);
    x = x + proj;
    auto h2 = torch::layer_norm(x, {D}, l.ln2_w, l.ln2_b, 1e-5);
    auto f = torch::linear(h2, l.fc_w, l.fc_b);
    if (ad && ad->cfg.mlp) f = f + lora_single(h2, ad->layers[i][site_fc], scale);
    f = torch::gelu(f);
    auto o = torch::linear(f, l.out_w, l.out_b);
    if (ad && ad->cfg.mlp) o = o + lora_single(f, ad->layers[i][site_out], scale);
    x = x + o;
  }
  x = torch::layer_norm(x, {D}, w.lnf_w, w.lnf_b, 1e-5);
  return torch::linear(x, w.wte);
}

namespace {

void sort_by_place(row_adapters& ra) {
  ra.by_place.clear();
  for (std::size_t i = 0; i < ra.ranks.size(); ++i)
    if (ra.ranks[i] > 0) ra.by_place.push_back(static_cast<int64_t>(i));  // else no adapter
  std::sort(ra.by_place.begin(), ra.by_place.end(), [&](int64_t l, int64_t r) {
    return std::pair(ra.rows[static_cast<std::size_t>(l)], l) <
           std::pair(ra.rows[static_cast<std::size_t>(r)], r);
  });
}

}  // namespace

row_adapters row_adapters::of(const adapter_bank& bank, std::vector<int64_t> rows) {
  row_adapters ra;
  ra.mlp = bank.mlp;
  if (bank.size == 0) return ra;
  ra.a = bank.a;  // shallow: the same storage
  ra.b = bank.b;
  for (auto place : rows) {
    TORCH_CHECK(place >= 0 && place <= bank.size, "adapter place ", place, " outside the bank");
    ra.ranks.push_back(bank.ranks[static_cast<std::size_t>(place)]);
  }
  ra.rows = std::move(rows);
  sort_by_place(ra);
  return ra;
}

row_adapters row_adapters::subset(const std::vector<int64_t>& keep) const {
  row_adapters out;
  out.a = a;
  out.b = b;
  out.mlp = mlp;
  if (!rows.empty())
    for (auto k : keep) {
      out.rows.push_back(rows[static_cast<std::size_t>(k)]);
      out.ranks.push_back(ranks[static_cast<std::size_t>(k)]);
    }
  sort_by_place(out);
  return out;
}

const char* product_name(product_kind k) {
  switch (k) {
    case product_kind::amx:
      return "amx";
    case product_kind::bfloat16:
      return "bfloat16";
    case product_kind::float32:
      break;
  }
  return "float32";
}

product_kind runnable_products(product_kind wanted) {
  if (wanted == product_kind::amx && !dense_bf16_supported(bf16_isa::amx))
    wanted = product_kind::bfloat16;
  if (wanted == product_kind::bfloat16 && !dense_bf16_supported(bf16_isa::dot))
    wanted = product_kind::float32;
  return wanted;
}

serving_weights serving_weights::of(const base_weights& base, product_kind wanted) {
  torch::NoGradGuard no_grad;  // copies for inference, whatever the base's flags
  serving_weights w;
  w.base = &base;
  w.products = runnable_products(wanted);
  const bool packed = w.products != product_kind::float32;
  auto t = [&](const torch::Tensor& m) {
    matrix out{m.t().contiguous().to(torch::kFloat32), {}};
    if (packed)
      out.packed = packed_bf16(out.t.data_ptr<float>(), out.t.size(0), out.t.size(1));
    return out;
  };
  for (const auto& l : base.layers)
    w.layers.push_back({t(l.qkv_w), t(l.proj_w), t(l.fc_w), t(l.out_w)});
  w.head = t(base.wte);
  return w;
}

namespace {

// x [.., in] times the matrix `w` [out, in] (`m` is it transposed, and
// packed for bfloat16 products if they are on), plus `b` unless undefined:
// dense() or dense_bf16() (as `kind` says) for float tensors on the CPU,
// LibTorch for any other device.
torch::Tensor product(const torch::Tensor& x, const serving_weights::matrix& m,
                      const torch::Tensor& w, const torch::Tensor& b, product_kind kind,
                      forward_scratch* scratch) {
  if (!x.is_cpu() || x.scalar_type() != torch::kFloat) return torch::linear(x, w, b);
  auto xc = x.contiguous();
  const int64_t in = m.t.size(0), out = m.t.size(1);
  auto shape = x.sizes().vec();
  shape.back() = out;
  auto y = new_floats(scratch, shape);
  const float* bias = b.defined() ? b.data_ptr<float>() : nullptr;
  if (!m.packed.empty())
    dense_bf16(kind == product_kind::amx ? bf16_isa::amx : bf16_isa::dot, xc.data_ptr<float>(),
               xc.numel() / in, in, m.packed.data(), out, bias, y.data_ptr<float>());
  else
    dense(xc.data_ptr<float>(), xc.numel() / in, in, m.t.data_ptr<float>(), out, bias,
          y.data_ptr<float>());
  return y;
}

// The serving forward's small element-wise steps as plain loops over float
// tensors on the CPU: through LibTorch each is a dispatch and an
// allocation, and the layer norms, embeddings and residual sums were a
// tenth of a serving step (perf, docs/measurements.md). Other devices and
// types go through LibTorch.
bool plain_floats(const torch::Tensor& t) {
  return t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous();
}

// LayerNorm over the last dimension, each row by layer_norm_row.
torch::Tensor norm_rows(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                        forward_scratch* scratch) {
  const int64_t D = x.size(-1);
  if (!plain_floats(x) || !plain_floats(w) || !plain_floats(b))
    return torch::layer_norm(x, {D}, w, b, 1e-5);
  auto out = new_floats(scratch, x.sizes());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0, rows = x.numel() / D; r < rows; ++r)
    layer_norm_row(xp + r * D, D, wp, bp, 1e-5f, op + r * D);
  return out;
}

// sum + x, written into `sum` (a product's fresh output) and returned.
torch::Tensor add_residual(const torch::Tensor& x, torch::Tensor sum) {
  if (!plain_floats(x) || !plain_floats(sum) || x.sizes() != sum.sizes()) return x + sum;
  const float* xp = x.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) sp[i] += xp[i];
  return sum;
}

// [N, 1, D]: each token's embedding plus its position's.
torch::Tensor embed(const base_weights& w, const std::vector<int64_t>& tokens,
                    const std::vector<int64_t>& positions, forward_scratch* scratch) {
  const auto N = static_cast<int64_t>(tokens.size());
  const int64_t D = w.cfg.d_model;
  if (!plain_floats(w.wte) || !plain_floats(w.wpe)) {
    const auto longs = torch::TensorOptions().dtype(torch::kLong);
    return (w.wte.index_select(0, torch::tensor(tokens, longs).to(w.wte.device())) +
            w.wpe.index_select(0, torch::tensor(positions, longs).to(w.wpe.device())))
        .view({N, 1, D});
  }
  auto x = new_floats(scratch, {N, 1, D});
  const float *te = w.wte.data_ptr<float>(), *pe = w.wpe.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const auto t = tokens[static_cast<std::size_t>(n)], p = positions[static_cast<std::size_t>(n)];
    TORCH_CHECK(t >= 0 && t < w.wte.size(0) && p >= 0 && p < w.wpe.size(0),
                "forward_tokens: token ", t, " or position ", p, " outside the model");
    for (int64_t d = 0; d < D; ++d) xp[n * D + d] = te[t * D + d] + pe[p * D + d];
  }
  return x;
}

// Layer i's query, key and value of x [.., D] (split along the last
// dimension), with the rows' adapters (`ga`, empty for none: then no LoRA
// op runs at all, the plain dense model).
std::vector<torch::Tensor> qkv_of(const serving_weights& w, const row_adapters& ga, std::size_t i,
                                  const torch::Tensor& x, forward_scratch* scratch) {
  const auto& l = w.base->layers[i];
  const int64_t D = x.size(-1);
  auto h = norm_rows(x, l.ln1_w, l.ln1_b, scratch);
  auto qkv = product(h, w.layers[i].qkv, l.qkv_w, l.qkv_b, w.products, scratch);
  if (!ga.a.empty()) add_lora_rows(h, ga.a[i][site_qkv], ga.b[i][site_qkv], ga, qkv);
  return qkv.split(D, -1);
}

// The rest of layer i of a batched forward once attention gave y: the
// output projection and the MLP, each with the rows' adapters (`ga`, empty
// for none), and their residuals; returns the layer's output.
torch::Tensor after_attention(const serving_weights& w, const row_adapters& ga, std::size_t i,
                              const torch::Tensor& x_in, const torch::Tensor& y,
                              forward_scratch* scratch) {
  const auto& l = w.base->layers[i];
  const auto& lt = w.layers[i];
  const bool lora = !ga.a.empty();
  auto proj = product(y, lt.proj, l.proj_w, l.proj_b, w.products, scratch);
  if (lora) add_lora_rows(y, ga.a[i][site_proj], ga.b[i][site_proj], ga, proj);
  auto x = add_residual(x_in, proj);
  auto h2 = norm_rows(x, l.ln2_w, l.ln2_b, scratch);
  auto f = product(h2, lt.fc, l.fc_w, l.fc_b, w.products, scratch);
  if (lora && ga.mlp) add_lora_rows(h2, ga.a[i][site_fc], ga.b[i][site_fc], ga, f);
  // In place by our loop: torch::gelu goes through oneDNN, whose set-up per
  // call was a sixth of a one-row step (perf, bm_decode_step_bf16/1).
  if (f.is_cpu() && f.is_contiguous() && f.scalar_type() == torch::kFloat32) {
    // By eights of rows, the chunks a step's helper may take.
    const int64_t width = f.size(-1), rows = f.numel() / width;
    float* fp = f.data_ptr<float>();
    parallel_chunks((rows + 7) / 8, [&](int64_t c) {
      gelu(fp + c * 8 * width, (std::min(rows, (c + 1) * 8) - c * 8) * width);
    });
  } else
    f = torch::gelu(f);
  auto o = product(f, lt.out, l.out_w, l.out_b, w.products, scratch);
  if (lora && ga.mlp) add_lora_rows(f, ga.a[i][site_out], ga.b[i][site_out], ga, o);
  return add_residual(x, o);
}

// Rows `rows` of t along its first dimension (each row's elements
// contiguous, as in a view of a fused projection), into the scratch by a
// memcpy each; through index_select without one.
torch::Tensor select_rows(const torch::Tensor& t, const std::vector<int64_t>& rows,
                          forward_scratch* scratch) {
  if (!scratch || !t.is_cpu() || t.scalar_type() != torch::kFloat || !t[0].is_contiguous())
    return t.index_select(0, torch::tensor(rows, torch::TensorOptions().dtype(torch::kLong)));
  auto sizes = t.sizes().vec();
  sizes[0] = static_cast<int64_t>(rows.size());
  auto out = scratch->floats(sizes);
  const int64_t width = t.numel() / t.size(0);
  const float* from = t.data_ptr<float>();
  float* to = out.data_ptr<float>();
  for (std::size_t k = 0; k < rows.size(); ++k)
    std::memcpy(to + static_cast<int64_t>(k) * width, from + rows[k] * t.stride(0),
                static_cast<std::size_t>(width) * sizeof(float));
  return out;
}

}  // namespace

void forward_scratch::begin() {
  // The last forward outgrew the buffer: one block for all of it from now on.
  if (blocks_.size() > 1) blocks_.assign(1, huge_page_zeros({taken_}, torch::kFloat32));
  used_ = 0;
  taken_ = 0;
}

torch::Tensor forward_scratch::floats(c10::IntArrayRef shape) {
  const int64_t n = c10::multiply_integers(shape);
  const int64_t padded = (n + 15) / 16 * 16;  // the next tensor 64-byte aligned too
  if (blocks_.empty() || used_ + padded > blocks_.back().numel()) {
    blocks_.push_back(huge_page_zeros({std::max(padded, min_floats_)}, torch::kFloat32));
    used_ = 0;
  }
  float* p = blocks_.back().data_ptr<float>() + used_;
  used_ += padded;
  taken_ += padded;
  // ATen's from_blob: torch::from_blob also wraps it for autograd (a copy of
  // its metadata), which a forward in inference mode never uses.
  return at::from_blob(p, shape, at::TensorOptions().dtype(at::kFloat));
}

int64_t forward_scratch::capacity_bytes() const {
  int64_t floats = 0;
  for (const auto& b : blocks_) floats += b.numel();
  return floats * static_cast<int64_t>(sizeof(float));
}

// A [B, T] batch is a ragged one whose rows all have T tokens.
torch::Tensor forward_batched(const base_weights& w, const adapter_bank& bank,
                              const torch::Tensor& idx, const torch::Tensor& tokens,
                              const torch::Tensor& start, const torch::Tensor& slots,
                              kv_cache& cache, const torch::Tensor& logits_at) {
  auto values = [](const torch::Tensor& t) {
    auto c = t.to(torch::kLong).contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  };
  const int64_t B = tokens.size(0), T = tokens.size(1);
  const auto rows = values(idx), flat = values(tokens), first = values(start),
             slot = values(slots);
  const auto at = logits_at.defined() ? values(logits_at) : std::vector<int64_t>{};
  std::vector<int64_t> places, positions, slot_of, wanted;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const auto k = static_cast<std::size_t>(b);
      places.push_back(rows[k]);
      positions.push_back(first[k] + t);
      slot_of.push_back(slot[k]);
      if (at.empty() || at[k] == t) wanted.push_back(b * T + t);
    }
  auto logits = forward_tokens(serving_weights::of(w), row_adapters::of(bank, std::move(places)),
                               flat, positions, slot_of, cache, wanted);
  return logits.view({B, at.empty() ? T : 1, logits.size(1)});
}

torch::Tensor forward_tokens(const serving_weights& sw, const row_adapters& ga,
                             const std::vector<int64_t>& tokens,
                             const std::vector<int64_t>& positions,
                             const std::vector<int64_t>& slots, kv_cache& cache,
                             const std::vector<int64_t>& logits_of, forward_scratch* scratch) {
  c10::InferenceMode guard;
  if (scratch) scratch->begin();
  const auto& w = *sw.base;
  const auto& c = w.cfg;
  const auto N = static_cast<int64_t>(tokens.size());
  const int64_t H = c.n_head, hd = c.head_dim(), D = c.d_model;
  TORCH_CHECK(positions.size() == tokens.size() && slots.size() == tokens.size(),
              "forward_tokens: tokens, positions and slots differ in length");
  TORCH_CHECK(std::adjacent_find(logits_of.begin(), logits_of.end(), std::greater_equal<>()) ==
                      logits_of.end() &&
                  (logits_of.empty() || (logits_of.front() >= 0 && logits_of.back() < N)),
              "forward_tokens: logits_of must be increasing indices into the tokens");
  auto x = embed(w, tokens, positions, scratch);
  const double inv_sqrt = 1.0 / std::sqrt(static_cast<double>(hd));
  // Past the last layer's keys and values, only the tokens whose logits are
  // wanted matter: a prompt's other tokens skip that layer's attention,
  // projection and MLP (the logits are the same).
  const bool all_wanted = static_cast<int64_t>(logits_of.size()) == N;
  std::vector<int64_t> wanted_slots, wanted_positions;
  row_adapters wanted_ga;  // made only when some tokens are left out
  if (!all_wanted) {
    wanted_ga = ga.subset(logits_of);
    for (auto n : logits_of) {
      const auto k = static_cast<std::size_t>(n);
      wanted_slots.push_back(slots[k]);
      wanted_positions.push_back(positions[k]);
    }
  }
  for (std::size_t i = 0; i < w.layers.size(); ++i) {
    auto parts = qkv_of(sw, ga, i, x, scratch);
    // Every token's key and value go in first, so that a prompt's tokens
    // attend to the earlier ones of the same forward.
    write_cache(parts[1].view({N, H, hd}), slots, positions, cache.k[i]);
    write_cache(parts[2].view({N, H, hd}), slots, positions, cache.v[i]);
    auto q = parts[0].view({N, H, hd});
    if (i + 1 < w.layers.size() || all_wanted) {
      auto y = decode_attention(q, cache.k[i], cache.v[i], slots, positions, inv_sqrt, scratch);
      x = after_attention(sw, ga, i, x, y, scratch);
    } else {
      auto y = decode_attention(select_rows(q, logits_of, scratch), cache.k[i], cache.v[i],
                                wanted_slots, wanted_positions, inv_sqrt, scratch);
      x = after_attention(sw, wanted_ga, i, select_rows(x, logits_of, scratch), y, scratch);
    }
  }
  x = norm_rows(x.view({-1, D}), w.lnf_w, w.lnf_b, scratch);
  return product(x, sw.head, w.wte, {}, sw.products, scratch);
}

}  // namespace tailor::model
