/* Float32 matmul against a pre-packed weight, for the mLSTM's per-step recurrent products on CPU.
 *
 * Why our own kernel (measured in packed_matmul.py's docstring): each time step multiplies only B rows
 * (B = 32 in the benchmark) by a weight of up to 4H x H, and oneDNN's inner product reaches about
 * half of this CPU's FMA peak at that shape.  A GotoBLAS-style kernel over a weight packed once per
 * loop does better:
 *
 *   - pack():   the weight B[K, N] (any strides) becomes strips of NR = 24 columns, each strip K rows
 *               of NR adjacent floats (the last strip is 8 or 16 wide), read front to back.
 *   - matmul(): C[M, N] = A[M, K] @ B (+ I[M, N]).  For each strip and each KC-row block of it (a
 *               24 KiB panel that stays in L1), the 4 x 24 micro-kernel runs down the rows of A,
 *               keeping 12 AVX2 accumulators in registers.  A needs no packing: its 4 rows are read as
 *               4 sequential streams.  The next panel is prefetched into L2 while this one is used.
 *   - threads:  strips are split between the calling thread and a small persistent pool (creating a
 *               thread per call cost ~100 us here, as much as a whole small matmul).  Workers spin
 *               briefly between calls, because the loop calls again within ~0.2 ms, then sleep.
 *
 * The kernels need AVX2 and FMA (x86-64-v3); supported() says whether this CPU has them, and the
 * Python side falls back to torch when it does not, or when N is not a multiple of 8.  Python checks
 * dtypes, shapes and strides before calling: the C code trusts the pointers it is given.
 * The GIL is released while packing or multiplying.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define NR 24       /* columns per strip: 3 AVX2 vectors */
#define MR 4        /* rows of A per micro-kernel call */
#define KC 256      /* rows of a strip per L1-resident panel */
#define MAX_THREADS 64
#define SPIN_PAUSES 16384 /* ~0.3-0.7 ms of spinning before a worker sleeps */

typedef struct {
    Py_ssize_t m, k, n;
    const float *a;
    Py_ssize_t lda;
    const float *packed;
    float *c;
    Py_ssize_t ldc;
    const float *init; /* NULL: C = A @ B; else C = I + A @ B */
    Py_ssize_t ldi;
    Py_ssize_t strip_lo, strip_hi;
} job_t;

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_KERNELS 1
#include <immintrin.h>
/* Only these functions use AVX2/FMA (a function attribute, which GCC and clang both honour); the
 * module itself loads on any x86-64, and supported() checks the CPU before the kernels run. */
#define AVX2_FMA __attribute__((target("avx2,fma")))

/* One R x (8*V) block of C over kc rows of a panel.  mode 0: C = A B; 1: C += A B; 2: C = I + A B.
 * R and V are constants in each instantiation below, so the loops unroll into registers. */
static inline __attribute__((always_inline)) AVX2_FMA void micro(const int R, const int V, Py_ssize_t kc,
        const float *a, Py_ssize_t lda, const float *b, float *c, Py_ssize_t ldc, const float *init,
        Py_ssize_t ldi, int mode, const char *prefetch, Py_ssize_t lines) {
    __m256 acc[MR][3];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        _Pragma("GCC unroll 3") for (int v = 0; v < V; v++) {
            acc[r][v] = mode == 0   ? _mm256_setzero_ps()
                        : mode == 1 ? _mm256_loadu_ps(c + r * ldc + 8 * v)
                                    : _mm256_loadu_ps(init + r * ldi + 8 * v);
        }
    }
    for (Py_ssize_t k = 0; k < kc; k++) {
        if (k < lines) _mm_prefetch(prefetch + 64 * k, _MM_HINT_T1);
        __m256 bv[3];
        _Pragma("GCC unroll 3") for (int v = 0; v < V; v++) bv[v] = _mm256_loadu_ps(b + 8 * v);
        b += 8 * V;
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256 x = _mm256_broadcast_ss(a + r * lda + k);
            _Pragma("GCC unroll 3") for (int v = 0; v < V; v++) acc[r][v] = _mm256_fmadd_ps(x, bv[v], acc[r][v]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        _Pragma("GCC unroll 3") for (int v = 0; v < V; v++) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
    }
}

typedef void (*micro_fn)(Py_ssize_t, const float *, Py_ssize_t, const float *, float *, Py_ssize_t,
                         const float *, Py_ssize_t, int, const char *, Py_ssize_t);
#define MICRO(R, V)                                                                                      \
    static AVX2_FMA void micro_##R##_##V(Py_ssize_t kc, const float *a, Py_ssize_t lda, const float *b, float *c, \
                                Py_ssize_t ldc, const float *init, Py_ssize_t ldi, int mode,              \
                                const char *prefetch, Py_ssize_t lines) {                                \
        micro(R, V, kc, a, lda, b, c, ldc, init, ldi, mode, prefetch, lines);                            \
    }
