#include "gradient_buffer.h"

#include <c10/core/Allocator.h>

#include <cstdlib>
#include <mutex>

namespace fastdistil {
namespace {

constexpr size_t kAlignment = size_t{2} << 20;  // rounds capacities so that slightly longer batches fit
// Below this a buffer is cheap to fault in and goes through ATen's allocator.
constexpr size_t kMinCachedBytes = size_t{8} << 20;

bool cache_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("FASTDISTIL_GRADIENT_CACHE");
    return !(env && std::string(env) == "0");
  }();
  return enabled;
}

class Cache {
 public:
  // A block of at least `bytes`: the idle one if it is large enough, otherwise a new one (after freeing the
  // idle one, so that two never coexist because of the cache).
  std::pair<void*, size_t> acquire(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_ && idle_bytes_ >= bytes) {
      auto block = std::make_pair(idle_, idle_bytes_);
      idle_ = nullptr;
      idle_bytes_ = 0;
      return block;
    }
    drop_idle();
    const size_t capacity = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* ptr = std::aligned_alloc(64, capacity);
    TORCH_CHECK(ptr, "fastdistil: out of memory allocating a ", capacity, "-byte gradient buffer");
    return {ptr, capacity};
  }

  // Keeps the larger of the returned block and the idle one.
  void release(void* ptr, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_ && idle_bytes_ >= capacity) {
      std::free(ptr);
      return;
    }
    drop_idle();
    idle_ = ptr;
    idle_bytes_ = capacity;
  }

  int64_t drop() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t bytes = static_cast<int64_t>(idle_bytes_);
    drop_idle();
    return bytes;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  void drop_idle() {
    std::free(idle_);
    idle_ = nullptr;
    idle_bytes_ = 0;
  }

  std::mutex mutex_;
  void* idle_ = nullptr;
  size_t idle_bytes_ = 0;
};

// Never destroyed: a tensor freed during interpreter shutdown still returns its block here.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

}  // namespace

at::Tensor gradient_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!cache_enabled() || bytes < kMinCachedBytes) return at::empty(sizes, options);
  auto [ptr, capacity] = cache().acquire(bytes);
  // The profiler sees the buffer as allocated while a tensor uses it, as it would any other tensor.
  const c10::Device cpu(c10::DeviceType::CPU);
  c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(bytes), 0, 0, cpu);
  auto on_free = [capacity = capacity, bytes, cpu](void* p) {
    c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(bytes), 0, 0, cpu);
    cache().release(p, capacity);
  };
  return at::from_blob(ptr, sizes, on_free, options);
}

int64_t release_gradient_cache() { return cache().drop(); }

int64_t gradient_cache_bytes() { return cache().idle_bytes(); }

}  // namespace fastdistil
