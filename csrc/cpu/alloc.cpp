// See alloc.h.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace finteam::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

void release(void* data) { std::free(data); }

// Blocks of kLargeBytes or more on 2 MiB boundaries, advised as huge pages; smaller ones (a
// resize of such a tensor) 64-byte aligned, as ATen's allocator gives them. A real allocator,
// not a wrapped pointer, so the tensor resizes, shares and serialises like any other.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* data = nullptr;
    if (n >= static_cast<size_t>(kLargeBytes)) {
      const size_t padded = (n + kHugePage - 1) / kHugePage * kHugePage;
      data = std::aligned_alloc(kHugePage, padded);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (data != nullptr) madvise(data, padded, MADV_HUGEPAGE);  // a refusal leaves 4 KiB pages: slower, correct
#endif
    } else if (posix_memalign(&data, 64, n == 0 ? 64 : n) != 0) {
      data = nullptr;
    }
    TORCH_CHECK(data != nullptr, "finteam: out of memory allocating ", n, " bytes");
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kLargeBytes) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace finteam::cpu
