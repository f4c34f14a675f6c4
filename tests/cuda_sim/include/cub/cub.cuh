// cuda_sim stand-in for <cub/cub.cuh>: the one CUB algorithm kernels/ uses,
// cub::DeviceRadixSort::SortPairs for unsigned integer keys, as a stable sort
// on the key bits [begin_bit, end_bit) (keys that differ only outside those bits
// keep their input order, as CUB's radix sort leaves them).
#pragma once
#include <stddef.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../cuda_sim.h"

namespace cub {

struct DeviceRadixSort {
  // Bytes of temporary storage the sort asks for: a stand-in size that grows
  // with the input, so a caller that carves it out of a workspace must size it
  // from this query (the sort scribbles over all of it).
  static size_t temp_bytes_for(int num_items) { return 512 + 16 * static_cast<size_t>(num_items > 0 ? num_items : 0); }

  template <typename KeyT, typename ValueT, typename NumItemsT>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const KeyT* d_keys_in,
                               KeyT* d_keys_out, const ValueT* d_values_in, ValueT* d_values_out,
                               NumItemsT num_items, int begin_bit = 0, int end_bit = sizeof(KeyT) * 8,
                               cudaStream_t stream = nullptr, bool debug_synchronous = false) {
    static_assert(std::is_integral_v<KeyT> && std::is_unsigned_v<KeyT>,
                  "cuda_sim's SortPairs stand-in handles unsigned integer keys only");
    (void)stream;
    (void)debug_synchronous;
    const long long n = static_cast<long long>(num_items);
    if (n < 0 || begin_bit < 0 || end_bit > static_cast<int>(sizeof(KeyT) * 8) || begin_bit > end_bit)
      return cudaErrorInvalidValue;
    const size_t need = temp_bytes_for(static_cast<int>(n));
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = need;
      return cudaSuccess;
    }
    if (temp_storage_bytes < need) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    if (!d_keys_in || !d_keys_out || !d_values_in || !d_values_out) return cudaErrorInvalidValue;
    // Overlap of the temporary storage with the data shows up as garbage.
    std::memset(d_temp_storage, 0xAB, need);
    const int bits = end_bit - begin_bit;
    const KeyT field = bits >= static_cast<int>(sizeof(KeyT) * 8) ? ~KeyT(0) : static_cast<KeyT>((KeyT(1) << bits) - 1);
    std::vector<KeyT> keys(d_keys_in, d_keys_in + n);
    std::vector<ValueT> values(d_values_in, d_values_in + n);
    std::vector<long long> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0LL);
    auto sort_key = [&](long long i) { return static_cast<KeyT>((keys[i] >> begin_bit) & field); };
    std::stable_sort(order.begin(), order.end(), [&](long long a, long long b) { return sort_key(a) < sort_key(b); });
    std::memset(d_temp_storage, 0xAB, need);
    for (long long i = 0; i < n; ++i) {
      d_keys_out[i] = keys[order[i]];
      d_values_out[i] = values[order[i]];
    }
    std::memset(d_temp_storage, 0xCD, need);  // outputs overlapping the storage are clobbered too
    return cudaSuccess;
  }
};

}  // namespace cub
