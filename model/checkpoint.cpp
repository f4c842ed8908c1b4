#include "model/checkpoint.hpp"

#include <cstring>

#include "storage/artifacts.hpp"
#include "storage/safetensors.hpp"

namespace tailor::model {

namespace {

using storage::errc;

caf::expected<std::vector<std::byte>> encode_named(
    const std::vector<std::pair<std::string, torch::Tensor*>>& named,
    const std::map<std::string, std::string>& metadata) {
  std::vector<torch::Tensor> keep;  // contiguous float copies outlive the spans below
  std::vector<storage::tensor_to_write> out;
  for (const auto& [name, t] : named) {
    auto c = t->detach().to(torch::kFloat32).contiguous();
    keep.push_back(c);
    out.push_back({name,
                   storage::dtype::f32,
                   c.sizes().vec(),
                   {reinterpret_cast<const std::byte*>(c.data_ptr<float>()),
                    static_cast<std::size_t>(c.numel()) * 4}});
  }
  return storage::encode_safetensors(out, metadata);
}

caf::error save_named(const std::string& path,
                      const std::vector<std::pair<std::string, torch::Tensor*>>& named,
                      const std::map<std::string, std::string>& metadata) {
  auto bytes = encode_named(named, metadata);
  if (!bytes) return bytes.error();
  return storage::write_file_atomic(path, *bytes);
}

std::map<std::string, std::string> adapter_metadata(
    const lora_adapter& adapter, const model_config& cfg,
    const std::map<std::string, std::string>& extra) {
  auto md = cfg.to_metadata();
  md.insert(extra.begin(), extra.end());
  md["tailor.kind"] = "lora";
  md["lora.rank"] = std::to_string(adapter.cfg.rank);
  md["lora.alpha"] = std::to_string(adapter.cfg.alpha);
  md["lora.mlp"] = adapter.cfg.mlp ? "1" : "0";
  return md;
}

// Fills every named tensor from the file; shapes must match what is there already.
caf::error load_named(const storage::safetensors_file& f,
                      const std::vector<std::pair<std::string, torch::Tensor*>>& named) {
  for (const auto& [name, t] : named) {
    const auto* e = f.find(name);
    if (!e) return caf::make_error(errc::bad_header, "tensor " + name + " is missing");
    if (e->type != storage::dtype::f32)
      return caf::make_error(errc::unknown_dtype, name + ": expected F32");
    if (e->shape != t->sizes().vec())
      return caf::make_error(errc::shape_mismatch, name + ": shape does not fit the model");
    auto data = f.data(*e);
    auto loaded = torch::empty(t->sizes(), torch::kFloat32);
    std::memcpy(loaded.data_ptr<float>(), data.data(), data.size());
    *t = loaded;
  }
  return {};
}

caf::expected<lora_adapter> adapter_from(const storage::safetensors_file& f,
                                         const std::string& what, const model_config& cfg) {
  const auto& md = f.metadata();
  lora_config lc;
  try {
    lc.rank = std::stoll(md.at("lora.rank"));
    lc.alpha = std::stod(md.at("lora.alpha"));
    lc.mlp = md.at("lora.mlp") == "1";
  } catch (const std::exception&) {
    return caf::make_error(errc::bad_header,
                           what + ": lora.rank, lora.alpha and lora.mlp metadata are required");
  }
  if (lc.rank < 1 || lc.rank > 4096)
    return caf::make_error(errc::bad_header, what + ": lora.rank out of range");
  // Every tensor is read from the file: no initial values to draw.
  auto ad = lora_adapter::shaped(cfg, lc);
  if (auto e = load_named(f, ad.named())) return e;
  return ad;
}

}  // namespace

caf::error save_base(const std::string& path, base_weights& base,
                     const std::map<std::string, std::string>& extra) {
  auto md = base.cfg.to_metadata();
  md.insert(extra.begin(), extra.end());
  md["tailor.kind"] = "base";
  return save_named(path, base.named(), md);
}

caf::expected<base_weights> load_base(const std::string& path) {
  auto f = storage::safetensors_file::read(path);
  if (!f) return f.error();
  std::string err;
  auto cfg = model_config::from_metadata(f->metadata(), err);
  if (!cfg) return caf::make_error(errc::bad_header, path + ": " + err);
  auto base = base_weights::init(*cfg, 0);
  if (auto e = load_named(*f, base.named())) return e;
  return base;
}

caf::error save_adapter(const std::string& path, lora_adapter& adapter, const model_config& cfg,
                        const std::map<std::string, std::string>& extra) {
  return save_named(path, adapter.named(), adapter_metadata(adapter, cfg, extra));
}

caf::expected<std::vector<std::byte>> encode_adapter(
    lora_adapter& adapter, const model_config& cfg,
    const std::map<std::string, std::string>& extra) {
  return encode_named(adapter.named(), adapter_metadata(adapter, cfg, extra));
}

caf::expected<lora_adapter> load_adapter(const std::string& path, const model_config& cfg) {
  auto f = storage::safetensors_file::read(path);
  if (!f) return f.error();
  return adapter_from(*f, path, cfg);
}

caf::expected<lora_adapter> decode_adapter(std::vector<std::byte> bytes, const model_config& cfg,
                                           const std::string& what) {
  auto f = storage::safetensors_file::parse(std::move(bytes));
  if (!f) return f.error();
  return adapter_from(*f, what, cfg);
}

}  // namespace tailor::model
