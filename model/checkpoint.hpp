#pragma once

// Base models and adapters on disk, in safetensors (storage/safetensors.hpp)
// with the model configuration in the metadata, so files interoperate with
// the Python ecosystem.
#include <caf/expected.hpp>
#include <string>

#include "model/transformer.hpp"

namespace tailor::model {

caf::error save_base(const std::string& path, base_weights& base,
                     const std::map<std::string, std::string>& extra_metadata = {});
caf::expected<base_weights> load_base(const std::string& path);

caf::error save_adapter(const std::string& path, lora_adapter& adapter, const model_config& cfg,
                        const std::map<std::string, std::string>& extra_metadata = {});
// Loads an adapter made for a base of configuration `cfg`; any tensor whose
// shape does not fit that base is refused.
caf::expected<lora_adapter> load_adapter(const std::string& path, const model_config& cfg);

}  // namespace tailor::model
