"""Every use of a private Dask or llama.cpp API, in one place, with the versions it was
checked against.

The rest of the project calls the functions here, never an underscore name (or an internal
of the kind listed below) of ``distributed`` or ``llama_cpp``. When a new release changes
one of them, ``check()`` says which and what to change, and ``tests/test_compat.py`` fails
with that message; ``pyproject.toml`` pins both packages to the versions below so that a
fresh install gets what was tested. It sits at the bottom layer (``workloads/``) so that
both layers use it (ARCHITECTURE.md, "Internals"). Nothing heavy is imported here at import
time: ``llama_cpp`` loads only when a llama.cpp shim is called.

What is used, and why no public API does it:

* ``distributed.client.FutureState`` (subclassed), ``Future._state``, ``FutureState._get_event``
  and the reason ``"scheduler-connection-lost"``: a future lost with a restarting scheduler
  keeps waiting and is submitted again (``cluster/redo.py``; distributed resubmits nothing).
* ``Client._gather`` (wrapped): what ``result()`` handed out is remembered, so a restart
  does not compute it again (``cluster/redo.py``).
* ``Client._send_to_scheduler``: a stream's reader tells the scheduler's hub it stopped
  reading, without a round trip (``cluster/streams.py``).
* ``SystemMonitor.get_process_memory`` (replaced): the worker's memory thresholds count
  its model engines' child processes (``cluster/plugin.py``).
* ``TaskState.resource_restrictions`` (written) and ``Scheduler.transitions``: the
  TierGuard moves a task to a fallback tier when its tier's workers are gone
  (``cluster/routing.py``).
* ``llama_cpp._internals.LlamaModel`` / ``LlamaContext``: the batch engine drives llama.cpp's
  C API with several sequences (the high-level ``Llama`` decodes one); ``Llama._ctx`` /
  ``Llama._model``: the soak's in-process judge reads logits and end-of-generation tokens.
* ``LlamaChatCompletionHandlerRegistry()._chat_handlers``: the names of the chat formats
  a model's ``chat_format`` may name (``workloads/backends/chat.py``).
* ``distributed._signals.wait_for_signals``: ``aicluster scheduler`` / ``worker`` stop on
  Ctrl-C and SIGTERM as ``dask scheduler`` / ``dask worker`` do (``cluster/cli.py``).
* ggml's RPC protocol version (``RPC_PROTO``), which a head checks before it connects.
"""
from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path
from typing import Callable

__all__ = ["DISTRIBUTED_VERSION", "LLAMA_CPP_VERSION", "RPC_PROTO", "SCHEDULER_LOST", "check",
           "FutureState", "future_state", "set_future_state", "rearm", "wrap_gather", "send_to_scheduler",
           "count_child_memory", "restrict_resources", "transitions", "llama_model_class", "llama_context_class",
           "llama_ctx", "llama_vocab", "llama_chat_format_names", "wait_for_signals"]

#: the versions every shim below was checked against (pyproject.toml pins these)
DISTRIBUTED_VERSION = "2026.8.0"
LLAMA_CPP_VERSION = "0.3.36"

#: ggml RPC protocol (major, minor) of the llama.cpp that llama-cpp-python LLAMA_CPP_VERSION
#: vendors (``include/ggml-rpc.h``, RPC_PROTO_MAJOR_VERSION / MINOR): a shard server answers
#: HELLO with its own, and a head refuses a different major or a newer minor
RPC_PROTO = (7, 0)

#: the reason distributed gives every future when its client loses the scheduler
SCHEDULER_LOST = "scheduler-connection-lost"


# -- distributed ----------------------------------------------------------------------------------
def __getattr__(name: str):
    if name == "FutureState":  # (imported on use: workers that never redo do not need it)
        from distributed.client import FutureState

        return FutureState
    raise AttributeError(name)


def future_state(future):
    """The shared state of ``future`` (one per key, held by every Future of that key)."""
    return future._state


def set_future_state(future, state) -> None:
    future._state = state


def rearm(state) -> None:
    """Make a cancelled state wait again (its waiters' event is cleared; status pending)."""
    state.status = "pending"
    state._get_event().clear()


def wrap_gather(client, after: Callable[[list, list], None]) -> None:
    """Call ``after(futures, values)`` each time this client fetched results (``result()``,
    ``gather``: every fetch goes through ``Client._gather``)."""
    gather = client._gather

    async def _gather(futures, *args, **kwargs):
        out = await gather(futures, *args, **kwargs)
        if isinstance(futures, (list, tuple)) and isinstance(out, (list, tuple)):
            after(futures, out)
        return out

    client._gather = _gather


def send_to_scheduler(client, msg: dict) -> None:
    """Send ``msg`` on the client's batched stream to the scheduler (no reply, no round trip)."""
    client._send_to_scheduler(msg)


def count_child_memory(monitor, extra: Callable[[], int]) -> bool:
    """Make the worker's memory monitor count ``extra()`` bytes on top of its own process
    (its thresholds then see the child processes too). Once per monitor; False if it was."""
    if getattr(monitor, "_aicluster_children", False):
        return False
    own = monitor.get_process_memory
    monitor.get_process_memory = lambda: own() + extra()
    monitor._aicluster_children = True
    return True


def restrict_resources(ts, resources: dict) -> None:
    """Set a (released or processing) task's resource restrictions on the scheduler."""
    ts.resource_restrictions = dict(resources)


def transitions(scheduler, recommendations: dict, stimulus_id: str) -> None:
    """Run the scheduler's transition engine on ``recommendations`` (``{key: state}``)."""
    scheduler.transitions(recommendations, stimulus_id)


