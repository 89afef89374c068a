/* npucc's parallel launcher, linked into every kernels.so (targets/tvm_codegen.py).
 *
 * A TVM parallel loop compiles to a lambda `int f(int task_id, TVMParallelGroupEnv* penv,
 * void* cdata)` that runs the task_id-th of penv->num_task contiguous slices of the loop, and
 * to a call through the library's `__TVMBackendParallelLaunch` pointer, which TVM's loader
 * fills with its own pool (a static split: task i on worker i, so one descheduled worker
 * stalls every launch). The runtime (runtime/pool.py) points that slot at
 * npucc_parallel_launch instead: the loop is cut into more chunks than threads, and every
 * thread (the caller too) takes the next chunk from an atomic counter until none is left, so
 * a thread that is not running simply takes fewer chunks (ggml's scheme).
 *
 * - Workers spin for a while after a launch, then sleep on a condition variable: an idle
 *   runtime uses no CPU.
 * - The launching thread, out of chunks, spins briefly for the workers' last ones, then
 *   blocks until the last one is done (wait_done), so the kernel may move a descheduled worker
 *   onto its core.
 * - A launch from inside a chunk, or while another thread's launch holds the pool, runs all
 *   of its slices on the calling thread (correct, never blocked).
 * - Per parallel loop (its lambda's address), a launch cost check in the spirit of
 *   onnxruntime's TryParallelFor: the first launches of a loop run shared out and timed; if
 *   the best took under `probe_ns`, the next ones run on the calling thread alone and are
 *   timed too (two are enough if both are 25% slower than the best shared one); then
 *   the loop runs alone if that measured a fifth faster, else shared out (a small kernel,
 *   where waking and handing out chunks costs more than the second thread gains, stays on
 *   the caller). The decision is measured again every NPUCC_REPROBE launches of the loop (the
 *   machine's load changes). No CPU-specific threshold: each loop is timed where it runs.
 * - TVMBackendParallelBarrier assumes every task runs at once; a library whose code calls it
 *   is left on TVM's pool (runtime/pool.py checks for `__TVMBackendParallelBarrier`).
 * - After fork() the child has no workers; they are started again at its first launch.
 *
 * Valid C and C++ (g++ compiles .c files as C++; export_library links this file with the
 * compiler it uses for the kernels, including the aarch64 cross g++). GCC/Clang __atomic
 * builtins throughout.
 */
#pragma GCC optimize("O2")
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

/* tvm_ffi's error slot is thread-local: a worker's error moves to the launching thread.
 * Weak, so that the library still loads where they are absent (then the message is lost,
 * the launch still fails). */
void TVMFFIErrorMoveFromRaised(void** result) __attribute__((weak));
void TVMFFIErrorSetRaised(void* error) __attribute__((weak));
int TVMFFIObjectDecRef(void* obj) __attribute__((weak));

#define NPUCC_MAX_THREADS 64
#define NPUCC_LINE 64
#define NPUCC_WAIT_SPINS 4096  /* pause loops the launching thread spins before it blocks */
#define NPUCC_SITES 1024       /* parallel loops whose launch decision is kept (power of 2) */
#define NPUCC_PROBES 3         /* timed launches per way (shared out, caller only) */
#define NPUCC_REPROBE 2048     /* launches of a loop before its decision is measured again */

enum { SITE_PROBE_PAR = 0, SITE_PROBE_SER, SITE_PARALLEL, SITE_SERIAL };

typedef struct {
  uintptr_t f;               /* the loop's lambda; 0: free slot */
  int32_t state;             /* SITE_* */
  int32_t runs;              /* launches in this state */
  int64_t par_ns, ser_ns;    /* best timed launch each way */
} npucc_site;

typedef struct {
  int64_t chunks;            /* chunks this thread ran */
  char pad[NPUCC_LINE - sizeof(int64_t)];
} npucc_counter;

