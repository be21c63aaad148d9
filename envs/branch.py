"""Branching a simulation: run several continuations of one process state in forked children.

simpy processes are generators, which cannot be copied or pickled, so a simulation cannot be cloned
inside one process; ``os.fork()`` copies the whole process instead, the simulator's state included, in a
few milliseconds (copy-on-write). :func:`fork_map` runs ``fn(item)`` for every item in a child forked from
the caller at that moment and returns the results in the items' order, each sent back through a pipe as a
pickle; the caller's own state is untouched. Every child starts from the same state, random number
generators included, so the branches share their futures exactly (common random numbers) unless a
branch reseeds something itself (``ServeGymEnv.branch(reseed=...)``).

Rules for what runs in a child:

- **No torch.** The caller may have torch imported and running thread pools (training code sets
  ``torch.set_num_threads(1)``); a forked child inherits only the thread that forked, so torch (and any
  other library with worker threads or locks held by another thread) may deadlock there. A child runs the
  simulator and the inline heuristics only; a learned router as the continuation policy is refused by
  nobody but must not be used.
- **Linux-style fork only.** Where ``os.fork`` is missing (Windows) :func:`fork_map` raises
  :class:`BranchingUnavailable`; there is no spawn fallback, because a spawned process has no copy of the
  state to continue.
- A child ends with ``os._exit`` (no atexit handlers, no flushing of the caller's stdio buffers, no
  finalisers of the caller's objects).

Before forking, :func:`fork_map` calls ``gc.freeze()`` so that a garbage collection in a child does not
touch (and so copy) every page of the caller's heap, and children run with the collector disabled; the
caller's objects are unfrozen again afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import selectors
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["BranchError", "BranchingUnavailable", "Worker", "can_fork", "fork_map"]

T = TypeVar("T")
R = TypeVar("R")


class BranchError(RuntimeError):
    """A branch failed: the child's exception (type, message and traceback) or how the child died."""


class BranchingUnavailable(RuntimeError):
    """This platform has no ``os.fork`` (branching needs a copy of the running process)."""


def can_fork() -> bool:
    return hasattr(os, "fork")