MICRO(1, 1) MICRO(1, 2) MICRO(1, 3) MICRO(2, 1) MICRO(2, 2) MICRO(2, 3)
MICRO(3, 1) MICRO(3, 2) MICRO(3, 3) MICRO(4, 1) MICRO(4, 2) MICRO(4, 3)
static const micro_fn MICROS[MR][3] = {
    {micro_1_1, micro_1_2, micro_1_3}, {micro_2_1, micro_2_2, micro_2_3},
    {micro_3_1, micro_3_2, micro_3_3}, {micro_4_1, micro_4_2, micro_4_3},
};

static inline Py_ssize_t min_size(Py_ssize_t a, Py_ssize_t b) { return a < b ? a : b; }

/* The job's strips, panel by panel.  While the row blocks use one panel, each fetches its share of
 * the next panel's cache lines into L2, so the weight streams in from L3/DRAM ahead of use. */
static void run_job(const job_t *j) {
    Py_ssize_t row_blocks = (j->m + MR - 1) / MR;
    for (Py_ssize_t s = j->strip_lo; s < j->strip_hi; s++) {
        Py_ssize_t col = s * NR, width = min_size(NR, j->n - col);
        const float *strip = j->packed + col * j->k;
        for (Py_ssize_t k0 = 0; k0 < j->k; k0 += KC) {
            Py_ssize_t kc = min_size(KC, j->k - k0);
            int mode = k0 > 0 ? 1 : (j->init ? 2 : 0);
            int last = s + 1 == j->strip_hi && k0 + KC >= j->k;
            const char *next = (const char *)(strip + (k0 + kc) * width); /* next panel or next strip */
            Py_ssize_t lines = last ? 0 : (min_size(KC, j->k - k0 - kc > 0 ? j->k - k0 - kc : j->k) * NR * 4 + 63) / 64;
            Py_ssize_t share = (lines + row_blocks - 1) / row_blocks;
            for (Py_ssize_t i = 0; i < j->m; i += MR) {
                Py_ssize_t rows = min_size(MR, j->m - i), first = (i / MR) * share;
                Py_ssize_t mine = first >= lines ? 0 : min_size(share, lines - first);
                MICROS[rows - 1][width / 8 - 1](kc, j->a + i * j->lda + k0, j->lda, strip + k0 * width,
                                                j->c + i * j->ldc + col, j->ldc,
                                                j->init ? j->init + i * j->ldi + col : NULL, j->ldi, mode,
                                                next + 64 * first, mine);
            }
        }
    }
}

static inline void cpu_pause(void) { _mm_pause(); }
#else
#define HAVE_KERNELS 0
static void run_job(const job_t *j) { (void)j; }
static inline void cpu_pause(void) {}
#endif

/* ---- the worker pool ------------------------------------------------------------------------------
 * Every worker takes part in every call (extra workers get an empty strip range), so each call's
 * `pending` count is exact and no worker can skip a generation.  A worker spins on `generation`, then
 * sleeps on the condition variable; the caller signals only when someone sleeps.  All atomics are
 * sequentially consistent, which makes the sleepers check race-free: either the caller sees the
 * sleeper and signals under the mutex, or the sleeper's re-check under the mutex sees the new
 * generation. */
static struct {
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    atomic_ulong generation;
    atomic_int pending;
    atomic_int sleepers;
    int workers;
    job_t jobs[MAX_THREADS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t pool_user = PTHREAD_MUTEX_INITIALIZER; /* one call at a time uses the pool */
static uintptr_t worker_start_generation[MAX_THREADS];

static void *worker_main(void *arg) {
    int index = (int)(intptr_t)arg;
    unsigned long seen = worker_start_generation[index];
    for (;;) {
        unsigned long now = atomic_load(&pool.generation);
        for (int spins = 0; now == seen && spins < SPIN_PAUSES; spins++) {
            cpu_pause();
            now = atomic_load(&pool.generation);
        }
        if (now == seen) {
            pthread_mutex_lock(&pool.mutex);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((now = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.mutex);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mutex);
        }
        seen = now;
        run_job(&pool.jobs[index]);
        atomic_fetch_sub(&pool.pending, 1);
    }
    return NULL;
}

/* Grow the pool to `wanted` workers (no call in flight); returns how many exist. */
static int grow_pool(int wanted) {
    while (pool.workers < wanted) {
        int index = pool.workers + 1;
        pthread_t thread;
        pthread_attr_t attr;
        worker_start_generation[index] = atomic_load(&pool.generation);
        pool.jobs[index].strip_lo = pool.jobs[index].strip_hi = 0;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)index);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    return pool.workers;
}

/* A forked child has the pool's memory but none of its threads: start over. */
static void reset_pool_in_child(void) {
    pthread_mutex_init(&pool.mutex, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&pool_user, NULL);
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.sleepers, 0);
    pool.workers = 0;
}

/* Where thread t of `used` starts: an even strip, so that two threads' columns of C never share a
 * cache line (2 strips are 192 bytes; a split after an odd strip lands mid-line, in every row). */
