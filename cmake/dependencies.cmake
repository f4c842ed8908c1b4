# Finds every third-party library from Debian's packages (see
# ../shared/stack.md for why each is found the way it is) and exposes each as
# an imported target whose include directories are SYSTEM.
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)

# LibTorch before RocksDB: RocksDBConfig.cmake sets GFLAGS_USE_TARGET_NAMESPACE,
# which breaks Caffe2's gflags lookup inside find_package(Torch).
find_package(Torch REQUIRED)

# RocksDB: link the shared library; the static target needs every codec.
find_package(RocksDB CONFIG REQUIRED)
unset(GFLAGS_USE_TARGET_NAMESPACE)

find_package(nlohmann_json 3.10 CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
find_package(OpenSSL REQUIRED)  # SHA-256 checksums of artifacts
pkg_check_modules(HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)

# CAF 0.17.6 ships neither a CMake config nor a pkg-config file.
find_path(CAF_INCLUDE_DIR caf/all.hpp REQUIRED)
find_library(CAF_CORE_LIBRARY caf_core REQUIRED)
add_library(caf::core UNKNOWN IMPORTED)
set_target_properties(caf::core PROPERTIES
  IMPORTED_LOCATION "${CAF_CORE_LIBRARY}"
  INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${CAF_INCLUDE_DIR}"
  INTERFACE_LINK_LIBRARIES Threads::Threads)

# librdkafka 2.x: C and C++ clients plus the mock cluster header.
find_path(RDKAFKA_INCLUDE_DIR librdkafka/rdkafka_mock.h REQUIRED)
find_library(RDKAFKA_LIBRARY rdkafka REQUIRED)
find_library(RDKAFKAXX_LIBRARY rdkafka++ REQUIRED)
add_library(rdkafka::rdkafka UNKNOWN IMPORTED)
set_target_properties(rdkafka::rdkafka PROPERTIES
  IMPORTED_LOCATION "${RDKAFKA_LIBRARY}"
  INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${RDKAFKA_INCLUDE_DIR}")
add_library(rdkafka::rdkafkaxx UNKNOWN IMPORTED)
set_target_properties(rdkafka::rdkafkaxx PROPERTIES
  IMPORTED_LOCATION "${RDKAFKAXX_LIBRARY}"
  INTERFACE_LINK_LIBRARIES rdkafka::rdkafka)

if(TAILOR_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()
