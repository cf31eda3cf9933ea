/* esem.h: what a C program needs to keep a named semaphore in the esem service when it
 * runs under the esem preload library (LD_PRELOAD=libesem_preload.so, or `esem run`).
 *
 *     #include <semaphore.h>
 *     #include "esem.h"
 *     sem_t *s = sem_open("/name", O_CREAT | USE_ESEM, 0600, 1);
 *
 * Everything else is the POSIX API unchanged. Under `esem run --all`
 * (ESEM_PRELOAD_ALL=1) every semaphore, named or unnamed, goes to the service and the
 * flag is not needed.
 *
 * USE_ESEM is bit 30 of oflag. No glibc O_* flag uses it: on Linux the highest is
 * __O_TMPFILE (bit 22) and the kernel's open flags stop there too, so the bit cannot
 * change the meaning of any flag a program passes; and it keeps oflag a positive int.
 * Without the preload library glibc ignores it and the semaphore is an ordinary one.
 *
 * One difference from POSIX, on purpose: O_CREAT (without O_EXCL) of a name that another
 * uid (not root) created first fails with EACCES instead of opening the other uid's
 * semaphore, so a squatter cannot hand a program its own count. The C API has no way to
 * accept a foreign owner; sem_open without O_CREAT opens it as its mode allows.
 */
#ifndef ESEM_H
#define ESEM_H

#define USE_ESEM 010000000000 /* 0x40000000 */

#endif
