"""serve/torch_thread.py: the model's thread keeps its torch threads; every other thread gets one,
so no second OpenMP team forms in a replica."""

import threading

import torch

from serve.torch_thread import torch_thread


def _in_new_thread(function):
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    return result[0]


def test_the_model_thread_keeps_its_threads_and_every_other_thread_gets_one():
    before = torch.get_num_threads()
    executor = torch_thread("test-model", 2)
    try:
        assert executor.submit(torch.get_num_threads).result() == 2
        assert torch.get_num_threads() == 1  # the calling thread
        assert _in_new_thread(torch.get_num_threads) == 1  # threads started later
        # The model thread's count survives what other threads do with the default.
        torch.set_num_threads(1)
        assert executor.submit(torch.get_num_threads).result() == 2
    finally:
        executor.shutdown()
        torch.set_num_threads(before)


def test_every_call_runs_on_the_same_thread():
    before = torch.get_num_threads()
    executor = torch_thread("test-model", 1)
    try:
        idents = {executor.submit(threading.get_ident).result() for _ in range(5)}
        assert len(idents) == 1 and threading.get_ident() not in idents
    finally:
        executor.shutdown()
        torch.set_num_threads(before)
