// cuda_sim's runtime: fibers, barriers, warp collectives, launches, the CUDA
// runtime calls kernels/ uses, guarded allocations, and the C interface the
// Python tests drive (see include/cuda_sim.h for what is simulated and what not).
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cuda_sim.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace sim {

thread_local ThreadCtx* g_current = nullptr;

namespace {

// ------------------------------------------------------------------ configuration and state
struct Config {
  int workers = 1;
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
  int smem_optin = 232448;  // H100/H200: 227 KiB per block with the opt-in
  size_t stack_bytes = 256 * 1024;
};

struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  size_t smem;
  cudaError_t status;
};

struct Global {
  std::mutex mu;  // one launch at a time; guards everything below
  Config cfg;
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky = cudaSuccess;
  std::string fault;
  std::vector<LaunchRecord> log;
  std::map<const void*, int> max_dynamic_smem;
  std::atomic<long long> blocks{0}, threads{0}, barriers{0}, collectives{0};
};

Global& G() {
  static Global* g = new Global;  // never destroyed: workers may outlive static destruction order
  return *g;
}

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------ guarded memory
struct Region {
  char* map;         // the whole mapping
  size_t map_bytes;
  char* user;        // what the caller got
  size_t user_bytes;
  const char* what;  // "buffer", "dynamic shared memory", "thread stack"
};
std::mutex g_regions_mu;
std::vector<Region> g_regions;  // read without the lock by the SIGSEGV handler (crash path only)

void install_segv_handler();

// [guard page][pages holding the bytes][guard page]; the bytes end exactly at
// the back guard (mode 0) or start exactly after the front guard (mode 1).
char* guarded_map(size_t bytes, size_t align, int mode, const char* what, size_t* map_bytes_out, char** map_out) {
  install_segv_handler();
  const size_t pg = page_size();
  if (align == 0 || (align & (align - 1)) != 0 || align > pg) align = 16;
  const size_t body = round_up(std::max<size_t>(round_up(bytes, align), 1), pg);
  const size_t total = body + 2 * pg;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  char* map = static_cast<char*>(m);
  mprotect(map, pg, PROT_NONE);
  mprotect(map + pg + body, pg, PROT_NONE);
  char* user = mode == 1 ? map + pg : map + pg + body - round_up(bytes, align);
  *map_bytes_out = total;
  *map_out = map;
  std::lock_guard<std::mutex> lock(g_regions_mu);
  g_regions.push_back({map, total, user, bytes, what});
  return user;
}

void guarded_unmap(char* user) {
  Region r{};
  {
    std::lock_guard<std::mutex> lock(g_regions_mu);
    for (size_t i = 0; i < g_regions.size(); ++i) {
      if (g_regions[i].user == user) {
        r = g_regions[i];
        g_regions[i] = g_regions.back();
        g_regions.pop_back();
        break;
      }
    }
  }
  if (r.map) munmap(r.map, r.map_bytes);
}

}  // namespace

// ------------------------------------------------------------------ launches, blocks, fibers
namespace detail {
struct KernelFault {
  std::string message;
};

struct Launch {
  explicit Launch(const LaunchConfig& c) : cfg(c) {}
  const char* name = nullptr;
  LaunchConfig cfg;
  void (*thunk)(void*);
  void* state;
  uint64_t nblocks;
  int nthreads;
  Config conf;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string fault;
};

struct WarpGroup {
  unsigned mask = 0, arrived = 0;
  WarpOp op = kOpSync;
  const char* file = nullptr;
  unsigned line = 0;
  uint64_t val[32];
  int arg[32];
  int width[32];
};

struct WarpState {
  unsigned exists = 0, live = 0;
  std::vector<WarpGroup> groups;
};

struct Stack {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* base = nullptr;
  size_t bytes = 0;
};
}  // namespace detail
using namespace detail;

struct Block {
  Launch* launch = nullptr;
  uint64_t id = 0;
  std::vector<ThreadCtx> threads;
  std::vector<WarpState> warps;
  int live = 0;
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  unsigned bar_line = 0;
  std::vector<int> bar_waiting;
  std::vector<int> ready;  // a FIFO: ready[head..]
  size_t head = 0;
  void* sched_sp = nullptr;
  void* sched_uctx = nullptr;
  unsigned char* smem = nullptr;
  bool failed = false;
  std::mt19937_64 rng;
  std::vector<int> scratch;
};

