/* Exercises the POSIX semaphore API under the esem preload library; each subcommand
 * prints what it observed and exits 0 only if everything matched POSIX semantics.
 * Built and run by tests/native/test_preload.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "esem.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: check failed: %s (errno %d %s)\n", __FILE__,         \
                    __LINE__, #cond, errno, strerror(errno));                            \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

static int value(sem_t *s) {
    int v = -1;
    CHECK(sem_getvalue(s, &v) == 0);
    return v;
}

static struct timespec in_ms(long ms) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

/* Every operation on a named e-semaphore. */
static int ops(const char *name) {
    sem_t *s = sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 1);
    CHECK(s != SEM_FAILED);
    CHECK(value(s) == 1);
    CHECK(sem_trywait(s) == 0);
    CHECK(sem_trywait(s) == -1 && errno == EAGAIN);
    struct timespec t = in_ms(50);
    CHECK(sem_timedwait(s, &t) == -1 && errno == ETIMEDOUT);
    struct timespec bad = {0, 2000000000L};
    CHECK(sem_timedwait(s, &bad) == -1 && errno == EINVAL);
    CHECK(sem_post(s) == 0);
    CHECK(sem_timedwait(s, &bad) == 0); /* a free unit: no EINVAL */
    CHECK(sem_post(s) == 0);
    struct timespec m;
    clock_gettime(CLOCK_MONOTONIC, &m);
    m.tv_sec += 1;
    CHECK(sem_clockwait(s, CLOCK_MONOTONIC, &m) == 0);
    CHECK(sem_clockwait(s, 12345, &m) == -1 && errno == EINVAL);
    CHECK(sem_post(s) == 0);
    CHECK(sem_wait(s) == 0);
    CHECK(value(s) == 0);
    /* The same name again gives the same sem_t, as glibc does. */
    sem_t *again = sem_open(name, USE_ESEM);
    CHECK(again == s);
    CHECK(sem_close(again) == 0);
    CHECK(sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 0) == SEM_FAILED && errno == EEXIST);
    CHECK(sem_open(name, O_CREAT | USE_ESEM, 0600, (unsigned)SEM_VALUE_MAX + 1) == s);
    CHECK(sem_close(s) == 0);
    CHECK(sem_close(s) == 0);
    CHECK(sem_unlink(name) == 0);
    CHECK(sem_unlink(name) == -1 && errno == ENOENT);
    CHECK(sem_open(name, USE_ESEM) == SEM_FAILED && errno == ENOENT);
    CHECK(sem_open("/a/b", O_CREAT | USE_ESEM, 0600, 0) == SEM_FAILED && errno == EINVAL);
    puts("ops ok");
    return 0;
}

/* Open and keep: the test inspects the service while this waits for a line. */
static int hold(const char *name, int flags) {
    sem_t *s = sem_open(name, O_CREAT | flags, 0600, 3);
    CHECK(s != SEM_FAILED);
    printf("open %d\n", value(s));
    fflush(stdout);
    char line[16];
    CHECK(fgets(line, sizeof line, stdin) != NULL);
    CHECK(sem_close(s) == 0);
    CHECK(sem_unlink(name) == 0);
    return 0;
}

/* Two processes: the child waits, the parent posts; an inherited handle (ATTACH). */
static int handoff(const char *name) {
    sem_t *s = sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 0);
    CHECK(s != SEM_FAILED);
    CHECK(sem_unlink(name) == 0); /* as Apache does: the children use the pointer */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (sem_wait(s) != 0)
            _exit(2);
        _exit(sem_post(s) == 0 ? 0 : 3);
    }
    usleep(100000);
    CHECK(sem_post(s) == 0);
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(sem_wait(s) == 0); /* the child's post */
    CHECK(value(s) == 0);
    CHECK(sem_close(s) == 0);
    puts("handoff ok");
    return 0;
}

static volatile sig_atomic_t fired;
static sem_t *posted_from_handler;
static void on_alarm(int sig) {
    (void)sig;
    fired = 1;
    if (posted_from_handler)
        sem_post(posted_from_handler); /* async-signal-safe */
}

/* A signal handler interrupts sem_wait: EINTR, and no unit is lost or made. */
static int eintr(const char *name) {
    sem_t *s = sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 0);
    CHECK(s != SEM_FAILED);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART; /* sem_wait returns EINTR even so */
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0);
    alarm(1);
    int rc = sem_wait(s);
    CHECK(fired && rc == -1 && errno == EINTR);
    CHECK(value(s) == 0);
    /* A handler that posts: the wait it interrupts gets the unit, or the count has it. */
    posted_from_handler = s;
    fired = 0;
    alarm(1);
    rc = sem_wait(s);
    CHECK(fired);
    if (rc == -1) {
        CHECK(errno == EINTR);
        CHECK(sem_wait(s) == 0);
    }
    CHECK(value(s) == 0);
    CHECK(sem_close(s) == 0 && sem_unlink(name) == 0);
    puts("eintr ok");
    return 0;
}