def _child(fn: Callable[[Any], Any], item: Any, write_fd: int) -> None:
    """Run in the forked child: compute, send the pickled outcome, exit without cleanup."""
    status = 0
    try:
        gc.disable()
        try:
            payload = pickle.dumps(("ok", fn(item)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as error:  # every failure goes back to the parent
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            payload = pickle.dumps(("error", f"{type(error).__name__}: {error}", text))
            status = 1
        view = memoryview(payload)
        while view:
            written = os.write(write_fd, view)
            view = view[written:]
        os.close(write_fd)
    except BaseException:  # nothing may escape a forked child
        status = 2
    finally:
        os._exit(status)


def fork_map(fn: Callable[[T], R], items: Iterable[T], jobs: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, each call in a child forked from this process's current state.

    Args:
        fn: called in the child with one item; its result must pickle. It may mutate anything (the
            child's copy of the process): the caller sees only the returned value.
        items: the branches' arguments.
        jobs: at most this many children alive at once (default ``os.cpu_count()``).

    Returns the results in the order of ``items`` (deterministic whatever order children finish in).
    Raises :class:`BranchError` naming the item if a child raised (with its traceback) or died without
    answering, after every other child has been reaped; :class:`BranchingUnavailable` without
    ``os.fork``. Results are bit-identical to running ``fn`` on a copy of the state: a child shares the
    caller's random generator states as they are at the call.
    """
    if not can_fork():
        raise BranchingUnavailable(
            "branching simulations needs os.fork (Linux or macOS); this platform has none "
            f"({sys.platform}): re-simulate from reset instead"
        )
    items = list(items)
    jobs = max(1, int(jobs if jobs is not None else (os.cpu_count() or 1)))
    results: list[Any] = [None] * len(items)
    failures: list[tuple[int, str]] = []
    running: dict[int, tuple[int, int, list[bytes]]] = {}  # read fd -> (index, pid, chunks)
    selector = selectors.DefaultSelector()
    next_index = 0
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    try:
        while next_index < len(items) or running:
            while next_index < len(items) and len(running) < jobs:
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child
                    os.close(read_fd)
                    _child(fn, items[next_index], write_fd)
                os.close(write_fd)
                running[read_fd] = (next_index, pid, [])
                selector.register(read_fd, selectors.EVENT_READ)
                next_index += 1
            for key, _ in selector.select():
                read_fd = key.fd
                index, pid, chunks = running[read_fd]
                chunk = os.read(read_fd, 1 << 20)
                if chunk:
                    chunks.append(chunk)
                    continue
                selector.unregister(read_fd)
                os.close(read_fd)
                del running[read_fd]
                _, status = os.waitpid(pid, 0)
                outcome = _decode(b"".join(chunks), status)
                if outcome[0] == "ok":
                    results[index] = outcome[1]
                else:
                    failures.append((index, outcome[1] + ("\n" + outcome[2] if len(outcome) > 2 else "")))
    finally:
        for read_fd, (_, pid, _) in running.items():  # interrupted (KeyboardInterrupt): no orphans
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(read_fd)
        selector.close()
        gc.unfreeze()
    if failures:
        index, text = min(failures)
        others = f" ({len(failures) - 1} other branches failed too)" if len(failures) > 1 else ""
        raise BranchError(f"branch {index} (item {items[index]!r}) failed{others}: {text}")
    return results


def _decode(payload: bytes, status: int) -> tuple:
    if payload:
        try:
            return pickle.loads(payload)
        except Exception as error:
            return ("error", f"its result could not be unpickled ({error})")
    if os.WIFSIGNALED(status):
        return ("error", f"the child was killed by signal {os.WTERMSIG(status)} before answering")
    return ("error", f"the child exited with status {os.waitstatus_to_exitcode(status)} before answering")


class Worker:
    """A forked child that owns a copy of the caller's state and answers calls through a pipe: the
    caller sends ``(name, args, kwargs)``, the child runs ``getattr(target, name)(*args, **kwargs)`` on its
    copy and sends the result back (pickles both ways). Used by environments that branch several
    episodes from one warm snapshot: the snapshot stays in the caller, each episode runs in a worker.

    The child exits when told (:meth:`close`), when the caller's end of the pipe closes (the caller
    exited or died), or on any signal that ends the caller's process group; the same rules as
    :func:`fork_map` apply (no torch in the child, ``os._exit``)."""

    def __init__(self, target: Any) -> None:
        if not can_fork():
            raise BranchingUnavailable(f"episode branching needs os.fork; this platform ({sys.platform}) has none")
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            os.close(parent_writes)
            os.close(parent_reads)
            _serve(target, child_reads, child_writes)
        gc.unfreeze()
        os.close(child_reads)
        os.close(child_writes)
        self.pid, self._send, self._receive = pid, parent_writes, parent_reads

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.pid is None:
            raise BranchError("the worker has been closed")
        _send_message(self._send, (name, args, kwargs))
        reply = _receive_message(self._receive)
        if reply is None:
            pid, self.pid = self.pid, None
            _, status = os.waitpid(pid, 0)
            raise BranchError(f"the episode worker died during {name}(): {_decode(b'', status)[1]}")
        if reply[0] == "error":
            raise BranchError(f"{name}() failed in the episode worker: {reply[1]}\n{reply[2]}")
        return reply[1]

    def close(self) -> None:
        """End the child (if alive) and reap it."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.close(self._send)  # EOF: the child's loop ends
            os.close(self._receive)
        except OSError:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def _send_message(fd: int, message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(payload).to_bytes(8, "little") + payload)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, left = [], size
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _receive_message(fd: int) -> Any:
    header = _read_exactly(fd, 8)
    if header is None:
        return None
    payload = _read_exactly(fd, int.from_bytes(header, "little"))
    return None if payload is None else pickle.loads(payload)


def _serve(target: Any, receive: int, send: int) -> None:
    """The worker's loop (in the child): answer calls until EOF."""
    try:
        gc.disable()
        while True:
            message = _receive_message(receive)
            if message is None:
                break
            name, args, kwargs = message
            try:
                reply = ("ok", getattr(target, name)(*args, **kwargs))
            except Exception as error:  # goes back to the caller
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                reply = ("error", f"{type(error).__name__}: {error}", text)
            _send_message(send, reply)
    except BaseException:  # nothing may escape a forked child
        pass
    finally:
        os._exit(0)
