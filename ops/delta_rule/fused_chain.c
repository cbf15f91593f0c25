/* The delta rule's sequential state chain on the CPU, one native call for all chunks of all
 * heads (fused_chain.py compiles and loads it; chunk.py's torch loops are the reference).
 *
 * Per chunk the chain does two small products (C x Dk x Dv each). As separate torch calls
 * they cost ~7 us of dispatch and copies apiece, more than their arithmetic; here the state
 * of one head stays in cache from chunk to chunk and each product is a register-tiled loop.
 *
 * Compiled twice: -DREAL=float and -DREAL=double. Rows are strided, columns contiguous.
 *
 * The (batch, head) chains are independent: each entry point splits the heads into `threads`
 * contiguous ranges and runs one range per POSIX thread (the caller runs the first), as the
 * torch loop it replaces spreads its batched products over torch's intra-op threads. Each
 * head's arithmetic is the same whatever the split, so results are bit-identical for any
 * thread count. -DSEQSHARD_SERIAL (the build fused_chain.py falls back to where -pthread
 * fails) runs every range on the caller's thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifndef SEQSHARD_SERIAL
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#ifndef REAL
#define REAL float
#endif

typedef REAL vec __attribute__((vector_size(64))); /* 16 floats or 8 doubles */
#define LANES ((int64_t)(sizeof(vec) / sizeof(REAL)))

static inline vec load(const REAL *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(REAL *p, vec v) { memcpy(p, &v, sizeof v); }

/* A matrix with contiguous columns: element (r, c) at p[r * ld + c]. */
typedef struct { const REAL *p; int64_t ld; } mat;

/* An operand of every chunk of every head: chunk j of head h starts at p + h*sh + j*sj and
 * its rows are sr apart (torch strides, in elements). */
typedef struct { REAL *p; int64_t sh, sj, sr; } chunks;

static inline REAL *at(chunks x, int64_t h, int64_t j) { return x.p + h * x.sh + j * x.sj; }

/* out = scale * init + add + sign * A B on the R x (W * LANES) tile at (m0, n0), where
 * A (m, k) = a[m * ars + k * aks] (so A may be a transpose) and init / add may be absent
 * (p == NULL). R <= 4 and W <= 2 are constants after inlining: the tile lives in registers. */
static inline __attribute__((always_inline)) void tile(
    const int R, const int W, int64_t m0, int64_t n0, int64_t K,
    const REAL *a, int64_t ars, int64_t aks, mat b, REAL sign,
    mat init, REAL scale, mat add, REAL *out, int64_t ldo)
{
    vec acc[4][2];
    for (int r = 0; r < R; r++)
        for (int w = 0; w < W; w++) {
            int64_t col = n0 + w * LANES;
            acc[r][w] = (vec){0};
            if (init.p) acc[r][w] = scale * load(init.p + (m0 + r) * init.ld + col);
            if (add.p) acc[r][w] += load(add.p + (m0 + r) * add.ld + col);
        }
    for (int64_t k = 0; k < K; k++) {
        vec bk[2];
        for (int w = 0; w < W; w++) bk[w] = load(b.p + k * b.ld + n0 + w * LANES);
        for (int r = 0; r < R; r++) {
            REAL ark = sign * a[(m0 + r) * ars + k * aks];
            for (int w = 0; w < W; w++) acc[r][w] += ark * bk[w];
        }
    }
    for (int r = 0; r < R; r++)
        for (int w = 0; w < W; w++) store(out + (m0 + r) * ldo + n0 + w * LANES, acc[r][w]);
}

/* out [M, N] = scale * init + add + sign * A [M, K] B [K, N]: tiles of 4 rows x 2 vectors,
 * then narrower ones, then a scalar loop over the last N % LANES columns. out may be init. */
static void gemm(int64_t M, int64_t N, int64_t K, const REAL *a, int64_t ars, int64_t aks,
                 mat b, REAL sign, mat init, REAL scale, mat add, REAL *out, int64_t ldo)
{
    int64_t n0 = 0, m0;
    for (; n0 + 2 * LANES <= N; n0 += 2 * LANES) {
        for (m0 = 0; m0 + 4 <= M; m0 += 4)
            tile(4, 2, m0, n0, K, a, ars, aks, b, sign, init, scale, add, out, ldo);
        for (; m0 < M; m0++)
            tile(1, 2, m0, n0, K, a, ars, aks, b, sign, init, scale, add, out, ldo);
    }
    for (; n0 + LANES <= N; n0 += LANES) {
        for (m0 = 0; m0 + 4 <= M; m0 += 4)
            tile(4, 1, m0, n0, K, a, ars, aks, b, sign, init, scale, add, out, ldo);
        for (; m0 < M; m0++)
            tile(1, 1, m0, n0, K, a, ars, aks, b, sign, init, scale, add, out, ldo);
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < N; n++) {
            REAL acc = 0;
            if (init.p) acc = scale * init.p[m * init.ld + n];
            if (add.p) acc += add.p[m * add.ld + n];
            for (int64_t k = 0; k < K; k++) acc += sign * a[m * ars + k * aks] * b.p[k * b.ld + n];
            out[m * ldo + n] = acc;
        }
}

static const mat none = {NULL, 0};

/* Subnormal numbers flushed to zero for the duration of one call, then the caller's mode is
 * restored. A shard's map A is a product of thousands of contractions: its entries sink
 * below 1e-38, and subnormal arithmetic is ~30x slower on x86 (64K tokens: 1.3 s instead of
 * 40 ms). Flushed, such an entry contributes exactly nothing instead of < 1e-38. */
typedef struct { unsigned long long saved; } fp_mode;

static fp_mode flush_subnormals(void)
{
    fp_mode m = {0};
#if defined(__x86_64__) || defined(__i386__)
    m.saved = _mm_getcsr();
    _mm_setcsr((unsigned int)m.saved | 0x8040); /* FTZ | DAZ */
#elif defined(__aarch64__)
    unsigned long long fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    m.saved = fpcr;
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr | (1ULL << 24))); /* FZ */
#endif
    return m;
}

