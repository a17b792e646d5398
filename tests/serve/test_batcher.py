"""The server's batcher: forwards of at most `batch` images, every waiting request served in each."""

import asyncio
import threading
import time

import numpy as np
import torch

from pipeline.serve.server import Batcher


class SlowPredictor:
    """Records each forward's images; a forward takes `seconds`."""

    def __init__(self, seconds: float = 0.02):
        self.seconds, self.forwards, self.lock = seconds, [], threading.Lock()

    def features(self, images):
        time.sleep(self.seconds)
        with self.lock:
            self.forwards.append(images[:, 0, 0, 0].tolist())
        return images[:, 0, 0, :1].numpy().astype(np.float32)

    def proba(self, rows):
        return np.concatenate([rows, 1 - rows], 1)

    def far(self, rows):
        return rows[:, 0] * 10, rows[:, 0] > 5


def images(tag: int, n: int) -> list:
    return [torch.full((3, 2, 2), tag, dtype=torch.uint8) for _ in range(n)]


def test_each_forward_shares_its_room_among_the_requests_waiting():
    batcher = Batcher(SlowPredictor(), batch=8)
    assert batcher.shares([300]) == [8]
    assert batcher.shares([300, 1]) == [7, 1]  # the share is 4 each; the room left goes to the oldest
    assert batcher.shares([2, 300, 300]) == [2, 4, 2]
    assert batcher.shares([1] * 10) == [1] * 10  # at least one each, whatever the batch


def test_a_single_image_is_not_kept_waiting_by_a_large_request():
    predictor = SlowPredictor()
    batcher = Batcher(predictor, batch=8)
    finished = []

    async def run():
        async def one(tag, n, delay):
            await asyncio.sleep(delay)
            proba, far = await batcher.embed(images(tag, n))
            finished.append((tag, time.perf_counter()))
            return proba, far

        return await asyncio.gather(one(1, 256, 0), one(2, 1, 0.05))

    (big, big_far), (small, small_far) = asyncio.run(run())
    assert [tag for tag, _ in finished] == [2, 1]  # the single image was answered first
    arrived = next(k for k, f in enumerate(predictor.forwards) if 2 in f)
    assert arrived <= 4 and all(len(f) <= 8 for f in predictor.forwards)  # in a forward soon after it came
    assert big.shape == (256, 2) and (big[:, 0] == 1).all() and small.tolist() == [[2.0, -1.0]]
    assert big_far[0].shape == big_far[1].shape == (256,) and not big_far[1].any()
    assert small_far[0].tolist() == [20.0] and small_far[1].tolist() == [False]


def test_no_more_images_are_decoded_at_once_than_the_slots_all_requests_together(monkeypatch):
    from pipeline.serve import server

    busy, most, lock = [0], [0], threading.Lock()

    def slow_decode(name, data, fcfg):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.02)
        with lock:
            busy[0] -= 1
        return name

    monkeypatch.setattr(server, "decode", slow_decode)
    decoder = server.Decoder(fcfg=None, slots=3)

    async def requests():
        async def one_request(r):  # a request decodes its files one after another, as the endpoint does
            return [await decoder(f"{r}-{i}", b"") for i in range(4)]
        return await asyncio.gather(*(one_request(r) for r in range(10)))

    got = asyncio.run(requests())
    assert most[0] == 3 and got[9] == ["9-0", "9-1", "9-2", "9-3"]
