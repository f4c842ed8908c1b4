#pragma once

#include <string>
#include <string_view>

namespace tailor::messages {

inline constexpr std::size_t max_id_length = 128;

// Ids (user_id, request_id, model_id, job_id) are 1-128 characters of
// [A-Za-z0-9._:-]; design section 3.
bool is_valid_id(std::string_view id);

// The deterministic job id of (user_id, request_id): a redelivered request
// always names the same job, on whichever instance reads it.
std::string job_id_for(const std::string& user_id, const std::string& request_id);

}  // namespace tailor::messages
