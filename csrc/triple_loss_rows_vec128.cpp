// The row kernels for any CPU: 16-byte vectors, which every x86-64 (SSE2) and ARM (NEON) CPU has.
#include "triple_loss.h"

#define FASTDISTIL_VECTOR_BYTES 16
namespace fastdistil::vec128 {
#include "triple_loss_rows.h"
#include "sparse_triple_loss_rows.h"
}  // namespace fastdistil::vec128
