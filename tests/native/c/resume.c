/* An unmodified POSIX semaphore program for the crash-safety tests (tests/native/
 * test_resume.py), run under `esem run --all`: it knows nothing of esem, and any error
 * it sees from a semaphore call is reported and fails it.
 *
 *   resume wait NAME
 *       open NAME (created at 0), say "waiting", sem_wait, say "granted".
 *   resume forkwait NAME
 *       open NAME (created at 0), fork; parent and child each say "waiting ROLE",
 *       sem_wait, say "granted ROLE"; the parent exits with the child's status.
 *   resume mutex NAME DIR ITERATIONS
 *       ITERATIONS critical sections under NAME (created at 1): each creates DIR/inside
 *       with O_EXCL (so two workers inside at once is seen, not assumed), reads, bumps
 *       and rewrites DIR/counter, holds the section a little, removes DIR/inside and
 *       posts. Says "ready" once NAME is open, "done N" at the end.
 *   resume dropwait NAME UID
 *       as wait, but after the open the program becomes UID (gid UID, no groups), as
 *       a daemon dropping root does (Apache's workers): says "waiting uid=U".
 *   resume ringwait NAME
 *       as wait, but says "waiting transport=T" and, once granted, "transport=T" with
 *       T the preload library's esem_transport() (2: the switchless rings, 1: the
 *       socket, 0: no session, -1: not under the preload library); after the grant it
 *       asks for up to 10 s until T is 2 (a resumed session upgrades again).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) {
    printf("error %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static sem_t *open_sem(const char *name, unsigned value) {
    sem_t *s = sem_open(name, O_CREAT, 0600, value);
    if (s == SEM_FAILED)
        die("sem_open");
    return s;
}

/* sem_wait, retried on EINTR only (what a careful program does). */
static void take(sem_t *s) {
    while (sem_wait(s) != 0) {
        if (errno != EINTR)
            die("sem_wait");
    }
}

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

static int wait_mode(const char *name) {
    sem_t *s = open_sem(name, 0);
    printf("waiting\n");
    fflush(stdout);
    take(s);
    printf("granted\n");
    fflush(stdout);
    return 0;
}

static int forkwait_mode(const char *name) {
    sem_t *s = open_sem(name, 0);
    pid_t child = fork();
    if (child < 0)
        die("fork");
    const char *role = child == 0 ? "child" : "parent";
    printf("waiting %s\n", role);
    fflush(stdout);
    take(s);
    printf("granted %s\n", role);
    fflush(stdout);
    if (child == 0)
        return 0;
    int status = 0;
    if (waitpid(child, &status, 0) != child)
        die("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

static int dropwait_mode(const char *name, long uid) {
    sem_t *s = open_sem(name, 0);
    if (setgroups(0, NULL) != 0 || setgid((gid_t)uid) != 0 || setuid((uid_t)uid) != 0)
        die("setuid");
    printf("waiting uid=%d\n", (int)getuid());
    fflush(stdout);
    take(s);
    printf("granted\n");
    fflush(stdout);
    return 0;
}

static int transport(void) {
    int (*f)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "esem_transport");
    return f == NULL ? -1 : f();
}

static int ringwait_mode(const char *name) {
    sem_t *s = open_sem(name, 0);
    printf("waiting transport=%d\n", transport());
    fflush(stdout);
    take(s);
    printf("granted\n");
    fflush(stdout);
    int t = transport();
    for (int i = 0; i < 1000 && t != 2; i++) {
        pause_ms(10);
        t = transport();
    }
    printf("transport=%d\n", t);
    fflush(stdout);
    return 0;
}

static int mutex_mode(const char *name, const char *dir, long iterations) {
    char inside[4096], counter[4096];
    snprintf(inside, sizeof inside, "%s/inside", dir);
    snprintf(counter, sizeof counter, "%s/counter", dir);
    sem_t *s = open_sem(name, 1);
    printf("ready\n");
    fflush(stdout);
    for (long i = 0; i < iterations; i++) {
        take(s);
        int marker = open(inside, O_CREAT | O_EXCL | O_WRONLY, 0600);
        if (marker < 0) {
            printf("error two workers inside at once: %s\n", strerror(errno));
            fflush(stdout);
            return 1;
        }
        close(marker);
        long n = 0;
        FILE *f = fopen(counter, "r");
        if (f != NULL) {
            if (fscanf(f, "%ld", &n) != 1)
                n = 0;
            fclose(f);
        }
        pause_ms(2); /* hold the section: a restart lands inside it often */
        f = fopen(counter, "w");
        if (f == NULL)
            die("fopen counter");
        fprintf(f, "%ld\n", n + 1);
        fclose(f);
        if (unlink(inside) != 0)
            die("unlink inside");
        if (sem_post(s) != 0)
            die("sem_post");
        pause_ms(1);
    }
    printf("done %ld\n", iterations);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "wait") == 0)
        return wait_mode(argv[2]);
    if (argc == 3 && strcmp(argv[1], "forkwait") == 0)
        return forkwait_mode(argv[2]);
    if (argc == 3 && strcmp(argv[1], "ringwait") == 0)
        return ringwait_mode(argv[2]);
    if (argc == 4 && strcmp(argv[1], "dropwait") == 0)
        return dropwait_mode(argv[2], atol(argv[3]));
    if (argc == 5 && strcmp(argv[1], "mutex") == 0)
        return mutex_mode(argv[2], argv[3], atol(argv[4]));
    fprintf(stderr, "usage: resume wait NAME | resume forkwait NAME | "
                    "resume mutex NAME DIR ITERATIONS | resume ringwait NAME | "
                    "resume dropwait NAME UID\n");
    return 2;
}