namespace {

// ------------------------------------------------------------------ context switching
#if defined(__x86_64__)
extern "C" __attribute__((visibility("hidden"))) void sim_ctx_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer, loads the other one and restores.
__asm__(
    ".text\n"
    ".globl sim_ctx_switch\n"
    ".hidden sim_ctx_switch\n"
    ".type sim_ctx_switch,@function\n"
    "sim_ctx_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size sim_ctx_switch, .-sim_ctx_switch\n");
#endif

[[noreturn]] void fiber_main();

#if defined(__x86_64__)
void fiber_init(ThreadCtx& t, Stack& s) {
  uintptr_t top = reinterpret_cast<uintptr_t>(s.base + s.bytes);
  uintptr_t ret_slot = (top - 16) & ~uintptr_t(15);  // after `ret`, rsp ≡ 8 (mod 16) as at a call
  void** slot = reinterpret_cast<void**>(ret_slot);
  slot[0] = reinterpret_cast<void*>(&fiber_main);
  for (int i = 1; i <= 6; ++i) slot[-i] = nullptr;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpcw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpcw));
  char* ctl = reinterpret_cast<char*>(ret_slot - 56);
  std::memcpy(ctl, &mxcsr, 4);
  std::memcpy(ctl + 4, &fpcw, 2);
  t.sp = ctl;
}
void switch_to_fiber(Block& b, ThreadCtx& t) { sim_ctx_switch(&b.sched_sp, t.sp); }
void switch_to_scheduler(ThreadCtx& t) { sim_ctx_switch(&t.sp, t.block->sched_sp); }
#else
void fiber_trampoline() { fiber_main(); }
void fiber_init(ThreadCtx& t, Stack& s) {
  if (!t.uctx) t.uctx = new ucontext_t;
  ucontext_t* uc = static_cast<ucontext_t*>(t.uctx);
  getcontext(uc);
  uc->uc_stack.ss_sp = s.base;
  uc->uc_stack.ss_size = s.bytes;
  uc->uc_link = nullptr;
  makecontext(uc, fiber_trampoline, 0);
}
void switch_to_fiber(Block& b, ThreadCtx& t) {
  if (!b.sched_uctx) b.sched_uctx = new ucontext_t;
  swapcontext(static_cast<ucontext_t*>(b.sched_uctx), static_cast<ucontext_t*>(t.uctx));
}
void switch_to_scheduler(ThreadCtx& t) {
  swapcontext(static_cast<ucontext_t*>(t.uctx), static_cast<ucontext_t*>(t.block->sched_uctx));
}
#endif

// ------------------------------------------------------------------ scheduling
std::string where_of(const ThreadCtx& t) {
  std::ostringstream os;
  os << "block (" << t.block_idx.x << "," << t.block_idx.y << "," << t.block_idx.z << ") thread (" << t.thread_idx.x
     << "," << t.thread_idx.y << "," << t.thread_idx.z << ")";
  return os.str();
}

void record_fault(Block& b, const std::string& message) {
  b.failed = true;
  Launch& L = *b.launch;
  std::lock_guard<std::mutex> lock(L.mu);
  if (!L.failed.exchange(true)) L.fault = std::string("kernel ") + L.name + ": " + message;
}

// Makes the given threads runnable, in the order the schedule asks for.
void make_ready(Block& b, std::vector<int>& ids) {
  std::sort(ids.begin(), ids.end());
  if (b.launch->conf.schedule == 1) std::reverse(ids.begin(), ids.end());
  if (b.launch->conf.schedule == 2) std::shuffle(ids.begin(), ids.end(), b.rng);
  for (int id : ids) {
    b.threads[id].state = 0;
    b.ready.push_back(id);
  }
}

// Suspends the running fiber until make_ready() lists it again.
void yield_current() {
  ThreadCtx* me = g_current;
  switch_to_scheduler(*me);
  // resumed: the scheduler has set g_current back to me
}

const char* op_name(WarpOp op) {
  switch (op) {
    case kOpSync: return "__syncwarp";
    case kOpShfl: return "__shfl_sync";
    case kOpShflXor: return "__shfl_xor_sync";
    case kOpShflUp: return "__shfl_up_sync";
    case kOpShflDown: return "__shfl_down_sync";
    case kOpBallot: return "__ballot_sync/__any_sync/__all_sync";
  }
  return "?";
}

std::string hex(unsigned x) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", x);
  return buf;
}

