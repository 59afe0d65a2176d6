#pragma once
// Autocast and lrk's kernels. Kernels pick their own precision (fp32 accumulation
// for half inputs), so autocast must not re-cast the ATen calls inside them: every
// kernel entry holds LRK_NO_AUTOCAST(). Ops that autocast should run in lower
// precision (like nn.Linear) get an Autocast kernel that casts the inputs once and
// redispatches (see csrc/lora/lora_autocast.cpp).
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#define LRK_NO_AUTOCAST() \
  const c10::impl::ExcludeDispatchKeyGuard lrk_no_autocast_guard_(c10::autocast_dispatch_keyset)

namespace lrk {

// Casts a floating tensor to autocast's lower-precision dtype for the device (float64
// and non-floating tensors are left alone, as autocast does).
inline at::Tensor autocast_input(const at::Tensor& t, c10::DeviceType device) {
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(device), t, device);
}

inline std::optional<at::Tensor> autocast_input(const std::optional<at::Tensor>& t, c10::DeviceType device) {
  if (!t.has_value() || !t->defined()) return t;
  return autocast_input(*t, device);
}

}  // namespace lrk