# -- llama-cpp-python -------------------------------------------------------------------------------
def llama_model_class():
    """``llama_cpp._internals.LlamaModel``: a model without the high-level ``Llama``'s context."""
    from llama_cpp._internals import LlamaModel

    return LlamaModel


def llama_context_class():
    """``llama_cpp._internals.LlamaContext``: a context of several sequences on a ``LlamaModel``."""
    from llama_cpp._internals import LlamaContext

    return LlamaContext


def llama_ctx(llm):
    """The ``llama_context *`` of a high-level ``llama_cpp.Llama`` (for the C API)."""
    return llm._ctx.ctx


def llama_vocab(llm):
    """The ``llama_vocab *`` of a high-level ``llama_cpp.Llama`` (for the C API)."""
    return llm._model.vocab


def llama_chat_format_names() -> list[str]:
    """The names of llama-cpp-python's registered chat formats (its registry lists them only
    in ``LlamaChatCompletionHandlerRegistry()._chat_handlers``)."""
    from llama_cpp import llama_chat_format

    return list(llama_chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers)


# -- distributed's CLI helpers ------------------------------------------------------------------------
async def wait_for_signals():
    """Until SIGINT or SIGTERM, as ``dask scheduler`` / ``dask worker`` wait
    (``distributed._signals.wait_for_signals``)."""
    from distributed._signals import wait_for_signals as wait

    return await wait()


# -- the check ---------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check() -> list[str]:
    """What no longer holds, one line each with what to change (empty: every shim holds)."""
    problems: list[str] = []
    fix = "; adapt workloads/compat.py to it, then the pin in pyproject.toml and the version here"
    have = _version("distributed")
    if have != DISTRIBUTED_VERSION:
        problems.append(f"distributed {have} is installed, workloads/compat.py was checked against "
                        f"{DISTRIBUTED_VERSION}: run tests/test_compat.py and the redo/routing tests{fix}")
    import distributed.client as dc
    from distributed.scheduler import Scheduler, TaskState
    from distributed.system_monitor import SystemMonitor

    try:
        from distributed._signals import wait_for_signals  # noqa: F401
    except ImportError:
        problems.append(f"distributed._signals.wait_for_signals is gone (wait_for_signals){fix}")
    needs = [
        (hasattr(dc, "FutureState"), "distributed.client.FutureState is gone (cluster/redo.py subclasses it)"),
        (hasattr(getattr(dc, "FutureState", None), "_get_event"), "FutureState._get_event is gone (rearm)"),
        ("_state" in inspect.getsource(dc.Future), "Future._state is gone (future_state, set_future_state)"),
        (hasattr(dc.Client, "_gather") and list(inspect.signature(dc.Client._gather).parameters)[:2] == ["self", "futures"],
         "Client._gather(futures, ...) changed (wrap_gather)"),
        (hasattr(dc.Client, "_send_to_scheduler"), "Client._send_to_scheduler is gone (send_to_scheduler)"),
        (SCHEDULER_LOST in inspect.getsource(dc), f"distributed.client no longer says {SCHEDULER_LOST!r} "
                                                  f"when the scheduler is lost (SCHEDULER_LOST)"),
        (hasattr(SystemMonitor, "get_process_memory"), "SystemMonitor.get_process_memory is gone (count_child_memory)"),
        ("resource_restrictions" in getattr(TaskState, "__slots__", ()) or hasattr(TaskState, "resource_restrictions"),
         "TaskState.resource_restrictions is gone (restrict_resources)"),
        (list(inspect.signature(Scheduler.transitions).parameters)[:3] == ["self", "recommendations", "stimulus_id"],
         "Scheduler.transitions(recommendations, stimulus_id) changed (transitions)"),
    ]
    problems += [f"{msg}{fix}" for ok, msg in needs if not ok]
    have = _version("llama_cpp_python")
    if have != LLAMA_CPP_VERSION:
        problems.append(f"llama-cpp-python {have} is installed, workloads/compat.py was checked against "
                        f"{LLAMA_CPP_VERSION} (and the Makefile builds LLAMA_VERSION){fix}")
    try:
        import llama_cpp
        import llama_cpp._internals as internals
    except ImportError as e:
        return problems + [f"llama_cpp cannot be imported ({e}): make install"]
    for name in ("LlamaModel", "LlamaContext"):
        if not hasattr(internals, name):
            problems.append(f"llama_cpp._internals.{name} is gone (llama_{name[5:].lower()}_class){fix}")
    from llama_cpp import llama_chat_format

    if not hasattr(llama_chat_format.LlamaChatCompletionHandlerRegistry(), "_chat_handlers"):
        problems.append(f"LlamaChatCompletionHandlerRegistry._chat_handlers is gone (llama_chat_format_names){fix}")
    src = inspect.getsource(llama_cpp.Llama.__init__)
    for attr in ("_ctx", "_model"):
        if f"self.{attr}" not in src:
            problems.append(f"llama_cpp.Llama.{attr} is gone (llama_ctx, llama_vocab){fix}")
    header = Path(llama_cpp.__file__).parent.parent / "include" / "ggml-rpc.h"
    if header.is_file():
        text = header.read_text(errors="replace")
        got = []
        for part in ("MAJOR", "MINOR"):
            line = next((ln for ln in text.splitlines() if f"RPC_PROTO_{part}_VERSION" in ln and "#define" in ln), "")
            got.append(int(line.split()[-1]) if line.split() and line.split()[-1].isdigit() else None)
        if tuple(got) != RPC_PROTO:
            problems.append(f"the installed llama.cpp speaks ggml RPC {got[0]}.{got[1]} ({header}), RPC_PROTO is "
                            f"{RPC_PROTO[0]}.{RPC_PROTO[1]}: set RPC_PROTO in workloads/compat.py")
    return problems