static void restore_fp_mode(fp_mode m)
{
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr((unsigned int)m.saved);
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(m.saved));
#else
    (void)m;
#endif
}

/* One thread's share of a call: heads h0 .. h1-1 of every operand, and its own scratch. */
typedef struct {
    int64_t BH, nc, C, Dk, Dv, h0, h1;
    chunks w, u, kt, decay, ds, after;
    REAL *out, *deltas, *scratch; /* out: states, g or m */
} job;

/* Forward: for each head, for j = 0 .. nc-1 (S_j = states[j] [Dk, Dv]):
 *     Delta_j = U_j - W_j S_j,      S_{j+1} = decay_j S_j + Kt_j^T Delta_j
 * w, kt [C, Dk] and u [C, Dv] per chunk; decay (sr unused) or decay.p == NULL.
 * states [nc + 1, BH, Dk, Dv] with states[0] filled in; deltas [nc, BH, C, Dv]. */
static void forward_heads(const job *t)
{
    int64_t BH = t->BH, C = t->C, Dk = t->Dk, Dv = t->Dv;
    for (int64_t h = t->h0; h < t->h1; h++)
        for (int64_t j = 0; j < t->nc; j++) {
            const REAL *s = t->out + (j * BH + h) * Dk * Dv;
            REAL *s_next = t->out + ((j + 1) * BH + h) * Dk * Dv;
            REAL *delta = t->deltas + (j * BH + h) * C * Dv;
            REAL a = t->decay.p ? *at(t->decay, h, j) : 1;
            gemm(C, Dv, Dk, at(t->w, h, j), t->w.sr, 1, (mat){s, Dv}, -1,
                 (mat){at(t->u, h, j), t->u.sr}, 1, none, delta, Dv);
            gemm(Dk, Dv, C, at(t->kt, h, j), 1, t->kt.sr, (mat){delta, Dv}, 1,
                 (mat){s, Dv}, a, none, s_next, Dv);
        }
}

/* Backward: g [BH, Dk, Dv] holds the gradient of the state after the last chunk and ends as
 * that of the first chunk's state. For j = nc-1 .. 0:
 *     after_j = g,   dDelta = Kt_j g,   g = decay_j g + ds_j - W_j^T dDelta
 * ds: the outputs' pull on each chunk-start state; after.p == NULL: not kept.
 * scratch: C * Dv elements per thread. */
static void backward_heads(const job *t)
{
    int64_t C = t->C, Dk = t->Dk, Dv = t->Dv;
    for (int64_t h = t->h0; h < t->h1; h++) {
        REAL *gh = t->out + h * Dk * Dv;
        for (int64_t j = t->nc - 1; j >= 0; j--) {
            if (t->after.p)
                for (int64_t i = 0; i < Dk; i++)
                    memcpy(at(t->after, h, j) + i * t->after.sr, gh + i * Dv, Dv * sizeof(REAL));
            REAL a = t->decay.p ? *at(t->decay, h, j) : 1;
            gemm(C, Dv, Dk, at(t->kt, h, j), t->kt.sr, 1, (mat){gh, Dv}, 1, none, 0, none,
                 t->scratch, Dv);
            gemm(Dk, Dv, C, at(t->w, h, j), 1, t->w.sr, (mat){t->scratch, Dv}, -1,
                 (mat){gh, Dv}, a, (mat){at(t->ds, h, j), t->ds.sr}, gh, Dv);
        }
    }
}

