// The switch for index-value checks on CUDA (declared in csrc/checks/switch.h; what is checked
// when: csrc/checks/common.h). Off by default, as the check costs a host synchronisation per
// call. On when the environment variable CLTRACE_CHECK_VALUES is set, as the library loads,
// to anything but "", "0", "false", "no" or "off"; Python sets it with
// cltrace.ops.set_check_values (through the _C module functions in csrc/ops.cpp).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "checks/switch.h"

namespace cltrace {
namespace {

bool from_environment() {
  const char* v = std::getenv("CLTRACE_CHECK_VALUES");
  if (v == nullptr) return false;
  for (const char* off : {"", "0", "false", "no", "off"})
    if (std::strcmp(v, off) == 0) return false;
  return true;
}

std::atomic<bool>& value_checks() {
  static std::atomic<bool> on{from_environment()};
  return on;
}

}  // namespace

bool device_value_checks() { return value_checks().load(std::memory_order_relaxed); }

bool set_device_value_checks(bool on) {
  return value_checks().exchange(on, std::memory_order_relaxed);
}

}  // namespace cltrace