void complete_barrier(Block& b) {
  b.scratch.swap(b.bar_waiting);
  b.bar_waiting.clear();
  b.bar_arrived = 0;
  G().barriers.fetch_add(1, std::memory_order_relaxed);
  make_ready(b, b.scratch);
}

// A thread whose kernel function returned: it no longer takes part in barriers.
void thread_exit(ThreadCtx& t) {
  Block& b = *t.block;
  t.state = 2;
  --b.live;
  WarpState& w = b.warps[t.warp];
  const unsigned bit = 1u << t.lane;
  w.live &= ~bit;
  for (const WarpGroup& g : w.groups) {
    if (g.mask & bit) {
      record_fault(b, where_of(t) + " exited while lanes " + hex(g.arrived) + " of its warp wait for it in " +
                          op_name(g.op) + "(mask " + hex(g.mask) + ") at " + g.file + ":" + std::to_string(g.line));
      return;
    }
  }
  if (b.bar_arrived > 0 && b.bar_arrived == b.live) complete_barrier(b);
}

[[noreturn]] void fiber_main() {
  ThreadCtx* me = g_current;
  Block& b = *me->block;
  try {
    b.launch->thunk(b.launch->state);
    thread_exit(*me);
  } catch (const KernelFault& f) {
    record_fault(b, where_of(*me) + ": " + f.message);
  } catch (const std::exception& e) {
    record_fault(b, where_of(*me) + ": exception " + e.what());
  }
  me->state = 2;
  switch_to_scheduler(*me);
  std::abort();  // a finished fiber is never resumed
}

std::string deadlock_report(Block& b) {
  std::map<std::string, std::vector<int>> waits;
  for (const ThreadCtx& t : b.threads) {
    if (t.state != 1) continue;
    std::string key = std::string(t.wait_what ? t.wait_what : "?") + " at " + (t.wait_file ? t.wait_file : "?") +
                      ":" + std::to_string(t.wait_line);
    waits[key].push_back(t.linear);
  }
  std::ostringstream os;
  os << "deadlock in block " << b.id << ": ";
  bool first = true;
  for (auto& [key, ids] : waits) {
    os << (first ? "" : "; ") << ids.size() << " thread(s) (first " << ids.front() << ") wait in " << key;
    first = false;
  }
  os << "; " << b.live << " thread(s) live";
  return os.str();
}

struct WorkerRes {
  std::vector<Stack> stacks;
  size_t stack_bytes = 0;
  char* smem = nullptr;
  char* smem_map = nullptr;
  size_t smem_map_bytes = 0;
  size_t smem_bytes = 0;
  Block block;
};

std::mutex g_pool_mu;
std::vector<WorkerRes*> g_pool;

WorkerRes* take_resources(int nthreads, size_t stack_bytes, size_t smem_bytes) {
  WorkerRes* r = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (!g_pool.empty()) {
      r = g_pool.back();
      g_pool.pop_back();
    }
  }
  if (!r) r = new WorkerRes;
  if (r->stack_bytes != stack_bytes) {
    for (Stack& s : r->stacks) guarded_unmap(s.base);
    r->stacks.clear();
    r->stack_bytes = stack_bytes;
  }
  while (static_cast<int>(r->stacks.size()) < nthreads) {
    Stack s;
    s.bytes = stack_bytes;
    s.base = guarded_map(stack_bytes, 16, 0, "a simulated thread's stack", &s.map_bytes, &s.map);
    if (!s.base) throw std::runtime_error("cuda_sim: cannot map a fiber stack");
    r->stacks.push_back(s);
  }
  // dynamic shared memory: ends at a guard page (any overrun of the carved layout faults)
  if (r->smem == nullptr || r->smem_bytes != smem_bytes) {
    if (r->smem) guarded_unmap(r->smem);
    r->smem = guarded_map(smem_bytes, 16, 0, "dynamic shared memory", &r->smem_map_bytes, &r->smem_map);
    r->smem_bytes = smem_bytes;
  }
  return r;
}

void give_back(WorkerRes* r) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.push_back(r);
}