static sem_t *cancel_sem;
static void *blocked_waiter(void *arg) {
    (void)arg;
    sem_wait(cancel_sem); /* cancellation point */
    return (void *)1;
}

static void *open_with_cancel_pending(void *arg) {
    const char *name = arg;
    pthread_cancel(pthread_self()); /* deferred: acts at the next cancellation point */
    sem_t *s = sem_open(name, O_CREAT | USE_ESEM, 0600, 0); /* not a cancellation point */
    if (s == SEM_FAILED)
        return (void *)2;
    if (sem_unlink(name) != 0) /* nor is this */
        return (void *)3;
    if (sem_close(s) != 0)
        return (void *)4;
    pthread_testcancel();
    return (void *)5; /* not reached */
}

/* pthread_cancel of a thread blocked in sem_wait; sem_open/sem_unlink are not
 * cancellation points (glibc's tst-sem16). */
static int cancel(const char *name) {
    cancel_sem = sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 0);
    CHECK(cancel_sem != SEM_FAILED);
    pthread_t t;
    void *ret;
    CHECK(pthread_create(&t, NULL, blocked_waiter, NULL) == 0);
    usleep(200000);
    CHECK(pthread_cancel(t) == 0);
    CHECK(pthread_join(t, &ret) == 0 && ret == PTHREAD_CANCELED);
    /* The cancelled wait took nothing: a post is there for the next wait. */
    CHECK(sem_post(cancel_sem) == 0);
    CHECK(value(cancel_sem) == 1);
    CHECK(sem_trywait(cancel_sem) == 0);
    CHECK(sem_close(cancel_sem) == 0 && sem_unlink(name) == 0);
    char other[300];
    snprintf(other, sizeof other, "%s-c", name);
    CHECK(pthread_create(&t, NULL, open_with_cancel_pending, other) == 0);
    CHECK(pthread_join(t, &ret) == 0);
    CHECK(ret == PTHREAD_CANCELED);
    puts("cancel ok");
    return 0;
}

/* Unnamed semaphores (ESEM_PRELOAD_ALL=1): private, and shared with a fork child. */
static int unnamed(void) {
    sem_t local;
    CHECK(sem_init(&local, 0, 2) == 0);
    CHECK(value(&local) == 2);
    CHECK(sem_wait(&local) == 0 && sem_trywait(&local) == 0);
    CHECK(sem_trywait(&local) == -1 && errno == EAGAIN);
    CHECK(sem_destroy(&local) == 0);
    sem_t *shared = mmap(NULL, sizeof(sem_t), PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(shared != MAP_FAILED);
    CHECK(sem_init(shared, 1, 0) == 0);
    pid_t pid = fork();
    if (pid == 0)
        _exit(sem_post(shared) == 0 ? 0 : 1);
    CHECK(sem_wait(shared) == 0);
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(sem_destroy(shared) == 0);
    puts("unnamed ok");
    return 0;
}

/* `name` was created by another uid, mode 0666, value 1000 (a squatter). The C API has
 * no foreign-owner flag, so O_CREAT of it is refused with EACCES (the service's squatting
 * defence), O_CREAT|O_EXCL with EEXIST; opening it without O_CREAT is what its mode allows. */
static int squatted(const char *name) {
    errno = 0;
    CHECK(sem_open(name, O_CREAT | USE_ESEM, 0600, 4) == SEM_FAILED && errno == EACCES);
    errno = 0;
    CHECK(sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 4) == SEM_FAILED && errno == EEXIST);
    /* without O_CREAT, mode and value are not read (POSIX): a garbage value must not
       make the open fail (it did: EINVAL from whatever the register held) */
    sem_t *s = sem_open(name, USE_ESEM, 0600, 0xffffffffu);
    CHECK(s != SEM_FAILED);
    CHECK(value(s) == 1000);
    CHECK(sem_close(s) == 0);
    puts("squatted ok");
    return 0;
}

/* A glibc semaphore beside e-semaphores: still glibc's. */
static int legacy(const char *name) {
    sem_t *s = sem_open(name, O_CREAT | O_EXCL, 0600, 1);
    CHECK(s != SEM_FAILED);
    CHECK(sem_wait(s) == 0 && value(s) == 0 && sem_post(s) == 0);
    char path[300];
    snprintf(path, sizeof path, "/dev/shm/sem.%s", name + 1);
    CHECK(access(path, F_OK) == 0);
    CHECK(sem_close(s) == 0 && sem_unlink(name) == 0);
    sem_t u;
    CHECK(sem_init(&u, 0, 0) == 0 && sem_post(&u) == 0 && sem_wait(&u) == 0);
    CHECK(sem_destroy(&u) == 0);
    puts("legacy ok");
    return 0;
}