static struct {
  int n_threads;             /* caller + workers */
  int chunks_per_thread;
  int64_t spin_ns;           /* how long a worker spins before sleeping */
  int started;               /* workers running */
  uint32_t start_gen;        /* the generation before the launch that started them */
  pthread_t workers[NPUCC_MAX_THREADS];
  pthread_mutex_t launch_mu; /* one launch at a time; others run serially */
  pthread_mutex_t sleep_mu;
  pthread_cond_t sleep_cv;
  int sleepers;
  int stop;
  pthread_cond_t done_cv;    /* the launching thread blocks on it (sleep_mu) for the last chunks */
  int caller_waits;          /* it does: the thread finishing the last chunk signals */
  /* the current launch: `state` packs (generation << 32 | next chunk). A thread claims a
   * chunk with a CAS on it, which also proves that the job fields it read belong to that
   * generation (they are rewritten only after all of a generation's chunks ran). */
  uint64_t state;
  uintptr_t job_f, job_cdata;
  int job_chunks;
  int done;                  /* chunks finished in this generation */
  void* error;               /* a worker's tvm_ffi error (owned) */
  int failed;
  int stall_thread;          /* tests: this thread holds its chunk until all are claimed */
  int stall_us;              /* ... and then sleeps this long more (time off its core) */
  int64_t launches, serial_launches;
  int adaptive;              /* per-loop launch decision on (npucc_pool_adaptive) */
  int64_t probe_ns;          /* a loop whose best shared-out launch took less is also timed
                              * on the caller alone */
  int64_t caller_launches;   /* launches the decision ran on the caller alone */
  int64_t wakes;             /* launches that had to wake sleeping workers */
  npucc_site sites[NPUCC_SITES];  /* read and written under launch_mu only */
  npucc_counter counts[NPUCC_MAX_THREADS];
} P;  /* static storage: zero-initialized */

static __thread int t_in_task;  /* this thread is running a chunk */

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int run_serial(FTVMParallelLambda f, void* cdata, int num_task) {
  TVMParallelGroupEnv env;
  int32_t sync = 0, i, rc = 0;
  env.sync_handle = &sync;
  env.num_task = num_task > 0 ? num_task : 1;
  __atomic_add_fetch(&P.serial_launches, 1, __ATOMIC_RELAXED);
  for (i = 0; i < env.num_task && rc == 0; ++i) rc = f(i, &env, cdata);
  return rc;
}

/* Claim and run chunks of generation `gen` until none is left. */
static void run_chunks(uint32_t gen, int self) {
  uint64_t s = __atomic_load_n(&P.state, __ATOMIC_ACQUIRE);
  TVMParallelGroupEnv env;
  int32_t sync = 0;
  env.sync_handle = &sync;
  for (;;) {
    if ((uint32_t)(s >> 32) != gen) return;
    FTVMParallelLambda f = (FTVMParallelLambda)__atomic_load_n(&P.job_f, __ATOMIC_RELAXED);
    void* cdata = (void*)__atomic_load_n(&P.job_cdata, __ATOMIC_RELAXED);
    int n = __atomic_load_n(&P.job_chunks, __ATOMIC_RELAXED);
    int chunk = (int)(uint32_t)s;
    if (chunk >= n) return;
    if (!__atomic_compare_exchange_n(&P.state, &s, s + 1, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
      continue;  /* s now holds the current state */
    if (self == __atomic_load_n(&P.stall_thread, __ATOMIC_RELAXED)) {
      /* a descheduled thread, made deterministic: hold this chunk until all are claimed */
      uint64_t t;
      do {
        cpu_relax();
        t = __atomic_load_n(&P.state, __ATOMIC_ACQUIRE);
      } while ((uint32_t)(t >> 32) == gen && (int)(uint32_t)t < n);
      int us = __atomic_load_n(&P.stall_us, __ATOMIC_RELAXED);
      if (us > 0) {
        struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000};
        nanosleep(&ts, NULL);
      }
    }
    env.num_task = n;
    t_in_task = 1;
    int rc = f(chunk, &env, cdata);
    t_in_task = 0;
    if (rc != 0) {
      void* err = NULL;
      if (self != 0 && TVMFFIErrorMoveFromRaised) TVMFFIErrorMoveFromRaised(&err);
      if (__atomic_exchange_n(&P.failed, 1, __ATOMIC_ACQ_REL) == 0 && err) {
        __atomic_store_n(&P.error, err, __ATOMIC_RELEASE);
      } else if (err && TVMFFIObjectDecRef) {
        TVMFFIObjectDecRef(err);
      }
    }
    __atomic_add_fetch(&P.counts[self].chunks, 1, __ATOMIC_RELAXED);
    if (__atomic_add_fetch(&P.done, 1, __ATOMIC_SEQ_CST) == n &&
        __atomic_load_n(&P.caller_waits, __ATOMIC_SEQ_CST)) {
      pthread_mutex_lock(&P.sleep_mu);
      pthread_cond_broadcast(&P.done_cv);
      pthread_mutex_unlock(&P.sleep_mu);
    }
    s = __atomic_load_n(&P.state, __ATOMIC_ACQUIRE);
  }
}

static void* worker_main(void* arg) {
  int self = (int)(intptr_t)arg;
  uint32_t seen = P.start_gen;  /* the launch that started this worker comes after it */
  for (;;) {
    int64_t until = now_ns() + P.spin_ns;
    uint32_t gen;
    int spins = 0;
    for (;;) {
      gen = (uint32_t)(__atomic_load_n(&P.state, __ATOMIC_ACQUIRE) >> 32);
      if (gen != seen || __atomic_load_n(&P.stop, __ATOMIC_ACQUIRE)) break;
      cpu_relax();
      if (++spins % 256 == 0 && now_ns() > until) {
        pthread_mutex_lock(&P.sleep_mu);
        __atomic_add_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
        for (;;) {
          gen = (uint32_t)(__atomic_load_n(&P.state, __ATOMIC_SEQ_CST) >> 32);
          if (gen != seen || __atomic_load_n(&P.stop, __ATOMIC_SEQ_CST)) break;
          pthread_cond_wait(&P.sleep_cv, &P.sleep_mu);
        }
        __atomic_sub_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&P.sleep_mu);
        break;
      }
    }
    if (__atomic_load_n(&P.stop, __ATOMIC_ACQUIRE)) return NULL;
    seen = gen;
    run_chunks(gen, self);
  }
}