void run_block(Launch& L, WorkerRes& R, uint64_t id) {
  Block& b = R.block;
  b.launch = &L;
  b.id = id;
  b.failed = false;
  b.rng.seed(L.conf.seed * 0x9E3779B97F4A7C15ull + id);
  const dim3 grid = L.cfg.grid, blk = L.cfg.block;
  const dim3 bidx(static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                  static_cast<unsigned>(id / grid.x / grid.y));
  const int n = L.nthreads;
  b.threads.resize(n);
  for (int i = 0; i < n; ++i) {
    ThreadCtx& t = b.threads[i];
    t.thread_idx = dim3(i % blk.x, i / blk.x % blk.y, i / blk.x / blk.y);
    t.block_idx = bidx;
    t.block_dim = blk;
    t.grid_dim = grid;
    t.linear = i;
    t.lane = i & 31;
    t.warp = i >> 5;
    t.block = &b;
    t.state = 0;
    t.xresult = 0;
    t.wait_what = t.wait_file = nullptr;
    t.wait_line = 0;
    fiber_init(t, R.stacks[i]);
  }
  const int nw = (n + 31) / 32;
  b.warps.assign(nw, WarpState{});
  for (int w = 0; w < nw; ++w) {
    const int lanes = std::min(32, n - 32 * w);
    b.warps[w].exists = b.warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  b.live = n;
  b.bar_arrived = 0;
  b.bar_waiting.clear();
  b.ready.clear();
  b.head = 0;
  b.smem = reinterpret_cast<unsigned char*>(R.smem);
  if (R.smem_bytes) std::memset(R.smem, 0xFF, R.smem_bytes);  // uninitialised shared memory reads as NaN

  std::vector<int> all(n);
  for (int i = 0; i < n; ++i) all[i] = i;
  make_ready(b, all);
  while (b.head < b.ready.size() && !b.failed) {
    ThreadCtx& t = b.threads[b.ready[b.head++]];
    if (b.head > 4096 && b.head * 2 > b.ready.size()) {  // keep the FIFO small
      b.ready.erase(b.ready.begin(), b.ready.begin() + static_cast<long>(b.head));
      b.head = 0;
    }
    g_current = &t;
    switch_to_fiber(b, t);
    g_current = nullptr;
  }
  if (!b.failed && b.live > 0) record_fault(b, deadlock_report(b));
  G().blocks.fetch_add(1, std::memory_order_relaxed);
  G().threads.fetch_add(n, std::memory_order_relaxed);
}

void install_altstack() {
  thread_local bool done = false;
  if (done) return;
  done = true;
  stack_t old{};
  if (sigaltstack(nullptr, &old) == 0 && !(old.ss_flags & SS_DISABLE)) return;  // keep the host's (faulthandler's)
  stack_t ss{};
  ss.ss_size = 64 * 1024;
  ss.ss_sp = std::malloc(ss.ss_size);
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);  // the SIGSEGV report must run even after a fiber stack overflow
}

void worker_loop(Launch& L, WorkerRes* R) {
  install_altstack();
  try {
    while (!L.failed.load(std::memory_order_relaxed)) {
      const uint64_t id = L.next.fetch_add(1);
      if (id >= L.nblocks) break;
      run_block(L, *R, id);
    }
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(L.mu);
    if (!L.failed.exchange(true)) L.fault = std::string("kernel ") + L.name + ": " + e.what();
  }
}

// ------------------------------------------------------------------ SIGSEGV: say which access it was
struct sigaction g_old_segv, g_old_bus;
std::atomic<int> g_report_fd{2};  // where the report goes (pytest captures fd 2; its faulthandler's copy does not)

void on_segv(int sig, siginfo_t* si, void*) {
  char buf[1024];
  int len = 0;
  const char* addr = static_cast<const char*>(si->si_addr);
  len += std::snprintf(buf + len, sizeof buf - len, "\ncuda_sim: invalid memory access at %p", si->si_addr);
  for (const Region& r : g_regions) {  // no lock: this process is about to die anyway
    if (addr >= r.map && addr < r.map + r.map_bytes) {
      const long long off = static_cast<long long>(addr - r.user);
      len += std::snprintf(buf + len, sizeof buf - len, ", byte offset %lld of %s of %zu bytes", off, r.what,
                           r.user_bytes);
      break;
    }
  }
  if (ThreadCtx* t = g_current) {
    len += std::snprintf(buf + len, sizeof buf - len, ", in kernel %s block (%u,%u,%u) thread (%u,%u,%u)",
                         t->block && t->block->launch ? t->block->launch->name : "?", t->block_idx.x, t->block_idx.y,
                         t->block_idx.z, t->thread_idx.x, t->thread_idx.y, t->thread_idx.z);
  }
  len += std::snprintf(buf + len, sizeof buf - len, "\n");
  if (write(g_report_fd.load(), buf, static_cast<size_t>(len)) < 0) {
  }
  // hand over to the previous handler (Python's faulthandler prints the test) or the default
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
}

