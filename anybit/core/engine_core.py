"""EngineCore: one step = schedule -> runner -> update_from_output.

In: requests (Request objects) and aborts from LLMEngine. Out: ``step() ->
list[EngineCoreOutput]`` with each request's new tokens and finish reason. Pure scheduling
glue; the ModelRunner (runtime/) is the only part that touches tensors.

Synchronous mode: ``runner.execute(sched)`` returns the step's results, then the scheduler
takes them.

Async scheduling (``async_scheduling=True``): the runner's ``launch(sched, prev)`` queues a
step on the device and returns a handle; ``collect(handle)`` waits for it and reads it. Each
``step()`` launches the next step, then reads the one launched before (the host work of reading
it, the stop checks and detokenization then overlap the device's work on the new one) and
returns those results: at most one step is in flight between calls. The next step is made by
``Scheduler.schedule_overlapped`` when the in-flight tokens can stay on the device (their
values become the next step's input ids there); otherwise the in-flight step is read first and
``Scheduler.schedule`` decides with every token known, exactly as in synchronous mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anybit.core.outputs import EngineCoreOutput, SchedulerOutput
from anybit.core.request import Request
from anybit.core.scheduler import Scheduler


@dataclass(slots=True)
class _InFlight:
    """A launched step whose results the host has not read: what was scheduled, and the
    runner's handle for ``collect`` (device tensors of its sampled tokens)."""

    sched: SchedulerOutput
    handle: Any


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner, async_scheduling: bool = False):
        self.scheduler = scheduler
        self.runner = runner
        self.async_scheduling = async_scheduling
        self.num_steps = 0
        self.num_overlapped_steps = 0  # async: steps launched before the previous one was read
        self._inflight: _InFlight | None = None

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    def has_unfinished(self) -> bool:
        # an in-flight step matters only through running requests, which count as unfinished
        return self.scheduler.num_unfinished > 0 or self.scheduler.has_pending_outputs()

    def step(self) -> list[EngineCoreOutput]:
        return self._step_async() if self.async_scheduling else self._step_sync()

    def _step_sync(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return self._idle()
        runner_out = self.runner.execute(sched)
        self.num_steps += 1
        return self.scheduler.update_from_output(sched, runner_out)

    def _idle(self) -> list[EngineCoreOutput]:
        """Nothing to schedule: hand back pending final outputs, or fail if work is stuck."""
        if self.scheduler.num_unfinished and not self.scheduler.has_pending_outputs():
            raise RuntimeError("scheduler made no progress: a request cannot fit in the KV cache")
        return self.scheduler.take_pending_outputs()

    # ---- async scheduling ----------------------------------------------------------------
    def _step_async(self) -> list[EngineCoreOutput]:
        prev, self._inflight = self._inflight, None
        if prev is not None:
            sched = self.scheduler.schedule_overlapped(prev.sched)
            if sched is not None:
                self._launch(sched, prev)
                self.num_overlapped_steps += 1
                return self._read(prev)
            outputs = self._read(prev)  # the next step needs every token on the host
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs if prev is not None else self._idle()
        self._launch(sched, None)
        return outputs if prev is not None else self.scheduler.take_pending_outputs()

    def _launch(self, sched: SchedulerOutput, prev: _InFlight | None) -> None:
        handle = self.runner.launch(sched, prev.handle if prev is not None else None)
        self._inflight = _InFlight(sched, handle)
        self.num_steps += 1

    def _read(self, step: _InFlight) -> list[EngineCoreOutput]:
        return self.scheduler.update_from_output(step.sched, self.runner.collect(step.handle))
