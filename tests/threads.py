"""A thread count for the length of a `with` block, shared by the tests that
check results are bitwise the same on any number of threads."""
import contextlib

import attnkit


@contextlib.contextmanager
def thread_count(n):
    before = attnkit.get_num_threads()
    attnkit.set_num_threads(n)
    try:
        yield
    finally:
        attnkit.set_num_threads(before)