static Py_ssize_t split_point(Py_ssize_t strips, int t, int used) {
    return t == used ? strips : (strips * t / used) & ~(Py_ssize_t)1;
}

/* Split the strips of `whole` over up to `threads` threads (the caller included) and run them. */
static void run_parallel(const job_t *whole, int threads) {
    Py_ssize_t strips = (whole->n + NR - 1) / NR;
    if (threads > strips) threads = (int)strips;
    if (threads > MAX_THREADS - 1) threads = MAX_THREADS - 1;
    if (threads <= 1 || pthread_mutex_trylock(&pool_user) != 0) { /* busy pool: run alone */
        run_job(whole);
        return;
    }
    int workers = grow_pool(threads - 1);
    int used = workers + 1 < threads ? workers + 1 : threads;
    for (int t = 0; t <= workers; t++) {
        pool.jobs[t] = *whole;
        pool.jobs[t].strip_lo = t < used ? split_point(strips, t, used) : 0;
        pool.jobs[t].strip_hi = t < used ? split_point(strips, t + 1, used) : 0;
    }
    atomic_store(&pool.pending, workers);
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mutex);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mutex);
    }
    run_job(&pool.jobs[0]);
    while (atomic_load(&pool.pending) > 0) cpu_pause();
    pthread_mutex_unlock(&pool_user);
}

/* B[k, n] = src[k * stride_k + n * stride_n] into strips (see the top of the file).  The loop order
 * follows the source so that it is read front to back: row by row when B's rows are contiguous (the
 * backward's weights), else 8 rows at a time, so each of a strip's columns is read 8 floats at a time
 * (the forward's weights, where B's columns are contiguous).  Strip by strip, that was 2-3x slower. */
static void pack_weight(Py_ssize_t k, Py_ssize_t n, const float *src, Py_ssize_t stride_k, Py_ssize_t stride_n,
                        float *dst) {
    if (stride_n == 1) {
        for (Py_ssize_t row = 0; row < k; row++) {
            for (Py_ssize_t col = 0; col < n; col += NR) {
                Py_ssize_t width = n - col < NR ? n - col : NR;
                memcpy(dst + col * k + row * width, src + row * stride_k + col, (size_t)width * sizeof(float));
            }
        }
        return;
    }
    for (Py_ssize_t col = 0; col < n; col += NR) {
        Py_ssize_t width = n - col < NR ? n - col : NR;
        float *strip = dst + col * k;
        for (Py_ssize_t row0 = 0; row0 < k; row0 += 8) {
            Py_ssize_t rows = k - row0 < 8 ? k - row0 : 8;
            for (Py_ssize_t j = 0; j < width; j++) {
                const float *from = src + row0 * stride_k + (col + j) * stride_n;
                for (Py_ssize_t r = 0; r < rows; r++) strip[(row0 + r) * width + j] = from[r * stride_k];
            }
        }
    }
}

/* ---- Python bindings ----------------------------------------------------------------------------- */

static int parse_sizes(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *name,
                       Py_ssize_t *out) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd integer arguments (%zd given)", name, expected, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = PyLong_AsSsize_t(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* pack(k, n, src, stride_k, stride_n, dst): dst (k * n floats) = the packed weight. */
static PyObject *pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t v[6];
    if (parse_sizes(args, nargs, 6, "pack", v) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pack_weight(v[0], v[1], (const float *)v[2], v[3], v[4], (float *)v[5]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* matmul(m, k, n, a, lda, packed, c, ldc, init, ldi, threads): c = [init +] a @ B; init 0 for none. */
static PyObject *matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t v[11];
    if (parse_sizes(args, nargs, 11, "matmul", v) < 0) return NULL;
    if (!HAVE_KERNELS || v[2] % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "matmul: needs an x86-64 build and n divisible by 8");
        return NULL;
    }
    job_t job = {v[0], v[1], v[2], (const float *)v[3], v[4], (const float *)v[5], (float *)v[6], v[7],
                 (const float *)v[8], v[9], 0, (v[2] + NR - 1) / NR};
    int threads = v[10] < 1 ? 1 : (v[10] > MAX_THREADS ? MAX_THREADS : (int)v[10]);
    Py_BEGIN_ALLOW_THREADS
    run_parallel(&job, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* supported(): whether this build and CPU can run matmul (x86-64 with AVX2 and FMA). */
static PyObject *supported(PyObject *self, PyObject *unused) {
#if HAVE_KERNELS
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"pack", (PyCFunction)(void (*)(void))pack, METH_FASTCALL, "Pack a weight into strips."},
    {"matmul", (PyCFunction)(void (*)(void))matmul, METH_FASTCALL, "C = [I +] A @ packed B."},
    {"supported", supported, METH_NOARGS, "Whether this CPU can run matmul."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packedgemm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packedgemm(void) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, reset_pool_in_child);
        registered = 1;
    }
    return PyModule_Create(&module);
}