static sem_t exit_sem;

static void *exit_poster(void *arg) {
    (void)arg;
    usleep(100000);
    CHECK(sem_post(&exit_sem) == 0);
    return NULL;
}

/* (--all) The main thread ends with pthread_exit while another thread still runs: the
 * process must end, status 0, once that thread has (the client's reader thread must not
 * keep it alive). */
static int main_exits(void) {
    pthread_t t;
    CHECK(sem_init(&exit_sem, 0, 0) == 0);
    CHECK(pthread_create(&t, NULL, exit_poster, NULL) == 0);
    CHECK(pthread_detach(t) == 0);
    puts("main-exit ok");
    fflush(stdout);
    pthread_exit(NULL);
}

/* (--all) A private (pshared 0) unnamed semaphore is a fork child's own copy, with the
 * count at the fork: the parent's post (made before the child's first use) does not
 * reach the child, the child's do not reach the parent. */
static int private_fork(void) {
    sem_t s;
    CHECK(sem_init(&s, 0, 1) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        usleep(300000); /* the parent has posted by now */
        if (value(&s) != 1 || sem_trywait(&s) != 0)
            _exit(3);
        if (sem_trywait(&s) == 0 || errno != EAGAIN)
            _exit(4);
        if (sem_post(&s) != 0 || sem_post(&s) != 0 || value(&s) != 2)
            _exit(5);
        _exit(0);
    }
    CHECK(sem_post(&s) == 0);
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(value(&s) == 2);
    CHECK(sem_destroy(&s) == 0);
    puts("private-fork ok");
    return 0;
}

/* A child stops and continues this process (SIGSTOP, SIGCONT) over and over while it
 * waits for the units another child posts every half millisecond: with no handler
 * installed, no wait may fail with EINTR (glibc's do not; Linux makes a few
 * interfaces, such as a recv under SO_RCVTIMEO, fail so after a stop, and a wait must
 * not pass that on). */
static int stopcont(const char *name, int rounds) {
    sem_t *s = sem_open(name, O_CREAT | O_EXCL | USE_ESEM, 0600, 0);
    CHECK(s != SEM_FAILED);
    CHECK(sem_unlink(name) == 0);
    CHECK(sem_post(s) == 0 && sem_wait(s) == 0);
    pid_t parent = getpid();
    pid_t poster = fork();
    CHECK(poster >= 0);
    if (poster == 0) {
        for (;;) {
            usleep(500);
            if (sem_post(s) != 0)
                _exit(2);
        }
    }
    pid_t stopper = fork();
    CHECK(stopper >= 0);
    if (stopper == 0) {
        for (int i = 0; i < rounds; i++) {
            kill(parent, SIGSTOP);
            usleep(100);
            kill(parent, SIGCONT);
            usleep(300);
        }
        _exit(0);
    }
    long waits = 0, eintr = 0;
    int st;
    while (waitpid(stopper, &st, WNOHANG) == 0) {
        if (sem_wait(s) == 0)
            waits++;
        else if (errno == EINTR)
            eintr++;
        else
            CHECK(0);
    }
    CHECK(kill(poster, SIGKILL) == 0 && waitpid(poster, &st, 0) == poster);
    printf("waits %ld eintr %ld\n", waits, eintr);
    CHECK(sem_close(s) == 0);
    return eintr == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 64;
    const char *cmd = argv[1], *name = argc > 2 ? argv[2] : "/x";
    if (!strcmp(cmd, "ops"))
        return ops(name);
    if (!strcmp(cmd, "hold"))
        return hold(name, USE_ESEM);
    if (!strcmp(cmd, "hold-plain")) /* no USE_ESEM: an e-semaphore only with --all */
        return hold(name, 0);
    if (!strcmp(cmd, "handoff"))
        return handoff(name);
    if (!strcmp(cmd, "eintr"))
        return eintr(name);
    if (!strcmp(cmd, "cancel"))
        return cancel(name);
    if (!strcmp(cmd, "unnamed"))
        return unnamed();
    if (!strcmp(cmd, "legacy"))
        return legacy(name);
    if (!strcmp(cmd, "squatted"))
        return squatted(name);
    if (!strcmp(cmd, "main-exit"))
        return main_exits();
    if (!strcmp(cmd, "private-fork"))
        return private_fork();
    if (!strcmp(cmd, "stopcont"))
        return stopcont(name, argc > 3 ? atoi(argv[3]) : 1000);
    return 64;
}