static void stop_workers(void) {
  int i;
  if (!P.started) return;
  pthread_mutex_lock(&P.sleep_mu);
  __atomic_store_n(&P.stop, 1, __ATOMIC_SEQ_CST);
  pthread_cond_broadcast(&P.sleep_cv);
  pthread_mutex_unlock(&P.sleep_mu);
  for (i = 1; i < P.n_threads; ++i) pthread_join(P.workers[i], NULL);
  P.started = 0;
  __atomic_store_n(&P.stop, 0, __ATOMIC_SEQ_CST);
}

/* Called with launch_mu held. Returns the number of threads that run (1: none started). */
static int start_workers(void) {
  int i;
  if (P.started) return P.n_threads;
  P.start_gen = (uint32_t)(__atomic_load_n(&P.state, __ATOMIC_ACQUIRE) >> 32);
  for (i = 1; i < P.n_threads; ++i) {
    if (pthread_create(&P.workers[i], NULL, worker_main, (void*)(intptr_t)i) != 0) {
      int n = i;
      P.n_threads = n;   /* run with the threads we got */
      break;
    }
  }
  P.started = 1;
  return P.n_threads;
}

static void after_fork_child(void) {
  /* the child has only the forking thread: forget the workers, reset the locks */
  pthread_mutex_init(&P.launch_mu, NULL);
  pthread_mutex_init(&P.sleep_mu, NULL);
  pthread_cond_init(&P.sleep_cv, NULL);
  pthread_cond_init(&P.done_cv, NULL);
  P.caller_waits = 0;
  P.started = 0;
  P.sleepers = 0;
  P.stop = 0;
  t_in_task = 0;
}

/* The launching thread, out of chunks, waits for the workers' last ones: it spins briefly
 * (a running worker finishes within microseconds), then blocks. Blocking, not yielding: a
 * worker that holds a chunk but was descheduled (another process took its core) is then
 * pulled onto this thread's idle core by the kernel's idle balancing, instead of waiting
 * for its turn behind the other process. */
static void wait_done(int chunks) {
  int spins = 0;
  while (__atomic_load_n(&P.done, __ATOMIC_ACQUIRE) < chunks) {
    if (++spins < NPUCC_WAIT_SPINS) {
      cpu_relax();
      continue;
    }
    pthread_mutex_lock(&P.sleep_mu);
    __atomic_store_n(&P.caller_waits, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&P.done, __ATOMIC_SEQ_CST) < chunks)
      pthread_cond_wait(&P.done_cv, &P.sleep_mu);
    __atomic_store_n(&P.caller_waits, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&P.sleep_mu);
  }
}

/* The decision slot of loop `f` (launch_mu held); NULL when the table is full. */
static npucc_site* find_site(FTVMParallelLambda f) {
  uintptr_t key = (uintptr_t)f;
  size_t h = (size_t)((key >> 4) * 0x9E3779B97F4A7C15ull) & (NPUCC_SITES - 1);
  int i;
  for (i = 0; i < NPUCC_SITES; ++i, h = (h + 1) & (NPUCC_SITES - 1)) {
    npucc_site* site = &P.sites[h];
    if (site->f == key) return site;
    if (site->f == 0) {
      memset(site, 0, sizeof(*site));
      site->f = key;
      return site;
    }
  }
  return NULL;
}

