#pragma once

// The loaded base models (LibTorch types): included only by the actors that
// compute, trainer.cpp and gpu.cpp.
#include <map>
#include <string>

#include "model/transformer.hpp"

namespace tailor::actors {

struct base_models {
  std::map<std::string, model::base_weights> by_name;
};

}  // namespace tailor::actors
