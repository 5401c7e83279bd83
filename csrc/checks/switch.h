// The switch for index-value checks on CUDA (defined in csrc/check_values.cpp): off unless
// CLTRACE_CHECK_VALUES is set when the library loads, or Python turns it on with
// cltrace.ops.set_check_values. csrc/checks/common.h says what is checked when.
#pragma once

namespace cltrace {

// Whether index values are checked on non-CPU devices.
bool device_value_checks();
// Sets the switch; returns its previous state.
bool set_device_value_checks(bool on);

}  // namespace cltrace