/* After a launch of `site` that took `ns` (shared out if `par`): the next state. */
static void site_record(npucc_site* site, int par, int64_t ns) {
  int64_t* best = par ? &site->par_ns : &site->ser_ns;
  if (site->state == SITE_PROBE_PAR || site->state == SITE_PROBE_SER) {
    if (site->runs == 0 || ns < *best) *best = ns;
    if (!par && site->runs >= 1 && *best > site->par_ns + site->par_ns / 4) {
      /* clearly slower alone (a loop that scales): two serial launches are enough to know
       * (not one: a single launch may have been preempted) */
      site->state = SITE_PARALLEL;
      site->runs = 0;
      return;
    }
    if (++site->runs < NPUCC_PROBES) return;
    site->runs = 0;
    if (site->state == SITE_PROBE_PAR)
      site->state = site->par_ns < P.probe_ns ? SITE_PROBE_SER : SITE_PARALLEL;
    else
      /* alone only when clearly faster (by a fifth): a loop decided while another process
       * held the second core must not stay on one thread once the core is free again */
      site->state = site->ser_ns * 5 < site->par_ns * 4 ? SITE_SERIAL : SITE_PARALLEL;
    return;
  }
  if (++site->runs >= NPUCC_REPROBE) {  /* measure again */
    site->state = SITE_PROBE_PAR;
    site->runs = 0;
  }
}

/* Shares the loop out (launch_mu held, workers started); returns the launch's result. */
static int launch_shared(FTVMParallelLambda f, void* cdata, int num_task);

int npucc_parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  npucc_site* site;
  int64_t t0;
  int rc, par;
  if (P.n_threads <= 1 || t_in_task || pthread_mutex_trylock(&P.launch_mu) != 0)
    return run_serial(f, cdata, num_task);
  if (start_workers() <= 1) {
    pthread_mutex_unlock(&P.launch_mu);
    return run_serial(f, cdata, num_task);
  }
  site = P.adaptive ? find_site(f) : NULL;
  if (site == NULL) {
    rc = launch_shared(f, cdata, num_task);
    pthread_mutex_unlock(&P.launch_mu);
    return rc;
  }
  par = site->state != SITE_SERIAL && site->state != SITE_PROBE_SER;
  t0 = now_ns();
  if (par) {
    rc = launch_shared(f, cdata, num_task);
  } else {
    __atomic_add_fetch(&P.caller_launches, 1, __ATOMIC_RELAXED);
    rc = run_serial(f, cdata, num_task);
  }
  site_record(site, par, now_ns() - t0);
  pthread_mutex_unlock(&P.launch_mu);
  return rc;
}

static int launch_shared(FTVMParallelLambda f, void* cdata, int num_task) {
  int n, chunks, failed;
  uint64_t s;
  uint32_t gen;
  n = P.n_threads;
  chunks = num_task > 0 ? num_task : n * P.chunks_per_thread;
  __atomic_store_n(&P.job_f, (uintptr_t)f, __ATOMIC_RELAXED);
  __atomic_store_n(&P.job_cdata, (uintptr_t)cdata, __ATOMIC_RELAXED);
  __atomic_store_n(&P.job_chunks, chunks, __ATOMIC_RELAXED);
  __atomic_store_n(&P.done, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&P.failed, 0, __ATOMIC_RELAXED);
  s = __atomic_load_n(&P.state, __ATOMIC_RELAXED);
  gen = (uint32_t)(s >> 32) + 1;
  __atomic_store_n(&P.state, (uint64_t)gen << 32, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&P.sleepers, __ATOMIC_SEQ_CST) > 0) {
    __atomic_add_fetch(&P.wakes, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&P.sleep_mu);
    pthread_cond_broadcast(&P.sleep_cv);
    pthread_mutex_unlock(&P.sleep_mu);
  }
  run_chunks(gen, 0);
  wait_done(chunks);
  __atomic_add_fetch(&P.launches, 1, __ATOMIC_RELAXED);
  failed = __atomic_load_n(&P.failed, __ATOMIC_ACQUIRE);
  if (failed) {
    void* err = __atomic_exchange_n(&P.error, (void*)NULL, __ATOMIC_ACQ_REL);
    if (err && TVMFFIErrorSetRaised) {
      TVMFFIErrorSetRaised(err);
      if (TVMFFIObjectDecRef) TVMFFIObjectDecRef(err);
    }
  }
  return failed ? -1 : 0;
}

/* Configure the pool (before or between launches): `n_threads` including the caller,
 * `chunks_per_thread` chunks per thread and launch, workers spin `spin_us` before sleeping.
 * Returns the thread count in use. */
