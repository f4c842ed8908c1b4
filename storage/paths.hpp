#pragma once

#include <string>

namespace tailor::storage {

// Tailor's cache and state root: $TAILOR_HOME, else $XDG_CACHE_HOME/tailor,
// else ~/.cache/tailor. Pre-trained bases, the engine's default data
// directory and the test broker's jars live below it.
std::string tailor_home();

}  // namespace tailor::storage
