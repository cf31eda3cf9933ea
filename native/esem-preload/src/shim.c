/* The cancellation points of the esem preload library: sem_wait, sem_timedwait and
 * sem_clockwait.
 *
 * POSIX makes these waits cancellation points. A deferred cancellation acts in a
 * blocking call (here poll) by unwinding the thread's stack, running cleanup handlers.
 * Unwinding through Rust frames is not something Rust defines for a forced unwind, so
 * the part of a wait that blocks lives here, in C: Rust code is called only for steps
 * that do not block, with cancellation disabled inside them, and never is on the stack
 * when a cancellation acts. The cleanup handler withdraws the wait (CANCEL) and, if the
 * grant won the race, posts the unit back, so a cancelled thread never takes a unit
 * with it. A signal handler that runs during the wait makes poll fail with EINTR: the
 * wait is withdrawn and sem_wait returns EINTR, or 0 if the unit was granted first.
 *
 * Semaphores that are not esem's go to glibc's own functions (RTLD_NEXT).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* Implemented in Rust (src/lib.rs). Results: ESEM_PENDING, ESEM_DONE, ESEM_NOT_OURS,
 * or a negative errno. */
#define ESEM_PENDING 0
#define ESEM_DONE 1
#define ESEM_NOT_OURS 2
#define MODE_BLOCK 1
#define MODE_TIMED 2
extern int esem_shim_ours(sem_t *s);
/* `client` is the session the wait was sent in (opaque here): the later steps ask that
 * session for the answer, never a newer one the process may have connected since. */
extern int esem_shim_begin(sem_t *s, int mode, const struct timespec *abstime,
                           clockid_t clock, uint64_t *req, int *wake_fd,
                           const void **client);
extern int esem_shim_poll(sem_t *s, uint64_t req, const void *client);
extern int esem_shim_interrupted(sem_t *s, uint64_t req, const void *client);
extern void esem_shim_cancelled(sem_t *s, uint64_t req, const void *client);
extern int esem_shim_own_thread(void);
extern int esem_shim_has_own_thread(void);

struct pending {
    sem_t *sem;
    uint64_t req;
    const void *client;
};

static void cleanup(void *arg) {
    struct pending *p = arg;
    esem_shim_cancelled(p->sem, p->req, p->client);
}

static int fail(int negerrno) {
    errno = -negerrno;
    return -1;
}

/* Returns ESEM_NOT_OURS for glibc's semaphores, else the wait's result (0, or -1 and
 * errno). */
static int esem_wait_common(sem_t *s, int mode, const struct timespec *abstime,
                            clockid_t clock) {
    struct pending p = {s, 0, 0};
    int wake = -1;
    int rc;
    if (!esem_shim_ours(s))
        return ESEM_NOT_OURS;
    /* A cancellation point even when a unit is free, as glibc's waits are. */
    pthread_testcancel();
    rc = esem_shim_begin(s, mode, abstime, clock, &p.req, &wake, &p.client);
    if (rc == ESEM_DONE)
        return 0;
    if (rc < 0)
        return fail(rc);
    int interrupted = 0;
    pthread_cleanup_push(cleanup, &p);
    for (;;) {
        rc = esem_shim_poll(s, p.req, p.client);
        if (rc != ESEM_PENDING)
            break;
        struct pollfd pfd = {.fd = wake, .events = POLLIN};
        if (poll(&pfd, 1, -1) < 0 && errno == EINTR) {
            interrupted = 1;
            break;
        }
    }
    pthread_cleanup_pop(0);
    if (interrupted)
        rc = esem_shim_interrupted(s, p.req, p.client);
    if (rc == ESEM_DONE)
        return 0;
    return fail(rc);
}

typedef int (*wait_fn)(sem_t *);
typedef int (*timedwait_fn)(sem_t *, const struct timespec *);
typedef int (*clockwait_fn)(sem_t *, clockid_t, const struct timespec *);

static void *real(const char *name) {
    return dlsym(RTLD_NEXT, name);
}

int esem_c_sem_wait(sem_t *s) {
    int rc = esem_wait_common(s, MODE_BLOCK, 0, CLOCK_REALTIME);
    if (rc == ESEM_NOT_OURS) {
        static wait_fn f;
        if (!f)
            f = (wait_fn)real("sem_wait");
        return f(s);
    }
    return rc;
}

int esem_c_sem_timedwait(sem_t *s, const struct timespec *abstime) {
    int rc = esem_wait_common(s, MODE_TIMED, abstime, CLOCK_REALTIME);
    if (rc == ESEM_NOT_OURS) {
        static timedwait_fn f;
        if (!f)
            f = (timedwait_fn)real("sem_timedwait");
        return f(s, abstime);
    }
    return rc;
}

int esem_c_sem_clockwait(sem_t *s, clockid_t clock, const struct timespec *abstime) {
    int rc = esem_wait_common(s, MODE_TIMED, abstime, clock);
    if (rc == ESEM_NOT_OURS) {
        static clockwait_fn f;
        if (!f)
            f = (clockwait_fn)real("sem_clockwait");
        return f(s, clock, abstime);
    }
    return rc;
}

/* The process ends when its last thread ends (POSIX: as if by exit(0)), so a program
 * whose main thread calls pthread_exit exits once its other threads are done. glibc
 * counts every thread, the client's reader thread too, which never ends: the program's
 * threads are counted here instead (the main thread, and those created through
 * pthread_create below), and the last one's thread-specific destructor, which runs
 * whether it returns, calls pthread_exit or is cancelled, calls exit(0) if the client
 * has its thread in this process (else glibc ends the process itself). Threads created
 * before this library's constructor ran are not counted. */
static atomic_long app_threads = 1;
static pthread_key_t app_key;

static void app_thread_gone(void *unused) {
    (void)unused;
    if (atomic_fetch_sub(&app_threads, 1) == 1 && esem_shim_has_own_thread())
        exit(0);
}

static void app_forked(void) {
    atomic_store(&app_threads, 1); /* only the thread that forked goes on */
}

__attribute__((constructor)) static void app_threads_init(void) {
    if (pthread_key_create(&app_key, app_thread_gone) == 0) {
        pthread_setspecific(app_key, (void *)1);
        pthread_atfork(0, 0, app_forked);
    }
}

struct app_start {
    void *(*fn)(void *);
    void *arg;
};

static void *app_thread(void *p) {
    struct app_start s = *(struct app_start *)p;
    free(p);
    pthread_setspecific(app_key, (void *)1);
    return s.fn(s.arg);
}

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

int esem_c_pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *),
                          void *arg) {
    static create_fn f;
    if (!f)
        f = (create_fn)real("pthread_create");
    if (esem_shim_own_thread())
        return f(t, attr, fn, arg);
    struct app_start *s = malloc(sizeof *s);
    if (!s)
        return EAGAIN;
    s->fn = fn;
    s->arg = arg;
    atomic_fetch_add(&app_threads, 1);
    int rc = f(t, attr, app_thread, s);
    if (rc != 0) {
        atomic_fetch_sub(&app_threads, 1);
        free(s);
    }
    return rc;
}
