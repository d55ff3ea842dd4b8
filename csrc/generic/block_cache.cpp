// A block cache for the large CPU tensors of a curvature sweep. Its ops take
// no tensors and register for no dispatch key (CompositeImplicitAutograd),
// hence csrc/generic/, although the memory it manages is the CPU's.
//
// Why: a sweep allocates and frees the same few tensor sizes (a layer's
// activations, the attention scores, the logits) over and over. glibc serves
// large requests with mmap, or trims the top of its heap when they are freed,
// so a new tensor is often fresh memory that the kernel faults in and zeroes
// one 4 KiB page at a time: about 1.3 us a page on the VM of bench/RESULTS.md
// (10 ms for a 32 MiB tensor), and how many faults a call takes changes from
// call to call with the heap's state (10k to 80k for one GPT batch). While a
// scope is open (obd_ext/block_cache.py), this allocator stands in for the
// CPU allocator it replaced: it keeps freed blocks of at least kMinBytes and
// hands them back for requests of the same rounded size, as the CUDA caching
// allocator does on a GPU. Smaller requests, and misses, go to the replaced
// allocator.
//
// Footprint rule: a miss first gives cached blocks back until live plus
// cached bytes, with the request, are within 1.5x (kSlackDiv) the high-water
// mark of live bytes in this scope. The slack is what lets a sweep find the
// sizes it needs once per batch still cached at the next batch; measured on
// the GPT of the benchmark, the process's peak RSS with the cache is below
// glibc's own at vocabulary 8k and 8-14% above it at 32k (RESULTS.md). When
// the outermost scope closes, the replaced allocator is restored and every
// cached block is given back; a block freed after its scope goes straight
// back to the replaced allocator.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace obd {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // below this glibc reuses its heap well
constexpr size_t kPage = 4096;
constexpr size_t kSlackDiv = 2;  // live + cached <= hwm + hwm / kSlackDiv

struct Block {
  c10::DataPtr inner;  // from the replaced allocator, with its own deleter
  size_t size;
};

