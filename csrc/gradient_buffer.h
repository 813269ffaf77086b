// Gradient buffers of the CPU triple loss that outlive a training step's use of them.
//
// Every step, the op returns a fresh [N, V] gradient that autograd frees a moment later. Fresh memory from the
// OS costs a page fault per 4 KB page on first touch: about 90 ms for the 250 MB of N = 2048, several times the
// kernel's own bandwidth floor. So one idle buffer is kept: a gradient tensor's storage goes back to it when
// autograd frees it, and the next step's gradient reuses it. FASTDISTIL_GRADIENT_CACHE=0 turns this off.
#pragma once

#include <ATen/ATen.h>

namespace fastdistil {

// An uninitialized contiguous tensor of `sizes` and `options` (CPU); large ones come from the cache.
at::Tensor gradient_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the idle buffer, if any. Returns its size in bytes.
int64_t release_gradient_cache();

// Bytes held by the idle buffer.
int64_t gradient_cache_bytes();

}  // namespace fastdistil
