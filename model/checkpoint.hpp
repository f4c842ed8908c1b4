#pragma once

// Base models and adapters on disk, in safetensors (storage/safetensors.hpp)
// with the model configuration in the metadata, so files interoperate with
// the Python ecosystem.
#include <caf/expected.hpp>
#include <cstddef>
#include <string>
#include <vector>

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

// The same as bytes in memory: the artifact store checksums and writes them,
// and verifies them before they are decoded. `what` names them in errors.
caf::expected<std::vector<std::byte>> encode_adapter(
    lora_adapter& adapter, const model_config& cfg,
    const std::map<std::string, std::string>& extra_metadata = {});
caf::expected<lora_adapter> decode_adapter(std::vector<std::byte> bytes, const model_config& cfg,
                                           const std::string& what);

}  // namespace tailor::model
