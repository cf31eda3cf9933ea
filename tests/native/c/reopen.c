/* A name unlinked and created again by another process while this one has it open:
 * the next sem_open must return a new sem_t for the new semaphore (glibc maps the new
 * file), while repeated opens of one semaphore return the same pointer (POSIX).
 * Driven by tests/native/test_sem_identity.py: prints "ready", waits for a line on
 * stdin (the other process has re-created the name meanwhile), prints what it saw. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>

#include "esem.h"

int main(int argc, char **argv) {
    if (argc < 2)
        return 64;
    sem_t *first = sem_open(argv[1], O_CREAT | USE_ESEM, 0600, 1);
    sem_t *again = sem_open(argv[1], USE_ESEM);
    if (first == SEM_FAILED || again == SEM_FAILED)
        return 2;
    printf("ready %d\n", first == again);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 3;
    sem_t *renewed = sem_open(argv[1], USE_ESEM);
    sem_t *renewed2 = sem_open(argv[1], USE_ESEM);
    if (renewed == SEM_FAILED || renewed2 == SEM_FAILED)
        return 4;
    int v1 = -1, v2 = -1;
    if (sem_getvalue(first, &v1) != 0 || sem_getvalue(renewed, &v2) != 0)
        return 5;
    printf("same %d value_old %d value_new %d repeat_same %d\n", first == renewed, v1, v2,
           renewed == renewed2);
    if (sem_close(first) || sem_close(again) || sem_close(renewed) || sem_close(renewed2))
        return 6;
    return 0;
}
