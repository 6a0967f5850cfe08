"""One thread per replica for everything its model computes, and one torch thread for the rest.

PyTorch's CPU kernels run their parallel regions on libgomp's OpenMP thread teams, one team per
thread that starts a region. Once the process's main thread has started one, a model run on any
other thread with more than one torch thread is far slower: on a 2-core Xeon, vit-s16 at bf16 on
one image with two torch threads took 34 ms where one thread built and ran the model and 55 ms
where the main thread built it and another ran it; vit-cpu 5 ms and 14 ms
(`jobs/bench_torch_thread.py`). A Serve replica is that case: its constructor runs on the
replica's event-loop thread (the main thread, in the throughput-optimised mode cluster/ deploys),
and `asyncio.to_thread` hands each batch to whichever pool thread is free.

So a replica builds, warms and runs its model on one dedicated thread that owns its torch
threads, and every other thread of the process is left one torch thread: it never forms a team.
"""

from concurrent.futures import ThreadPoolExecutor

import torch


def torch_thread(name: str, threads: int) -> ThreadPoolExecutor:
    """A one-thread executor whose thread runs torch on `threads` threads: `submit(...).result()`
    from `__init__`, `loop.run_in_executor` from the event loop, every call on that OS thread.

    Afterwards the process default is one thread, for every thread but this one (the calling
    thread included), so call this before anything else in the process uses torch."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    executor.submit(_own_threads, threads).result()
    torch.set_num_threads(1)
    return executor


def _own_threads(threads: int) -> None:
    # A thread takes the process default the first time it asks torch about threads; asking
    # first makes the count set next this thread's own, whatever the default becomes later.
    torch.get_num_threads()
    torch.set_num_threads(threads)