void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa{};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

}  // namespace

// ------------------------------------------------------------------ the kernel-facing interface
void fault(const std::string& message) { throw KernelFault{message}; }

void threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

void* dynamic_smem() {
  if (!g_current) fault("dynamic shared memory used outside a kernel");
  return g_current->block->smem;
}

void syncthreads(const std::source_location& where) {
  ThreadCtx* me = g_current;
  if (!me) fault("__syncthreads() outside a kernel");
  Block& b = *me->block;
  if (b.bar_arrived == 0) {
    b.bar_file = where.file_name();
    b.bar_line = where.line();
  } else if (b.bar_line != where.line() ||
             (b.bar_file != where.file_name() && std::strcmp(b.bar_file, where.file_name()) != 0)) {
    fault(std::string("__syncthreads() reached at ") + where.file_name() + ":" + std::to_string(where.line()) +
          " while " + std::to_string(b.bar_arrived) + " thread(s) wait at " + b.bar_file + ":" +
          std::to_string(b.bar_line) + " (a barrier in divergent code)");
  }
  me->wait_what = "__syncthreads";
  me->wait_file = where.file_name();
  me->wait_line = where.line();
  me->state = 1;
  b.bar_waiting.push_back(me->linear);
  if (++b.bar_arrived == b.live) complete_barrier(b);
  yield_current();
}

uint64_t warp_collective(unsigned mask, WarpOp op, uint64_t value, int arg, int width,
                         const std::source_location& where) {
  ThreadCtx* me = g_current;
  if (!me) fault(std::string(op_name(op)) + " outside a kernel");
  Block& b = *me->block;
  WarpState& w = b.warps[me->warp];
  const unsigned bit = 1u << me->lane;
  auto at = [&] { return std::string(" at ") + where.file_name() + ":" + std::to_string(where.line()); };
  if (!(mask & bit))
    fault(std::string(op_name(op)) + " with mask " + hex(mask) + " that excludes the calling lane" + at());
  if (mask & ~w.exists)
    fault(std::string(op_name(op)) + " with mask " + hex(mask) + " naming lanes that do not exist (block of " +
          std::to_string(b.threads.size()) + " threads)" + at());
  if (mask & ~w.live)
    fault(std::string(op_name(op)) + " with mask " + hex(mask) + " naming exited lanes " + hex(mask & ~w.live) +
          at());
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fault(std::string(op_name(op)) + " with width " + std::to_string(width) + at());
  WarpGroup* g = nullptr;
  for (WarpGroup& x : w.groups) {
    if (x.mask & mask) {
      if (x.mask != mask || x.op != op)
        fault(std::string(op_name(op)) + "(mask " + hex(mask) + ")" + at() + " while lanes " + hex(x.arrived) +
              " wait in " + op_name(x.op) + "(mask " + hex(x.mask) + ") at " + x.file + ":" + std::to_string(x.line) +
              " (divergent warp collectives)");
      g = &x;
      break;
    }
  }
  if (!g) {
    w.groups.emplace_back();
    g = &w.groups.back();
    g->mask = mask;
    g->op = op;
    g->file = where.file_name();
    g->line = where.line();
  }
  g->val[me->lane] = value;
  g->arg[me->lane] = arg;
  g->width[me->lane] = width;
  g->arrived |= bit;
  me->wait_what = op_name(op);
  me->wait_file = where.file_name();
  me->wait_line = where.line();
  me->state = 1;
  if (g->arrived == mask) {
    G().collectives.fetch_add(1, std::memory_order_relaxed);
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && g->val[l] != 0) ballot |= 1u << l;
    std::vector<int>& ids = b.scratch;
    ids.clear();
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      uint64_t r = 0;
      if (op == kOpBallot) {
        r = ballot;
      } else if (op != kOpSync) {
        const int wd = g->width[l], seg = l & ~(wd - 1);
        int src = l;
        switch (op) {
          case kOpShfl: src = seg + (g->arg[l] & (wd - 1)); break;
          case kOpShflXor: src = l ^ g->arg[l]; if (src >= seg + wd || src < 0) src = l; break;
          case kOpShflUp: src = l - g->arg[l]; if (src < seg) src = l; break;
          case kOpShflDown: src = l + g->arg[l]; if (src >= seg + wd) src = l; break;
          default: break;
        }
        if (!(mask >> src & 1u))
          fault(std::string(op_name(op)) + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                ", which is not in the mask " + hex(mask) + at() + " (undefined value)");
        r = g->val[src];
      }
      const int id = me->warp * 32 + l;
      b.threads[id].xresult = r;
      ids.push_back(id);
    }
    w.groups.erase(w.groups.begin() + (g - w.groups.data()));
    make_ready(b, ids);
  }
  yield_current();
  return me->xresult;
}

