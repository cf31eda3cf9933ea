/* The native victim of `esem attack`: a C program that uses one e-semaphore through the
 * plain POSIX API (sem_open with USE_ESEM, or esem_sem_open_keyed for a key-bound one)
 * under the esem preload library, driven line by line over stdin by
 * esem/attack/native_victim.py. What an adversary does to its channel must show here
 * as sem_* returning -1 with an errno, never as a success the service did not give.
 *
 *   open NAME [HEXKEY]            -> "open RC ERRNO"
 *   create NAME VALUE [HEXKEY]    -> "create RC ERRNO TOKENHEX" (O_CREAT|O_EXCL, 0600;
 *                                    TOKENHEX: the handle token the sem_t holds, what a
 *                                    process that reads this one's memory would steal)
 *   op ID KIND [MS]               -> later "done ID RC ERRNO VALUE", from a thread of its
 *                                    own (KIND: wait timedwait trywait post getvalue)
 *   view NAME [HEXKEY]            -> "view VALUE NAMED WORKS ERRNO": the owner's check
 *   unlink NAME [HEXKEY]          -> "unlink RC ERRNO"
 *   transport                     -> "transport T": esem_transport() of the preload
 *                                    library (2 the switchless rings, 1 the socket)
 * End of input ends the program. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "esem.h"

static sem_t *sem = SEM_FAILED;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&out_lock);
    vprintf(fmt, ap);
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
    va_end(ap);
}

static size_t parse_key(const char *hex, unsigned char *key) {
    if (hex == NULL)
        return 0;
    size_t n = strlen(hex) / 2;
    if (n > 32)
        n = 32;
    for (size_t i = 0; i < n; i++) {
        unsigned int b = 0;
        if (sscanf(hex + 2 * i, "%2x", &b) != 1)
            return 0;
        key[i] = (unsigned char)b;
    }
    return n;
}

static sem_t *open_sem(const char *name, int oflag, unsigned int value, const char *hex) {
    unsigned char key[32];
    size_t n = parse_key(hex, key);
    if (n)
        return esem_sem_open_keyed(name, oflag, 0600, value, key, n);
    return sem_open(name, oflag | USE_ESEM, 0600, value);
}

struct job {
    long id;
    char kind[16];
    long ms;
};

static void *run_job(void *arg) {
    struct job *j = arg;
    int rc = -1, value = -1;
    errno = 0;
    if (sem == SEM_FAILED) {
        errno = EBADF; /* no semaphore open: never hand glibc a NULL sem_t */
    } else if (!strcmp(j->kind, "wait")) {
        rc = sem_wait(sem);
    } else if (!strcmp(j->kind, "trywait")) {
        rc = sem_trywait(sem);
    } else if (!strcmp(j->kind, "timedwait")) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += j->ms / 1000;
        t.tv_nsec += (j->ms % 1000) * 1000000L;
        if (t.tv_nsec >= 1000000000L) {
            t.tv_sec++;
            t.tv_nsec -= 1000000000L;
        }
        rc = sem_timedwait(sem, &t);
    } else if (!strcmp(j->kind, "post")) {
        rc = sem_post(sem);
    } else if (!strcmp(j->kind, "getvalue")) {
        rc = sem_getvalue(sem, &value);
    } else {
        errno = ENOSYS;
    }
    say("done %ld %d %d %d\n", j->id, rc, rc == 0 ? 0 : errno, value);
    free(j);
    return NULL;
}

int main(void) {
    char line[512];
    setvbuf(stdin, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16] = "", a[300] = "", b[80] = "", c[80] = "";
        int n = sscanf(line, "%15s %299s %79s %79s", cmd, a, b, c);
        if (n < 1)
            continue;
        if (!strcmp(cmd, "open")) {
            errno = 0;
            sem = open_sem(a, 0, 0, n > 2 ? b : NULL);
            say("open %d %d\n", sem == SEM_FAILED ? -1 : 0, sem == SEM_FAILED ? errno : 0);
        } else if (!strcmp(cmd, "create")) {
            errno = 0;
            sem = open_sem(a, O_CREAT | O_EXCL, (unsigned int)atoi(b), n > 3 ? c : NULL);
            if (sem == SEM_FAILED) {
                say("create -1 %d -\n", errno);
                continue;
            }
            /* The token sits after the 8-byte magic of the preload library's sem_t. */
            const unsigned char *raw = (const unsigned char *)sem;
            char hex[33];
            for (int i = 0; i < 16; i++)
                snprintf(hex + 2 * i, 3, "%02x", raw[8 + i]);
            say("create 0 0 %s\n", hex);
        } else if (!strcmp(cmd, "op")) {
            struct job *j = calloc(1, sizeof *j);
            if (j == NULL)
                return 1;
            j->id = atol(a);
            snprintf(j->kind, sizeof j->kind, "%.15s", b);
            j->ms = n > 3 ? atol(c) : 0;
            pthread_t t;
            if (pthread_create(&t, NULL, run_job, j) != 0)
                return 1;
            pthread_detach(t);
        } else if (!strcmp(cmd, "view")) {
            int value = -1, works = 1, named = 0;
            errno = EBADF;
            if (sem == SEM_FAILED || sem_getvalue(sem, &value) != 0) {
                say("view -1 0 0 %d\n", errno);
                continue;
            }
            if (value > 0 && (sem_trywait(sem) != 0 || sem_post(sem) != 0))
                works = 0;
            sem_t *again = open_sem(a, 0, 0, n > 2 ? b : NULL);
            if (again != SEM_FAILED) {
                named = 1;
                sem_close(again);
            }
            say("view %d %d %d 0\n", value, named, works);
        } else if (!strcmp(cmd, "unlink")) {
            unsigned char key[32];
            size_t k = parse_key(n > 2 ? b : NULL, key);
            errno = 0;
            int rc = k ? esem_sem_unlink_keyed(a, key, k) : sem_unlink(a);
            say("unlink %d %d\n", rc, rc ? errno : 0);
        } else if (!strcmp(cmd, "transport")) {
            int (*transport)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "esem_transport");
            say("transport %d\n", transport ? transport() : -1);
        } else {
            say("error unknown command %s\n", cmd);
        }
    }
    return 0;
}
