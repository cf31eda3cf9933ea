/* Many threads of one process on its one esem session, for the reply-routing tests of
 * the native client (tests/native/test_threads.py), run under `esem run --all`: the
 * client hands the reading of the session socket between calling threads and its
 * reader thread, and this program checks that every thread gets its own replies.
 *
 *   threads PREFIX FAST WAITERS ITERATIONS GATE
 *       FAST threads each own semaphore PREFIX.f<t> and, ITERATIONS times, post it k
 *       times (k = 1 + (t + i) % 5), check sem_getvalue is k, take the k units with
 *       sem_trywait, check one more trywait is EAGAIN and the value 0: a reply that
 *       reached the wrong thread shows as a wrong value or a wrong error. WAITERS
 *       threads take units of PREFIX.gate (created at 0): even ones with sem_wait
 *       (blocking as long as it takes), odd ones with sem_timedwait of 20 ms; a
 *       SIGUSR1 (handler without SA_RESTART) interrupts them now and then (EINTR:
 *       the wait is withdrawn and retried). A poster thread posts the gate GATE times
 *       while the fast threads run. Then every waiter is released with one more unit
 *       each after the stop flag is set. Says "ready" once every thread has made its
 *       first call, "done OPS GOT VALUE INTR" at the end (GOT: units the waiters took,
 *       VALUE: what is left in the gate); any unexpected result: "error ..." and exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64

static const char *prefix;
static int fast, waiters, iterations, gate_posts;
static sem_t *gate;
static atomic_int started, stop, fast_left;
static atomic_long ops, got, interrupted;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *what, int t, long detail) {
    pthread_mutex_lock(&out_lock);
    printf("error %s (thread %d, %ld): %s\n", what, t, detail, strerror(errno));
    fflush(stdout);
    _exit(1);
}

static sem_t *open_sem(const char *suffix, int t) {
    char name[256];
    snprintf(name, sizeof name, "%s.%s", prefix, suffix);
    sem_t *s = sem_open(name, O_CREAT, 0600, 0);
    if (s == SEM_FAILED)
        fail("sem_open", t, 0);
    return s;
}

static int value_of(sem_t *s, int t) {
    int v = -1;
    if (sem_getvalue(s, &v) != 0)
        fail("sem_getvalue", t, 0);
    atomic_fetch_add(&ops, 1);
    return v;
}

static void *fast_thread(void *arg) {
    int t = (int)(long)arg;
    char suffix[32];
    snprintf(suffix, sizeof suffix, "f%d", t);
    sem_t *s = open_sem(suffix, t);
    atomic_fetch_add(&started, 1);
    for (int i = 0; i < iterations; i++) {
        int k = 1 + (t + i) % 5;
        for (int j = 0; j < k; j++) {
            if (sem_post(s) != 0)
                fail("sem_post", t, i);
            atomic_fetch_add(&ops, 1);
        }
        int v = value_of(s, t);
        if (v != k)
            fail("value after posts", t, v);
        for (int j = 0; j < k; j++) {
            if (sem_trywait(s) != 0)
                fail("sem_trywait of a posted unit", t, j);
            atomic_fetch_add(&ops, 1);
        }
        errno = 0;
        if (sem_trywait(s) == 0 || errno != EAGAIN)
            fail("sem_trywait of an empty semaphore", t, i);
        atomic_fetch_add(&ops, 1);
        if ((v = value_of(s, t)) != 0)
            fail("value after trywaits", t, v);
    }
    sem_close(s);
    atomic_fetch_sub(&fast_left, 1);
    return NULL;
}

static void on_usr1(int sig) { (void)sig; }

static void *waiter_thread(void *arg) {
    int t = (int)(long)arg;
    atomic_fetch_add(&started, 1);
    for (;;) {
        int rc;
        if (t % 2 == 0) {
            rc = sem_wait(gate);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 20 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec += 1;
                ts.tv_nsec -= 1000000000L;
            }
            rc = sem_timedwait(gate, &ts);
        }
        atomic_fetch_add(&ops, 1);
        if (rc == 0) {
            atomic_fetch_add(&got, 1);
            if (atomic_load(&stop))
                return NULL;
        } else if (errno == EINTR) {
            atomic_fetch_add(&interrupted, 1);
        } else if (errno != ETIMEDOUT || t % 2 == 0) {
            fail("wait", t, 0);
        }
    }
}

static void *poster_thread(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (int i = 0; i < gate_posts; i++) {
        if (sem_post(gate) != 0)
            fail("gate sem_post", -1, i);
        atomic_fetch_add(&ops, 1);
        usleep(500);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: threads PREFIX FAST WAITERS ITERATIONS GATE\n");
        return 2;
    }
    prefix = argv[1];
    fast = atoi(argv[2]);
    waiters = atoi(argv[3]);
    iterations = atoi(argv[4]);
    gate_posts = atoi(argv[5]);
    if (fast < 1 || waiters < 0 || fast + waiters + 1 > MAX_THREADS)
        return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1; /* no SA_RESTART: a blocked sem_wait returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    gate = open_sem("gate", -1);
    pthread_t th[MAX_THREADS];
    int n = 0;
    atomic_store(&fast_left, fast);
    for (int w = 0; w < waiters; w++)
        pthread_create(&th[n++], NULL, waiter_thread, (void *)(long)w);
    pthread_t ft[MAX_THREADS];
    for (int t = 0; t < fast; t++)
        pthread_create(&ft[t], NULL, fast_thread, (void *)(long)t);
    pthread_t poster;
    pthread_create(&poster, NULL, poster_thread, NULL);
    while (atomic_load(&started) < fast + waiters + 1)
        usleep(1000);
    printf("ready\n");
    fflush(stdout);
    /* Interrupt the waiters now and then while the fast threads run. */
    for (int round = 0; atomic_load(&fast_left) > 0; round++) {
        usleep(3000);
        if (waiters > 0)
            pthread_kill(th[round % waiters], SIGUSR1);
    }
    for (int t = 0; t < fast; t++)
        pthread_join(ft[t], NULL);
    pthread_join(poster, NULL);
    atomic_store(&stop, 1);
    for (int w = 0; w < waiters; w++)
        if (sem_post(gate) != 0)
            fail("release sem_post", -1, w);
    for (int w = 0; w < n; w++)
        pthread_join(th[w], NULL);
    int left = value_of(gate, -1);
    printf("done %ld %ld %d %ld\n", atomic_load(&ops), atomic_load(&got), left,
           atomic_load(&interrupted));
    fflush(stdout);
    return 0;
}
