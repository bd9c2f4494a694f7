"""EngineCore: one step = schedule -> runner.execute -> update_from_output.

In: requests (Request objects) and aborts from LLMEngine. Out: ``step() ->
list[EngineCoreOutput]`` with each request's new tokens and finish reason. Pure scheduling
glue; the ModelRunner (runtime/) is the only part that touches tensors.
"""

from __future__ import annotations

from anybit.core.outputs import EngineCoreOutput
from anybit.core.request import Request
from anybit.core.scheduler import Scheduler


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner):
        self.scheduler = scheduler
        self.runner = runner
        self.num_steps = 0

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort_request(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.scheduler.has_pending_outputs()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.num_unfinished and not self.scheduler.has_pending_outputs():
                raise RuntimeError("scheduler made no progress: a request cannot fit in the KV cache")
            return self.scheduler.update_from_output(sched, None) if self.scheduler.has_pending_outputs() \
                else []
        runner_out = self.runner.execute(sched)
        self.num_steps += 1
        return self.scheduler.update_from_output(sched, runner_out)
