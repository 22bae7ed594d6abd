/* A small persistent pthread pool: one job at a time, tasks handed out in order by an atomic
 * counter, the calling thread working too. A caller that finds the pool busy (another Python
 * thread is encoding) gets short-lived threads of its own instead of waiting. After fork() the
 * child starts with an empty pool (the parent's threads do not exist there).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "ckg.h"

#define CKG_MAX_THREADS 1024

typedef struct {
    ckg_task_fn fn;
    void *ctx;
    size_t ntasks;
    atomic_size_t next;
} job_t;

static void run_tasks(job_t *job, int worker) {
    for (;;) {
        size_t t = atomic_fetch_add(&job->next, 1);
        if (t >= job->ntasks) return;
        job->fn(job->ctx, t, worker);
    }
}

/* ---- the persistent pool -------------------------------------------------------------- */

static struct {
    pthread_mutex_t mu;     /* guards everything below */
    pthread_cond_t work_cv; /* a new job was posted */
    pthread_cond_t done_cv; /* the last helper finished */
    pthread_mutex_t busy;   /* held by the caller whose job the pool runs */
    int started;            /* helper threads alive */
    unsigned long gen;      /* job generation */
    job_t *job;
    int want;    /* helpers (ids 1..want) that take part in the current job */
    int running; /* helpers of the current job not yet finished */
} P = {PTHREAD_MUTEX_INITIALIZER,
       PTHREAD_COND_INITIALIZER,
       PTHREAD_COND_INITIALIZER,
       PTHREAD_MUTEX_INITIALIZER,
       0,
       0,
       NULL,
       0,
       0};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void pool_child_after_fork(void) {
    /* Only the forking thread exists in the child: forget the parent's helpers. */
    pthread_mutex_init(&P.mu, NULL);
    pthread_mutex_init(&P.busy, NULL);
    pthread_cond_init(&P.work_cv, NULL);
    pthread_cond_init(&P.done_cv, NULL);
    P.started = 0;
    P.job = NULL;
    P.want = 0;
    P.running = 0;
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, pool_child_after_fork); }

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    pthread_mutex_lock(&P.mu);
    /* Created for the job being posted right now: take part in it before waiting. */
    unsigned long seen = P.gen - 1;
    for (;;) {
        while (P.gen == seen) pthread_cond_wait(&P.work_cv, &P.mu);
        seen = P.gen;
        if (id > P.want || !P.job) continue;
        job_t *job = P.job;
        pthread_mutex_unlock(&P.mu);
        run_tasks(job, id);
        pthread_mutex_lock(&P.mu);
        if (--P.running == 0) pthread_cond_signal(&P.done_cv);
    }
    return NULL;
}

/* Start helpers up to `n` (ids 1..n); returns how many exist. Called with P.mu held. */
static int grow(int n) {
    while (P.started < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)(P.started + 1));
        pthread_attr_destroy(&attr);
        if (rc) break;
        P.started++;
    }
    return P.started < n ? P.started : n;
}

/* ---- short-lived threads for a caller that finds the pool busy ------------------------- */

typedef struct {
    job_t *job;
    int id;
} eph_arg;

static void *eph_main(void *arg) {
    eph_arg *a = arg;
    run_tasks(a->job, a->id);
    return NULL;
}

static int run_ephemeral(job_t *job, int helpers) {
    pthread_t *ts = calloc((size_t)helpers, sizeof *ts);
    eph_arg *as = calloc((size_t)helpers, sizeof *as);
    int made = 0;
    if (ts && as) {
        for (; made < helpers; made++) {
            as[made].job = job;
            as[made].id = made + 1;
            if (pthread_create(&ts[made], NULL, eph_main, &as[made])) break;
        }
    }
    run_tasks(job, 0);
    for (int i = 0; i < made; i++) pthread_join(ts[i], NULL);
    free(ts);
    free(as);
    return made + 1;
}

int ckg_parallel(int nthreads, size_t ntasks, ckg_task_fn fn, void *ctx) {
    job_t job = {fn, ctx, ntasks, 0};
    if (nthreads > CKG_MAX_THREADS) nthreads = CKG_MAX_THREADS;
    if (nthreads < 1) nthreads = 1;
    int helpers = (size_t)(nthreads - 1) < ntasks ? nthreads - 1 : (int)ntasks;
    if (ntasks > 0) helpers = (size_t)helpers < ntasks - 1 ? helpers : (int)(ntasks - 1);
    if (helpers <= 0) {
        run_tasks(&job, 0);
        return 1;
    }
    pthread_once(&atfork_once, register_atfork);
    if (pthread_mutex_trylock(&P.busy) != 0) return run_ephemeral(&job, helpers);
    pthread_mutex_lock(&P.mu);
    int got = grow(helpers);
    P.job = &job;
    P.want = got;
    P.running = got;
    P.gen++;
    pthread_cond_broadcast(&P.work_cv);
    pthread_mutex_unlock(&P.mu);
    run_tasks(&job, 0);
    pthread_mutex_lock(&P.mu);
    while (P.running > 0) pthread_cond_wait(&P.done_cv, &P.mu);
    P.job = NULL;
    P.want = 0;
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_unlock(&P.busy);
    return got + 1;
}
