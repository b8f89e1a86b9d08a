"""Work beside the generation runs on its own thread alone: a LoRA read on a request thread must not
start an OpenMP team, which would make libgomp put every team to sleep between ops and slow every
generation after it (app/engine/cpu_threads.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.engine.cpu_threads import one_cpu_thread


@pytest.fixture
def two_threads():
    """Two intra-op threads for this test (the suite runs one: see tests/conftest.py), as a server has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # also what threads started from now on begin with
    yield
    torch.set_num_threads(before)


def on_thread(fn):
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def test_one_cpu_thread_limits_only_the_calling_thread_and_only_inside_the_block(two_threads):
    cores = torch.get_num_threads()
    inside, elsewhere = [], []
    with one_cpu_thread():
        inside.append(torch.get_num_threads())
        elsewhere.append(on_thread(torch.get_num_threads))
    assert inside == [1]
    assert elsewhere == [cores]
    assert torch.get_num_threads() == cores


def threads_outside_python() -> int:
    """OS threads of this process that Python did not start (OpenMP's helpers among them): Python
    threads of earlier tests may come and go meanwhile, these do not."""
    for _ in range(20):
        counts = (len(os.listdir("/proc/self/task")), threading.active_count())
        if counts == (len(os.listdir("/proc/self/task")), threading.active_count()):
            return counts[0] - counts[1]
    raise AssertionError("the process's threads kept changing")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux /proc")
def test_a_lora_read_on_a_request_thread_starts_no_openmp_team(engine, make_lora, tmp_path, two_threads):
    # Rank 128 in float16, as people ship LoRAs: the conversion to the model's float32 and the value
    # checks work on tensors large enough for torch to run them in parallel.
    path = make_lora(tmp_path / "big.safetensors", rank=128)
    save_file({k: v.half() for k, v in load_file(path).items()}, path)
    engine.read_adapter(path)  # the reader's own helper threads exist from here on
    read, release = threading.Event(), threading.Event()

    def request_thread():
        engine.read_adapter(path)
        read.set()
        release.wait(30)  # alive, as a server's request threads are, while we count

    before = threads_outside_python()
    thread = threading.Thread(target=request_thread)
    thread.start()
    try:
        assert read.wait(60)
        during = threads_outside_python()
    finally:
        release.set()
        thread.join()
    assert during == before  # no OpenMP helper threads for the request thread
