// Scratch vectors whose data starts on a 64-byte cache line: a 512-bit load from a buffer
// that malloc placed 16 bytes past a line splits across two lines, which cost the INT4 GEMV
// a third of its speed with activations in L1 (measured on Sapphire Rapids).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace tensorslim {
namespace cpu {

template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

using AlignedFloats = std::vector<float, CacheLineAllocator<float>>;

}  // namespace cpu
}  // namespace tensorslim
