"""bench/burst_trace.py's tracer, loaded as sitecustomize into the neuron and cortex it starts
(PYTHONPATH): wraps a few methods on a generation's path to log time.monotonic() stamps (one
clock for every process of the host), and every garbage collection of generation 1 or 2 (or
longer than 0.5 ms), to DIAG_TRACE-<pid>.jsonl. DIAG_ROLE (neuron | cortex) picks the wrappers.
A diagnostic: it changes nothing when DIAG_TRACE is unset."""
import atexit
import gc
import json
import os
import threading
import time

_PREFIX = os.environ.get("DIAG_TRACE")
_events = []
_lock = threading.Lock()


def ev(name, **fields):
    _events.append((time.monotonic(), threading.get_ident() % 100000, name, fields))


_flushed = [0]


def _flush():
    """Appends the events logged since the last flush (the first version rewrote the whole file
    each second: work that grew with the trace, under the GIL the traced threads share)."""
    with _lock:
        items = _events[_flushed[0]:]
        _flushed[0] += len(items)
        with open(f"{_PREFIX}-{os.getpid()}.jsonl", "a") as f:
            f.writelines(json.dumps([t, th, name, fields]) + "\n" for t, th, name, fields in items)


def _flusher():
    while True:
        time.sleep(1.0)
        try:
            _flush()
        except Exception:
            pass


def _patch_neuron():
    from neuron.engine import core
    from neuron.runner import model_runner
    from neuron.service import generate_stream as gs

    start = gs.GenerationStream._start
    def _start(self, key, request):
        ev("n_start", key=key, n=len(request.prompt.tokens.ids))
        return start(self, key, request)
    gs.GenerationStream._start = _start

    submit = gs.Generation.submit_nowait
    def _submit(self, on_error):
        ev("n_submit", key=self.caller.key)
        submit(self, on_error)
    gs.Generation.submit_nowait = _submit

    take = gs.Inbox.take
    def _take(self):
        items = take(self)
        ev("n_take", items=len(items))
        return items
    gs.Inbox.take = _take

    add = core.ShardEngine.add
    def _add(self, request, caller):
        ev("n_add0", key=caller.key)
        add(self, request, caller)
        ev("n_add1", key=caller.key)
    core.ShardEngine.add = _add

    step = core.ShardEngine.step
    def _step(self, ahead=True):
        ev("n_step0")
        step(self, ahead)
        ev("n_step1")
    core.ShardEngine.step = _step

    post_all = core.ShardEngine._post_all
    def _post_all(self, updates, sampled_at):
        firsts = sum(1 for u in updates if u.new_token_ids and len(u.request.output_ids) == len(u.new_token_ids))
        ev("n_post0", updates=len(updates), firsts=firsts)
        post_all(self, updates, sampled_at)
        ev("n_post1")
    core.ShardEngine._post_all = _post_all

    launch = model_runner.ModelRunner.launch
    def _launch(self, plan, feed=None):
        ev("n_launch0", chunks=len(plan.chunks), tokens=plan.num_tokens, fed=feed is not None,
           prompt_chunks=sum(1 for c in plan.chunks if len(c.token_ids) > 1))
        out = launch(self, plan, feed)
        ev("n_launch1")
        return out
    model_runner.ModelRunner.launch = _launch

    finish = model_runner.ModelRunner.finish
    def _finish(self, launched):
        ev("n_fin0")
        out = finish(self, launched)
        ev("n_fin1")
        return out
    model_runner.ModelRunner.finish = _finish


def _patch_cortex():
    from cortex import node_streams as ns
    from cortex.api import convert

    gen = convert.generate_request
    def _gen(request, handle, request_id):
        ev("c_in", n=len(request.prompt.tokens.ids))
        return gen(request, handle, request_id)
    convert.generate_request = _gen

    generate = ns.NodeStream.generate
    async def _generate(self, request, timeout, interval=1):
        ev("c_fwd")
        first = True
        async for r in generate(self, request, timeout, interval):
            if first and r.token_ids:
                ev("c_first")
                first = False
            yield r
    ns.NodeStream.generate = _generate


if _PREFIX:
    role = os.environ.get("DIAG_ROLE", "")
    try:
        if role == "neuron":
            _patch_neuron()
        elif role == "cortex":
            _patch_cortex()
    except Exception as err:  # noqa: BLE001
        ev("patch_failed", error=repr(err))
    _gc_start = {}

    def _gc_cb(phase, info):
        if phase == "start":
            _gc_start["t"] = time.monotonic()
        else:
            ms = (time.monotonic() - _gc_start.get("t", time.monotonic())) * 1e3
            if info["generation"] >= 1 or ms > 0.5:
                ev("gc", gen=info["generation"], ms=round(ms, 2), collected=info["collected"])
    gc.callbacks.append(_gc_cb)
    atexit.register(_flush)
    threading.Thread(target=_flusher, daemon=True).start()
