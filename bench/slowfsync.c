/*
 * slowfsync: an LD_PRELOAD shim that makes fsync() and fdatasync() slow, the
 * way an SD card or a cheap eMMC is (tens of milliseconds per flush), so the
 * outbox's group commit can be measured on a fast disk.
 *
 *   cc -shared -fPIC -O2 -o slowfsync.so slowfsync.c -ldl
 *   SLOWFSYNC_MS=20 LD_PRELOAD=$PWD/slowfsync.so python bench/outbox_bench.py ...
 *
 * The delay is added before the real call. `slowfsync_calls` counts the calls
 * so the bench can report flushes per commit (read it with ctypes).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

unsigned long slowfsync_calls = 0;

static long delay_ms(void) {
    static long ms = -1;
    if (ms < 0) {
        const char *env = getenv("SLOWFSYNC_MS");
        ms = env ? atol(env) : 20;
    }
    return ms;
}

static void slow_down(void) {
    long ms = delay_ms();
    struct timespec left = {ms / 1000, (ms % 1000) * 1000000L};
    __atomic_fetch_add(&slowfsync_calls, 1, __ATOMIC_RELAXED);
    while (nanosleep(&left, &left) == -1 && errno == EINTR) {
    }
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int saved = errno;
    slow_down();
    errno = saved;
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int saved = errno;
    slow_down();
    errno = saved;
    return real(fd);
}
