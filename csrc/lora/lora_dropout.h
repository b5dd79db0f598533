// lora_linear's dropout mask, shared by the CPU kernels and the CUDA ones: a counter-based hash of (seed, flat
// element index), so the backward regenerates the forward's mask instead of saving a dropped copy of x, and both
// backends drop the same elements for the same seed.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PEFTCORE_LORA_HD __host__ __device__ __forceinline__
#else
#define PEFTCORE_LORA_HD inline
#endif

namespace peftcore::lora {

// splitmix64 of the element's counter: uniform 64 bits; keep iff the top 24 bits / 2^24 >= p (threshold = p 2^24).
PEFTCORE_LORA_HD bool keep_element(uint64_t seed, uint64_t e, uint32_t threshold) {
  uint64_t z = seed + (e + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40) >= threshold;
}

}  // namespace peftcore::lora

#undef PEFTCORE_LORA_HD
