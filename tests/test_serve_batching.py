"""serve/batching.py: a batch is what queued while the previous one ran, cut only when the model
is free. Driven by a `run` that blocks until the test releases it, so every batch is known."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve.batching import DynamicBatcher


class GatedRun:
    """Records each batch and holds it until `release()`; answers item * 10."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.release()
        self.gate.acquire()
        if -1 in items:
            raise ValueError("a bad item")
        return [item * 10 for item in items]

    async def wait_started(self) -> None:
        await asyncio.to_thread(self.started.acquire)

    def release(self, times: int = 1) -> None:
        for _ in range(times):
            self.gate.release()


async def _submit(batcher: DynamicBatcher, items: list[int]) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(batcher(item)) for item in items]
    await asyncio.sleep(0.01)  # queued on the loop
    return tasks


def _behind_a_running_batch(
    max_batch_size: int, first: int, queued: list[int], *, cancel: tuple[int, ...] = ()
) -> tuple[list, list[list[int]]]:
    """`first` alone starts a batch; `queued` arrive while it runs (those at the `cancel`
    indices are then cancelled); then every batch is let through. Returns each request's result
    or exception, in submission order, and the batches `run` saw."""

    async def scenario() -> tuple[list, list[list[int]]]:
        run = GatedRun()
        batcher = DynamicBatcher(run, max_batch_size=max_batch_size)
        running = await _submit(batcher, [first])
        await run.wait_started()  # a lone request starts at once, without waiting for company
        rest = await _submit(batcher, queued)
        for index in cancel:
            rest[index].cancel()  # its client went away
        run.release(1 + len(queued))  # at most one batch per request
        return await asyncio.gather(*running, *rest, return_exceptions=True), run.batches

    return asyncio.run(scenario())


def test_requests_arriving_during_a_batch_form_the_next_one():
    results, batches = _behind_a_running_batch(32, 1, [2, 3, 4, 5, 6])
    assert batches == [[1], [2, 3, 4, 5, 6]]
    assert results == [10, 20, 30, 40, 50, 60]


def test_max_batch_size_splits_the_queue_in_arrival_order():
    results, batches = _behind_a_running_batch(3, 0, list(range(1, 8)))
    assert batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert results == [10 * item for item in range(8)]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    results, batches = _behind_a_running_batch(2, 0, [-1, 2, 3])
    assert batches == [[0], [-1, 2], [3]]
    assert results[0] == 0 and results[3] == 30
    assert all(isinstance(r, ValueError) for r in results[1:3])


def test_a_request_cancelled_while_queued_is_not_computed():
    results, batches = _behind_a_running_batch(8, 1, [2, 3, 4], cancel=(1,))
    assert batches == [[1], [2, 4]]
    assert results[0] == 10 and results[1] == 20 and results[3] == 40
    assert isinstance(results[2], asyncio.CancelledError)


def test_a_run_that_answers_the_wrong_number_of_results_fails_the_batch_instead_of_hanging():
    batcher = DynamicBatcher(lambda items: items[:-1], max_batch_size=4)

    async def scenario() -> list:
        return await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)

    results = asyncio.run(scenario())
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    assert "1 results for a batch of 2" in str(results[0])  # both queued before it ran


def test_batch_sizes_are_reported_as_they_start():
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda items: items, max_batch_size=4, on_batch=sizes.append)

    async def scenario() -> list[int]:
        return await asyncio.gather(*(batcher(i) for i in range(6)))

    assert asyncio.run(scenario()) == list(range(6))
    assert sum(sizes) == 6 and max(sizes) <= 4


@pytest.mark.parametrize("size", [0, -1, 2.5, "8", True])
def test_a_bad_max_batch_size_is_refused_with_its_value(size):
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        DynamicBatcher(lambda items: items, max_batch_size=size)


def test_every_batch_runs_on_the_given_executor():
    """A Classifier's model runs on the one thread that loaded it (serve/torch_thread.py)."""
    executor = ThreadPoolExecutor(max_workers=1)
    model_thread = executor.submit(threading.get_ident).result()

    def run(items: list[int]) -> list[int]:
        return [threading.get_ident() for _ in items]

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(run, max_batch_size=2, executor=executor)
        return await asyncio.gather(*(batcher(i) for i in range(7)))

    try:
        assert set(asyncio.run(scenario())) == {model_thread}
    finally:
        executor.shutdown()
