"""checkpoint.BackgroundSaver and host_copy: order, threads and errors of saves that overlap training."""

import threading

import numpy as np
import pytest

from lgmrec_jax import checkpoint as ckpt_lib


def test_saves_run_on_a_thread_and_what_follows_waits_for_them():
    saver = ckpt_lib.BackgroundSaver()
    log, release = [], threading.Event()

    def save(n):
        release.wait(timeout=30)
        log.append(("save", n, threading.current_thread() is threading.main_thread()))

    try:
        saver.submit(lambda: save(1), lambda: log.append(("then", 1, threading.current_thread() is threading.main_thread())))
        assert log == []  # the save is waiting; nothing that follows it has run
        release.set()
        saver.submit(lambda: save(2), lambda: log.append(("then", 2, True)))  # finishes save 1 first
        saver.after_saves(lambda: log.append(("row", 3, True)))
    finally:
        saver.close()
    assert log == [("save", 1, False), ("then", 1, True), ("save", 2, False), ("then", 2, True), ("row", 3, True)]


def test_a_failed_save_is_raised_by_finish_and_what_follows_it_is_dropped():
    saver = ckpt_lib.BackgroundSaver()
    followed = []

    def save():
        raise ckpt_lib.CheckpointError("saving checkpoint 3 failed (No space left on device)")

    saver.submit(save, lambda: followed.append(3))
    with pytest.raises(ckpt_lib.CheckpointError, match="No space left on device"):
        saver.finish()
    saver.finish()  # nothing pending any more
    saver.close()
    assert followed == []


def test_host_copy_is_independent_of_the_source():
    source = {"a": np.arange(4.0), "b": (np.ones((2, 2), np.float32),)}
    copy = ckpt_lib.host_copy(source)
    source["a"][0] = 99.0
    source["b"][0][:] = 0.0
    np.testing.assert_array_equal(copy["a"], [0.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(copy["b"][0], np.ones((2, 2)))
