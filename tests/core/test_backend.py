"""The backend switches: ``reference_mode`` and ``fp32_precision`` belong to the thread (context) that enters them."""

import threading

import torch

from sparseblocks import backend


def test_overlapping_switches_in_two_threads_stay_apart_and_are_restored(monkeypatch):
    # Under the interpreter with interpreted kernels on, a CPU tensor takes the kernels unless reference_mode is on.
    monkeypatch.setattr(backend, "_TRITON_INTERPRET", True)
    probe = torch.zeros(1)
    default = backend.fp32_dot_precision()
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[tuple[str, bool]]] = {"a": [], "b": [], "main": []}

    def look(thread: str) -> None:
        with backend.interpreted_kernels():
            seen[thread].append((backend.fp32_dot_precision(), not backend.use_triton(probe)))

    # A enters both blocks, B enters its own, A leaves while B is inside, then B leaves: with "restore the
    # previous value" kept process-wide, B would see A's settings and put them back when it leaves.
    def thread_a():
        with backend.reference_mode(), backend.fp32_precision("tf32x3"):
            a_entered.set()
            b_entered.wait(10)
            look("a")
        a_left.set()
        look("a")

    def thread_b():
        a_entered.wait(10)
        look("b")
        with backend.fp32_precision("ieee"):
            b_entered.set()
            a_left.wait(10)
            look("b")
        look("b")

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["a"] == [("tf32x3", True), (default, False)]
    assert seen["b"] == [(default, False), ("ieee", False), (default, False)]
    look("main")
    assert seen["main"] == [(default, False)]
