// Error messages for the kernels' argument checks, assembled with std::string and std::to_string.
//
// Why not TORCH_CHECK's own formatting (c10::str, an ostringstream instantiated in this library):
// built by a g++ whose libstdc++ is newer than the one loaded at run time (seen on the GPU machine:
// /opt/gcc's g++ 13 against torch's runtime), this library's inlined ostream code segfaulted
// formatting an integer and silently dropped a ScalarType. TORCH_CHECK(cond, one_std_string) passes
// the string through untouched.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace glm_kernels {
namespace detail {

inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, c10::ScalarType x) { s += c10::toString(x); }
inline void append(std::string& s, c10::IntArrayRef x) {
  s += '[';
  for (size_t i = 0; i < x.size(); ++i) s += (i ? ", " : "") + std::to_string(x[i]);
  s += ']';
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
void append(std::string& s, T x) {
  s += std::to_string(x);
}

}  // namespace detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace glm_kernels