int npucc_pool_configure(int n_threads, int chunks_per_thread, int spin_us) {
  static int once = 0;
  if (!once) {
    once = 1;
    pthread_mutex_init(&P.launch_mu, NULL);
    pthread_mutex_init(&P.sleep_mu, NULL);
    pthread_cond_init(&P.sleep_cv, NULL);
    pthread_cond_init(&P.done_cv, NULL);
    P.stall_thread = -1;
    pthread_atfork(NULL, NULL, after_fork_child);
  }
  if (n_threads < 1) n_threads = 1;
  if (n_threads > NPUCC_MAX_THREADS) n_threads = NPUCC_MAX_THREADS;
  pthread_mutex_lock(&P.launch_mu);
  stop_workers();
  P.n_threads = n_threads;
  P.chunks_per_thread = chunks_per_thread < 1 ? 1 : chunks_per_thread;
  P.spin_ns = (int64_t)(spin_us < 0 ? 0 : spin_us) * 1000;
  pthread_mutex_unlock(&P.launch_mu);
  return n_threads;
}

/* Statistics: out[0] launches through the pool, out[1] launches run serially, out[2 + i]
 * chunks run by thread i (0: the launching thread) for i < n; returns the thread count. */
int npucc_pool_stats(int64_t* out, int n) {
  int i;
  out[0] = __atomic_load_n(&P.launches, __ATOMIC_RELAXED);
  out[1] = __atomic_load_n(&P.serial_launches, __ATOMIC_RELAXED);
  for (i = 0; i < n && i < NPUCC_MAX_THREADS; ++i)
    out[2 + i] = __atomic_load_n(&P.counts[i].chunks, __ATOMIC_RELAXED);
  return P.n_threads;
}

/* The per-loop launch decision: on (`probe_us` > 0: loops whose best shared-out launch
 * takes less than that many µs are timed on the caller alone too) or off (every launch is
 * shared out); decisions already taken are forgotten. */
void npucc_pool_adaptive(int on, int probe_us) {
  pthread_mutex_lock(&P.launch_mu);
  P.adaptive = on && probe_us > 0;
  P.probe_ns = (int64_t)(probe_us > 0 ? probe_us : 0) * 1000;
  memset(P.sites, 0, sizeof(P.sites));
  pthread_mutex_unlock(&P.launch_mu);
}

/* out[0]: launches the decision ran on the caller alone, out[1]: loops decided "caller
 * alone" now, out[2]: loops decided "shared out", out[3]: launches that woke workers. */
void npucc_pool_adaptive_stats(int64_t* out) {
  int i;
  int64_t ser = 0, par = 0;
  pthread_mutex_lock(&P.launch_mu);
  for (i = 0; i < NPUCC_SITES; ++i) {
    if (P.sites[i].f == 0) continue;
    ser += P.sites[i].state == SITE_SERIAL;
    par += P.sites[i].state == SITE_PARALLEL;
  }
  pthread_mutex_unlock(&P.launch_mu);
  out[0] = __atomic_load_n(&P.caller_launches, __ATOMIC_RELAXED);
  out[1] = ser;
  out[2] = par;
  out[3] = __atomic_load_n(&P.wakes, __ATOMIC_RELAXED);
}

void npucc_pool_reset_stats(void) {
  int i;
  __atomic_store_n(&P.caller_launches, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&P.wakes, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&P.launches, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&P.serial_launches, 0, __ATOMIC_RELAXED);
  for (i = 0; i < NPUCC_MAX_THREADS; ++i) __atomic_store_n(&P.counts[i].chunks, 0, __ATOMIC_RELAXED);
}

/* Tests: thread `index` (0: the launching thread, -1: none) holds each chunk it claims until
 * every chunk of the launch is claimed, as a descheduled thread would. */
void npucc_pool_stall_thread(int index) { __atomic_store_n(&P.stall_thread, index, __ATOMIC_RELAXED); }

/* Tests: the stalled thread then sleeps `us` microseconds more before it runs its chunk. */
void npucc_pool_stall_us(int us) { __atomic_store_n(&P.stall_us, us, __ATOMIC_RELAXED); }

__attribute__((destructor)) static void npucc_pool_unload(void) {
  /* dlclose: the workers' code is about to be unmapped, stop them. At exit() another
   * thread may still be inside a launch: never wait for it, just tell the workers to stop. */
  if (!P.started) return;
  if (pthread_mutex_trylock(&P.launch_mu) == 0) {
    stop_workers();
    pthread_mutex_unlock(&P.launch_mu);
  } else {
    pthread_mutex_lock(&P.sleep_mu);
    __atomic_store_n(&P.stop, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&P.sleep_cv);
    pthread_mutex_unlock(&P.sleep_mu);
  }
}

#ifdef __cplusplus
}
#endif
