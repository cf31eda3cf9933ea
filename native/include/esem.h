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

#include <errno.h>
#include <semaphore.h>
#include <stddef.h>
#include <sys/types.h>

#define USE_ESEM 010000000000 /* 0x40000000 */

/* Key-bound e-semaphores (PROTOCOL.md section 8): a semaphore created with a secret key
 * of 16 to 32 bytes can be operated only by a client that proves the key, and its
 * replies prove it back, so even a kernel that lies about uid and pid cannot operate it.
 *
 *     static const unsigned char key[32] = { ... };   (kept secret by the program)
 *     sem_t *s = esem_sem_open_keyed("/name", O_CREAT, 0600, 1, key, sizeof key);
 *     sem_wait(s); ... sem_post(s);                    (every sem_* call works on s)
 *     sem_close(s);
 *     esem_sem_unlink_keyed("/name", key, sizeof key);
 *
 * esem_sem_open_keyed is sem_open with USE_ESEM implied: with O_CREAT (and O_EXCL) it
 * creates a semaphore bound to the key; an existing name opens only if it is bound to
 * this key. The returned sem_t works with sem_wait, sem_trywait, sem_timedwait,
 * sem_clockwait, sem_post, sem_getvalue and sem_close; the preload library MACs every
 * request on it under the key and checks the MAC of every reply.
 *
 * Errors are sem_open's and sem_unlink's, plus: EKEYREJECTED (Linux errno 129) when
 * the key is wrong, when the name exists but is not key-bound, or for O_CREAT of an
 * existing name that is bound to another key; EINVAL when key is NULL or key_len is
 * outside 16..32. A key-bound semaphore opened with plain sem_open, or unlinked with
 * plain sem_unlink, fails with EACCES (POSIX has no key errno): it needs its key.
 *
 * The two functions exist only in the preload library (LD_PRELOAD, `esem run`). They
 * are declared weak, so a program builds without linking anything and can tell at run
 * time whether the library is there: `if (esem_sem_open_keyed == NULL)` it is not (a
 * call would crash), and the program can refuse to run or fall back knowingly.
 */
extern sem_t *esem_sem_open_keyed(const char *name, int oflag, mode_t mode,
                                  unsigned int value, const void *key, size_t key_len)
    __attribute__((weak));
extern int esem_sem_unlink_keyed(const char *name, const void *key, size_t key_len)
    __attribute__((weak));

#endif