// Blocks are handed out as simple data pointers (data == context), since
// kernels may take raw memory from the CPU allocator (raw_allocate /
// raw_deallocate): the deleter finds its block by address in live_.
class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: storages may outlive static teardown
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    c10::Allocator* base = base_.load();
    if (n < kMinBytes || depth_.load() == 0) return base->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {  // the most recently freed: warmest
        if ((*it)->size == size) {
          Block* b = *it;
          cached_.erase(std::next(it).base());
          cached_bytes_ -= size;
          ++hits_;
          add_live(b);
          return wrap(b);
        }
      }
      ++misses_;
      const size_t limit = std::max(hwm_ + hwm_ / kSlackDiv, live_bytes_ + size);
      while (!cached_.empty() && live_bytes_ + cached_bytes_ + size > limit) {
        auto victim = surplus_block();
        cached_bytes_ -= (*victim)->size;
        evicted.push_back(*victim);
        cached_.erase(victim);
      }
    }
    for (Block* e : evicted) delete e;  // outside the lock: giving memory back can take a while
    c10::DataPtr inner;
    try {
      inner = base->allocate(size);
    } catch (const c10::Error&) {
      // Out of memory with blocks still cached: the cache must not be why a
      // sweep fails, so give them all back and try once more.
      release_cached();
      inner = base->allocate(size);
    }
    auto* b = new Block{std::move(inner), size};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      add_live(b);
    }
    return wrap(b);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_.load() == 0) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != this) base_.store(current);
      c10::SetCPUAllocator(this, /*priority=*/0);
      installed_ = c10::GetCPUAllocator() == this;  // an allocator registered at a higher priority keeps its place
      hwm_ = live_bytes_;
    }
    depth_.fetch_add(1);
  }

  void exit() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(depth_.load() > 0, "obd_ext block cache: a scope was closed that was never opened");
      if (depth_.fetch_sub(1) > 1) return;
      uninstall();
    }
    release_cached();
  }

  void release_cached() {
    std::vector<Block*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(cached_);
      cached_bytes_ = 0;
    }
    for (Block* b : released) delete b;  // outside the lock: giving memory back can take a while
  }

  // depth, cached bytes, hits, misses, live bytes (of blocks handed out), high-water mark.
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {depth_.load(), static_cast<int64_t>(cached_bytes_), hits_, misses_,
            static_cast<int64_t>(live_bytes_), static_cast<int64_t>(hwm_)};
  }

 private:
  BlockCache() : base_(c10::GetCPUAllocator()) {
    // A fork while a scope is open (a DataLoader worker started inside
    // hessian_diag) must not leave the child with a locked mutex or an open
    // scope it will never close.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] {
                     instance().mutex_.unlock();  // the forking thread, the child's only one, held it
                     instance().after_fork_in_child();
                   });
  }

  void after_fork_in_child() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      depth_.store(0);
      uninstall();
    }
    release_cached();  // the child's copies of the parent's cached pages
  }

  void uninstall() {
    if (installed_ && c10::GetCPUAllocator() == this) c10::SetCPUAllocator(base_.load(), /*priority=*/0);
    installed_ = false;
  }

  void add_live(Block* b) {
    // An entry already at this address is a block that a raw_deallocate after
    // its scope gave straight back to the replaced allocator: dropped, not freed.
    auto [it, fresh] = live_.emplace(b->inner.get(), b);
    if (!fresh) {
      live_bytes_ -= it->second->size;
      it->second = b;
    }
    live_bytes_ += b->size;
    hwm_ = std::max(hwm_, live_bytes_);
  }

  // The block to give back first: the oldest of the size that has the most
  // cached blocks. A sweep frees the same few sizes layer after layer, so the
  // cache piles up copies of one size while a size it needs once per batch
  // (the logits, the loss's gradient) sits there once; evicting by age alone
  // threw those out, and they came back as fresh memory every batch.
  std::vector<Block*>::iterator surplus_block() {
    std::unordered_map<size_t, int> count;
    for (Block* b : cached_) ++count[b->size];
    auto best = cached_.begin();
    for (auto it = cached_.begin(); it != cached_.end(); ++it)
      if (count[(*it)->size] > count[(*best)->size]) best = it;
    return best;
  }

  static c10::DataPtr wrap(Block* b) {
    void* p = b->inner.get();
    return {p, p, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  // The deleter of every block handed out, and the raw deleter of this
  // allocator: a pointer that is not one of our blocks came from the replaced
  // allocator (a small request), and goes back through its raw deleter.
  static void release(void* ptr) {
    BlockCache& self = instance();
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.live_.find(ptr);
      if (it != self.live_.end()) {
        b = it->second;
        self.live_.erase(it);
        self.live_bytes_ -= b->size;
        if (self.depth_.load() > 0) {
          self.cached_.push_back(b);
          self.cached_bytes_ += b->size;
          return;
        }
      }
    }
    if (b != nullptr) {
      delete b;
      return;
    }
    c10::DeleterFnPtr base_raw = self.base_.load()->raw_deleter();
    TORCH_INTERNAL_ASSERT(base_raw != nullptr, "obd_ext block cache: the replaced CPU allocator has no raw deleter");
    base_raw(ptr);
  }

  std::mutex mutex_;
  std::atomic<c10::Allocator*> base_;
  std::atomic<int64_t> depth_{0};  // open scopes; changed under mutex_, read without it on the fast path
  bool installed_ = false;
  std::unordered_map<void*, Block*> live_;  // handed out, by address
  std::vector<Block*> cached_;              // freed, in the order they were freed
  size_t cached_bytes_ = 0;
  size_t live_bytes_ = 0;  // of the blocks in live_
  size_t hwm_ = 0;         // the most live_bytes_ since the outermost scope opened
  int64_t hits_ = 0, misses_ = 0;
};

void block_cache_enter() { BlockCache::instance().enter(); }
void block_cache_exit() { BlockCache::instance().exit(); }
std::vector<int64_t> block_cache_stats() { return BlockCache::instance().stats(); }

}  // namespace

// No tensor arguments: these kernels are the ops' only implementation.
TORCH_LIBRARY_IMPL(obd_ext, CompositeImplicitAutograd, m) {
  m.impl("_block_cache_enter", &block_cache_enter);
  m.impl("_block_cache_exit", &block_cache_exit);
  m.impl("_block_cache_stats", &block_cache_stats);
}

}  // namespace cpu
}  // namespace obd
