// See alloc.h.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace finteam::cpu {
namespace {

// Block sizes are rounded up to a multiple of 2 MiB, below that of 64 KiB: a training loop asks
// for the same sizes every step, and few distinct sizes let freed blocks serve them.
constexpr size_t kGranule = size_t{2} << 20, kSmallGranule = size_t{64} << 10;

size_t block_bytes(size_t n) {
  const size_t granule = n >= kGranule ? kGranule : kSmallGranule;
  return (std::max<size_t>(n, 1) + granule - 1) / granule * granule;
}

size_t cache_cap() {
  static const size_t cap = [] {
    const char* mb = std::getenv("FINTEAM_CPU_CACHE_MB");
    return (mb != nullptr ? std::strtoull(mb, nullptr, 10) : 1024ull) << 20;
  }();
  return cap;
}

// Blocks are mapped from the kernel, not taken from glibc's heap: cached blocks sitting in the
// heap would change where glibc places (and trims) the process's other buffers.
void* map_block(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// An allocator, not a wrapped pointer: a tensor from it resizes, shares and serialises like any.
class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = block_bytes(n);
    void* data = nullptr;
    size_t live = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (auto it = free_.find(bytes); it != free_.end()) {
        data = it->second;
        free_.erase(it);
        cached_ -= bytes;
      }
      live = live_ += bytes;
      reserved = live_ + cached_;
    }
    if (data == nullptr) data = map_block(bytes);
    if (data == nullptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
    }
    TORCH_CHECK(data != nullptr, "finteam: out of memory allocating ", n, " bytes");
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(data, static_cast<int64_t>(bytes), live, reserved, c10::Device(c10::kCPU));
    return {data, new Block{this, data, bytes}, &BlockCache::release, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  struct Block {
    BlockCache* cache;
    void* data;
    size_t bytes;
  };

  static void release(void* ctx) {
    const auto* block = static_cast<Block*>(ctx);
    block->cache->give_back(block->data, block->bytes);
    delete block;
  }

  void give_back(void* data, size_t bytes) {
    bool keep = false;
    size_t live = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_ -= bytes;
      keep = cached_ + bytes <= cache_cap();
      if (keep) {
        free_.emplace(bytes, data);
        cached_ += bytes;
      }
      reserved = live_ + cached_;
    }
    if (!keep) munmap(data, bytes);
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(data, -static_cast<int64_t>(bytes), live, reserved, c10::Device(c10::kCPU));
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // free blocks by size
  size_t cached_ = 0, live_ = 0;
};

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kLargeBytes || cache_cap() == 0) return at::empty(sizes, options);
  static auto* cache = new BlockCache;  // never destroyed: tensors may outlive static destructors
  return at::detail::empty_generic(sizes, cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace finteam::cpu
