#!/usr/bin/env bash
# CI for libfastlora_kernels: configure and build with CMake (the AOT step compiles the Triton kernels for sm_80
# and sm_90 without a GPU), run ctest, then install into a temporary prefix and build a consumer project that
# finds it with find_package and links both libraries.
#   scripts/cmake_ci.sh [build dir]        FASTLORA_PYTHON defaults to .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=${1:-build/cmake-ci}
python=${FASTLORA_PYTHON:-$root/.venv/bin/python}
jobs=${FASTLORA_JOBS:-2}
start=$SECONDS
if [ ! -x "$python" ]; then
  echo "cmake_ci: $python not found: run ./dev test first (it makes .venv) or set FASTLORA_PYTHON" >&2
  exit 1
fi

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DFASTLORA_PYTHON="$python" -DFASTLORA_WERROR=ON
cmake --build "$build" --parallel "$jobs"
ctest --test-dir "$build" --output-on-failure

prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix/install"

# The consumer: C++ (as an inference engine would be), shared and static, with nothing but the installed package.
mkdir -p "$prefix/consumer"
cat > "$prefix/consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.18)
project(fastlora_consumer LANGUAGES CXX)
find_package(fastlora_kernels 0.1 REQUIRED)
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE fastlora::fastlora_kernels)
add_executable(consumer_static main.cpp)
target_link_libraries(consumer_static PRIVATE fastlora::fastlora_kernels_static)
CMAKE
cat > "$prefix/consumer/main.cpp" <<'CPP'
#include <fastlora_kernels.h>

#include <cstdio>

int main() {
    size_t bytes = 0;
    fastlora_status s = fastlora_lora_forward_workspace_size(FASTLORA_DTYPE_BF16, 4096, 4096, 4096, 16, &bytes);
    std::printf("fastlora_kernels %s: %d kernels, workspace %zu bytes, %s\n", fastlora_version(),
                fastlora_kernel_count(), bytes, fastlora_status_string(fastlora_driver_status()));
    return s == FASTLORA_STATUS_OK && fastlora_kernel_count() > 0 ? 0 : 1;
}
CPP
cmake -S "$prefix/consumer" -B "$prefix/consumer/build" -DCMAKE_PREFIX_PATH="$prefix/install"
cmake --build "$prefix/consumer/build" --parallel "$jobs"
"$prefix/consumer/build/consumer"
"$prefix/consumer/build/consumer_static"
if command -v nm >/dev/null; then
  # Only the API is exported from the shared library (internal symbols stay hidden), and nothing needs libcuda.
  lib=$(ls "$prefix"/install/lib*/libfastlora_kernels.so.*.*.* | head -n1)
  exported=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v '^fastlora_' || true)
  if [ -n "$exported" ]; then echo "unexpected exported symbols: $exported" >&2; exit 1; fi
  if ldd "$lib" | grep -q libcuda; then echo "libfastlora_kernels must not link libcuda" >&2; exit 1; fi
fi
echo "cmake_ci: OK in $((SECONDS - start)) s"