/* The affine map of all chunks together (a middle rank's part of the "scan" schedule): per
 * head m = [A | B] [Dk, Dk + Dv], given as the identity and zeros, goes through every chunk as
 *     Delta = [0 | U_j] - W_j m,      m = decay_j m + Kt_j^T Delta
 * in place, so that S -> A S + B is the chunks' map. scratch: C * (Dk + Dv) per thread. */
static void map_heads(const job *t)
{
    int64_t C = t->C, Dk = t->Dk, Dv = t->Dv, Dm = Dk + Dv;
    for (int64_t h = t->h0; h < t->h1; h++) {
        REAL *mh = t->out + h * Dk * Dm;
        for (int64_t j = 0; j < t->nc; j++) {
            REAL a = t->decay.p ? *at(t->decay, h, j) : 1;
            gemm(C, Dk, Dk, at(t->w, h, j), t->w.sr, 1, (mat){mh, Dm}, -1, none, 0, none,
                 t->scratch, Dm);
            gemm(C, Dv, Dk, at(t->w, h, j), t->w.sr, 1, (mat){mh + Dk, Dm}, -1,
                 (mat){at(t->u, h, j), t->u.sr}, 1, none, t->scratch + Dk, Dm);
            gemm(Dk, Dm, C, at(t->kt, h, j), 1, t->kt.sr, (mat){t->scratch, Dm}, 1,
                 (mat){mh, Dm}, a, none, mh, Dm);
        }
    }
}

typedef struct { void (*run)(const job *); job share; } task;

/* One thread's share with subnormals flushed: MXCSR / FPCR are per thread, so every worker
 * sets (and restores) them itself, not only the caller. */
static void *flushed(void *arg)
{
    task *t = arg;
    fp_mode mode = flush_subnormals();
    t->run(&t->share);
    restore_fp_mode(mode);
    return NULL;
}

/* Run `run` over all heads of `all`, split into min(threads, BH) contiguous head ranges, one
 * per thread; range i uses scratch + i * scratch_len (the caller sized it for that many).
 * A thread that cannot be started (or no memory for the split): its range runs on the
 * caller's thread, same result. */
static void split_heads(void (*run)(const job *), job all, int64_t threads, int64_t scratch_len)
{
    if (threads > all.BH) threads = all.BH;
    task *tasks = threads > 1 ? malloc(threads * sizeof(task)) : NULL;
    if (tasks == NULL) {
        task one = {run, all};
        one.share.h0 = 0, one.share.h1 = all.BH;
        flushed(&one);
        return;
    }
    for (int64_t i = 0; i < threads; i++) {
        tasks[i] = (task){run, all};
        tasks[i].share.h0 = all.BH * i / threads;
        tasks[i].share.h1 = all.BH * (i + 1) / threads;
        tasks[i].share.scratch = all.scratch ? all.scratch + i * scratch_len : NULL;
    }
#ifdef SEQSHARD_SERIAL
    for (int64_t i = 0; i < threads; i++) flushed(&tasks[i]);
#else
    pthread_t *ids = malloc(threads * sizeof(pthread_t));
    char *started = calloc(threads, 1);
    for (int64_t i = 1; ids && started && i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, flushed, &tasks[i]) == 0;
    flushed(&tasks[0]);
    for (int64_t i = 1; i < threads; i++) {
        if (started && started[i])
            pthread_join(ids[i], NULL);
        else
            flushed(&tasks[i]);
    }
    free(started);
    free(ids);
#endif
    free(tasks);
}

/* The entry points (fused_chain.py): the operands are as in forward_heads, backward_heads
 * and map_heads above; `threads` is the caller's intra-op thread count. */
void chain_forward(int64_t BH, int64_t nc, int64_t C, int64_t Dk, int64_t Dv,
                   chunks w, chunks u, chunks kt, chunks decay, REAL *states, REAL *deltas,
                   int64_t threads)
{
    job all = {BH, nc, C, Dk, Dv, 0, BH, w, u, kt, decay, {0}, {0}, states, deltas, NULL};
    split_heads(forward_heads, all, threads, 0);
}

void chain_backward(int64_t BH, int64_t nc, int64_t C, int64_t Dk, int64_t Dv,
                    chunks w, chunks kt, chunks decay, chunks ds, chunks after,
                    REAL *g, REAL *scratch, int64_t threads)
{
    job all = {BH, nc, C, Dk, Dv, 0, BH, w, {0}, kt, decay, ds, after, g, NULL, scratch};
    split_heads(backward_heads, all, threads, C * Dv);
}

void chain_map(int64_t BH, int64_t nc, int64_t C, int64_t Dk, int64_t Dv,
               chunks w, chunks u, chunks kt, chunks decay, REAL *m, REAL *scratch,
               int64_t threads)
{
    job all = {BH, nc, C, Dk, Dv, 0, BH, w, u, kt, decay, {0}, {0}, m, NULL, scratch};
    split_heads(map_heads, all, threads, C * (Dk + Dv));
}