unsigned active_mask() {
  ThreadCtx* me = g_current;
  if (!me) fault("__activemask() outside a kernel");
  return me->block->warps[me->warp].live;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  Global& g = G();
  std::lock_guard<std::mutex> lock(g.mu);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > g.cfg.smem_optin) {
    return g.last_error = cudaErrorInvalidValue;
  }
  g.max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}

cudaError_t run_grid(const void* kernel, const char* name, const LaunchConfig& cfg, void (*thunk)(void*),
                     void* state) {
  if (g_current) fault(std::string("launch of ") + name + " from device code (dynamic parallelism) is not simulated");
  Global& g = G();
  std::lock_guard<std::mutex> lock(g.mu);
  auto finish = [&](cudaError_t status) {
    g.log.push_back({name, cfg.grid, cfg.block, cfg.smem, status});
    if (status != cudaSuccess && g.last_error == cudaSuccess) g.last_error = status;
    return status;
  };
  if (g.sticky != cudaSuccess) return finish(g.sticky);  // a failed kernel leaves the context unusable
  const dim3 gr = cfg.grid, bl = cfg.block;
  const uint64_t nthreads = uint64_t(bl.x) * bl.y * bl.z;
  if (nthreads == 0 || nthreads > 1024 || bl.x > 1024 || bl.y > 1024 || bl.z > 64 || gr.x == 0 || gr.y == 0 ||
      gr.z == 0 || gr.x > 2147483647u || gr.y > 65535 || gr.z > 65535)
    return finish(cudaErrorInvalidConfiguration);
  if (cfg.smem > 48 * 1024) {
    auto it = g.max_dynamic_smem.find(kernel);
    if (cfg.smem > static_cast<size_t>(g.cfg.smem_optin) || it == g.max_dynamic_smem.end() ||
        static_cast<size_t>(it->second) < cfg.smem)
      return finish(cudaErrorInvalidValue);  // needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) first
  }
  Launch L(cfg);
  L.name = name;
  L.thunk = thunk;
  L.state = state;
  L.nblocks = uint64_t(gr.x) * gr.y * gr.z;
  L.nthreads = static_cast<int>(nthreads);
  L.conf = g.cfg;
  const int workers = static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(L.nblocks, L.conf.workers)));
  std::vector<WorkerRes*> res;
  try {
    for (int i = 0; i < workers; ++i) res.push_back(take_resources(L.nthreads, L.conf.stack_bytes, cfg.smem));
  } catch (const std::exception& e) {
    for (WorkerRes* r : res) give_back(r);
    g.fault = e.what();
    return finish(cudaErrorMemoryAllocation);
  }
  std::vector<std::thread> extra;
  for (int i = 1; i < workers; ++i) extra.emplace_back(worker_loop, std::ref(L), res[i]);
  worker_loop(L, res[0]);
  for (std::thread& t : extra) t.join();
  for (WorkerRes* r : res) give_back(r);
  if (L.failed) {
    g.sticky = cudaErrorLaunchFailure;
    if (g.fault.empty()) g.fault = L.fault;
    return finish(cudaErrorLaunchFailure);
  }
  return finish(cudaSuccess);
}

}  // namespace sim

// ------------------------------------------------------------------ CUDA runtime calls
using sim::G;

cudaError_t cudaGetDevice(int* device) {
  if (!device) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: {
      std::lock_guard<std::mutex> lock(G().mu);
      *value = G().cfg.smem_optin;
      return cudaSuccess;
    }
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(G().mu);
  const cudaError_t e = G().sticky != cudaSuccess ? G().sticky : G().last_error;
  G().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(G().mu);
  return G().sticky != cudaSuccess ? G().sticky : G().last_error;
}
const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorUnknown: return "cudaErrorUnknown";
  }
  return "unrecognized error code";
}
const char* cudaGetErrorString(cudaError_t err) { return cudaGetErrorName(err); }
cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaPeekAtLastError(); }
cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (!ptr) return cudaErrorInvalidValue;
  size_t mb;
  char* map;
  *ptr = sim::guarded_map(bytes, 256, 0, "a cudaMalloc buffer", &mb, &map);
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* ptr) {
  if (ptr) sim::guarded_unmap(static_cast<char*>(ptr));
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (!ptr && bytes) return cudaErrorInvalidValue;
  if (bytes) std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) { return cudaMemset(ptr, value, bytes); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if ((!dst || !src) && bytes) return cudaErrorInvalidValue;
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}

