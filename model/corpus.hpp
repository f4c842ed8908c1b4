#pragma once

// Text corpora from Debian's fortune packages: files of entries separated by
// lines holding only "%".
#include <string>
#include <vector>

namespace tailor::model {

inline constexpr const char* fortunes_dir = "/usr/share/games/fortunes";

// The files whose texts the quality benchmark gives to its users; they are
// left out of pre-training.
const std::vector<std::string>& held_out_user_files();

// Entries of one fortune file (an unreadable file gives none).
std::vector<std::string> read_fortune_file(const std::string& path);

// The English fortune files directly under `dir` (no .dat/.u8 indexes, no
// language subdirectories), sorted, minus `exclude` (file names).
std::vector<std::string> english_fortune_files(const std::string& dir,
                                               const std::vector<std::string>& exclude);

// Every fortune file directly under `dir` (indexes .dat/.u8 left out), sorted.
std::vector<std::string> fortune_files_in(const std::string& dir);

// Splits entries deterministically by a hash of their text: about
// `percent` % go to `held_out`, independent of file order.
void split_by_hash(const std::vector<std::string>& entries, int percent,
                   std::vector<std::string>& train, std::vector<std::string>& held_out);

}  // namespace tailor::model
