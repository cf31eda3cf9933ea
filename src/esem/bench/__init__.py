"""Benchmarks: every figure esem claims, measured beside legacy POSIX semaphores."""
