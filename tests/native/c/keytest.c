/* Key-bound e-semaphores from C (esem.h: esem_sem_open_keyed, esem_sem_unlink_keyed)
 * under the esem preload library; each subcommand prints what it observed and exits 0
 * only if everything matched. Built and run by tests/native/test_keyed.py.
 *
 *   keyed NAME HEXKEY    create NAME bound to the key, every operation on it (and in a
 *                        fork child), the refusals; leaves NAME in place, value 1
 *   open NAME HEXKEY     open an existing NAME with the key, expect errno EXPECT
 *                        (argv[4], 0 = success: then post once)
 *   unlink NAME HEXKEY   the unlink refusals, then the keyed unlink
 *   absent               run without the library: the weak symbols are NULL */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static unsigned char key[32];
static size_t key_len;

static void parse_key(const char *hex) {
    key_len = strlen(hex) / 2;
    CHECK(key_len <= sizeof key);
    for (size_t i = 0; i < key_len; i++) {
        unsigned int b;
        CHECK(sscanf(hex + 2 * i, "%2x", &b) == 1);
        key[i] = (unsigned char)b;
    }
}

static int value(sem_t *s) {
    int v = -1;
    CHECK(sem_getvalue(s, &v) == 0);
    return v;
}

static int keyed(const char *name) {
    CHECK(esem_sem_open_keyed != NULL);
    sem_t *s = esem_sem_open_keyed(name, O_CREAT | O_EXCL, 0600, 1, key, key_len);
    CHECK(s != SEM_FAILED);
    CHECK(value(s) == 1);
    CHECK(sem_trywait(s) == 0);
    CHECK(sem_trywait(s) == -1 && errno == EAGAIN);
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_nsec += 50000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    CHECK(sem_timedwait(s, &t) == -1 && errno == ETIMEDOUT);
    CHECK(sem_post(s) == 0);
    CHECK(sem_wait(s) == 0);

    /* The same name and key again: the same sem_t, as sem_open returns. */
    sem_t *again = esem_sem_open_keyed(name, 0, 0, 0, key, key_len);
    CHECK(again == s);
    CHECK(sem_close(again) == 0);

    /* A wrong key, no key, a key of a bad length: refused, nothing opened. */
    unsigned char wrong[32];
    memcpy(wrong, key, sizeof wrong);
    wrong[0] ^= 1;
    errno = 0;
    CHECK(esem_sem_open_keyed(name, 0, 0, 0, wrong, key_len) == SEM_FAILED);
    CHECK(errno == EKEYREJECTED);
    errno = 0;
    CHECK(esem_sem_open_keyed(name, O_CREAT, 0600, 0, wrong, key_len) == SEM_FAILED);
    CHECK(errno == EKEYREJECTED);
    errno = 0;
    CHECK(sem_open(name, USE_ESEM) == SEM_FAILED && errno == EACCES);
    errno = 0;
    CHECK(esem_sem_open_keyed(name, 0, 0, 0, key, 8) == SEM_FAILED && errno == EINVAL);
    errno = 0;
    CHECK(esem_sem_open_keyed(name, 0, 0, 0, NULL, key_len) == SEM_FAILED && errno == EINVAL);

    /* A fork child attaches the inherited handle with the key and posts. */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (sem_post(s) != 0)
            _exit(2);
        _exit(value(s) == 1 ? 0 : 3);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(value(s) == 1);
    CHECK(sem_close(s) == 0);
    puts("keyed ok");
    return 0;
}

static int open_existing(const char *name, int expect) {
    errno = 0;
    sem_t *s = esem_sem_open_keyed(name, 0, 0, 0, key, key_len);
    if (expect != 0) {
        CHECK(s == SEM_FAILED);
        printf("errno %d\n", errno);
        CHECK(errno == expect);
    } else {
        CHECK(s != SEM_FAILED);
        CHECK(sem_post(s) == 0);
        CHECK(sem_close(s) == 0);
    }
    puts("open ok");
    return 0;
}

static int unlink_keyed(const char *name) {
    unsigned char wrong[32];
    memcpy(wrong, key, sizeof wrong);
    wrong[key_len - 1] ^= 0x80;
    /* The name is opened (so plain sem_unlink knows it for an e-semaphore). */
    sem_t *s = esem_sem_open_keyed(name, 0, 0, 0, key, key_len);
    CHECK(s != SEM_FAILED);
    errno = 0;
    CHECK(sem_unlink(name) == -1 && errno == EACCES);
    errno = 0;
    CHECK(esem_sem_unlink_keyed(name, wrong, key_len) == -1 && errno == EKEYREJECTED);
    CHECK(esem_sem_unlink_keyed(name, key, key_len) == 0);
    errno = 0;
    CHECK(esem_sem_open_keyed(name, 0, 0, 0, key, key_len) == SEM_FAILED && errno == ENOENT);
    CHECK(sem_post(s) == 0); /* unlinked, still open: keeps working until closed */
    CHECK(sem_close(s) == 0);
    puts("unlink ok");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 64;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "absent")) {
        CHECK(esem_sem_open_keyed == NULL && esem_sem_unlink_keyed == NULL);
        puts("absent ok");
        return 0;
    }
    if (argc < 4)
        return 64;
    parse_key(argv[3]);
    if (!strcmp(cmd, "keyed"))
        return keyed(argv[2]);
    if (!strcmp(cmd, "open"))
        return open_existing(argv[2], argc > 4 ? atoi(argv[4]) : 0);
    if (!strcmp(cmd, "unlink"))
        return unlink_keyed(argv[2]);
    return 64;
}