// ------------------------------------------------------------------ the C interface for the tests
extern "C" {

// Settings: workers (OS threads running blocks), schedule (0 forward, 1 reverse,
// 2 random), seed, smem_optin (the device's opt-in shared memory per block),
// stack_kib, report_fd (the file descriptor an invalid memory access is reported
// on before the process dies; default 2). Returns 0, or -1 for an unknown key or a bad value.
int sim_set(const char* key, long long value) {
  sim::Global& g = G();
  std::lock_guard<std::mutex> lock(g.mu);
  const std::string k(key);
  if (k == "workers" && value >= 1 && value <= 64) g.cfg.workers = static_cast<int>(value);
  else if (k == "schedule" && value >= 0 && value <= 2) g.cfg.schedule = static_cast<int>(value);
  else if (k == "seed") g.cfg.seed = static_cast<uint64_t>(value);
  else if (k == "smem_optin" && value >= 0 && value <= (1 << 30)) g.cfg.smem_optin = static_cast<int>(value);
  else if (k == "stack_kib" && value >= 16 && value <= 65536) g.cfg.stack_bytes = static_cast<size_t>(value) * 1024;
  else if (k == "report_fd" && value >= 0 && value < (1 << 20)) sim::g_report_fd = static_cast<int>(value);
  else return -1;
  return 0;
}

long long sim_get(const char* key) {
  sim::Global& g = G();
  std::lock_guard<std::mutex> lock(g.mu);
  const std::string k(key);
  if (k == "workers") return g.cfg.workers;
  if (k == "schedule") return g.cfg.schedule;
  if (k == "seed") return static_cast<long long>(g.cfg.seed);
  if (k == "smem_optin") return g.cfg.smem_optin;
  if (k == "blocks") return g.blocks.load();
  if (k == "threads") return g.threads.load();
  if (k == "barriers") return g.barriers.load();
  if (k == "collectives") return g.collectives.load();
  if (k == "sticky") return g.sticky;
  if (k == "last_error") return g.last_error;
  return -1;
}

// Clears the errors, the fault message and the launch log (a fresh context).
void sim_reset() {
  sim::Global& g = G();
  std::lock_guard<std::mutex> lock(g.mu);
  g.last_error = g.sticky = cudaSuccess;
  g.fault.clear();
  g.log.clear();
}

const char* sim_fault() {
  sim::Global& g = G();
  std::lock_guard<std::mutex> lock(g.mu);
  return g.fault.c_str();
}

int sim_launch_count() {
  std::lock_guard<std::mutex> lock(G().mu);
  return static_cast<int>(G().log.size());
}

// Launch i of the log as "name|gx gy gz|bx by bz|smem|status" into buf.
int sim_launch_info(int i, char* buf, int size) {
  std::lock_guard<std::mutex> lock(G().mu);
  if (i < 0 || i >= static_cast<int>(G().log.size())) return -1;
  const sim::LaunchRecord& r = G().log[i];
  return std::snprintf(buf, size, "%s|%u %u %u|%u %u %u|%zu|%d", r.name.c_str(), r.grid.x, r.grid.y, r.grid.z,
                       r.block.x, r.block.y, r.block.z, r.smem, static_cast<int>(r.status));
}

// `bytes` of 0xFF between two inaccessible pages; mode 0: the last byte is
// just before the back guard (overruns fault), mode 1: the first byte is just
// after the front guard (underruns fault). align: a power of two ≤ the page.
void* sim_malloc(size_t bytes, size_t align, int mode) {
  size_t mb;
  char* map;
  char* p = sim::guarded_map(bytes, align, mode, "a test buffer", &mb, &map);
  if (p && bytes) std::memset(p, 0xFF, bytes);
  return p;
}

void sim_free(void* p) {
  if (p) sim::guarded_unmap(static_cast<char*>(p));
}

}  // extern "C"
