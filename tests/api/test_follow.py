"""The SDK's one "follow a job until it ends" loop (api.client.follow, Client.follow), which Client.wait,
`ladle logs -f`, `ladle submit --wait` and `ladle run` use: against a scripted job, and through the app in-process."""

import threading
import time

import pytest

from api.client import Client, follow
from service.spec import parse_spec


class ScriptedJob:
    """A job that advances one step per read of it; each step may add events; `finished` on the last."""

    def __init__(self, steps: list[int], page: int = 2):
        self.steps, self.page, self.reads, self.events = steps, page, 0, []

    def read_job(self) -> dict:
        new = self.steps[min(self.reads, len(self.steps) - 1)]
        first = len(self.events) + 1
        self.events += [{"id": i, "level": "info", "message": f"e{i}"} for i in range(first, first + new)]
        self.reads += 1
        done = self.reads >= len(self.steps)
        return {"id": "j", "name": "job", "status": "succeeded" if done else "running", "finished": done,
                "progress": min(1.0, self.reads / len(self.steps)), "current_phase": None}

    def read_events(self, after: int) -> list[dict]:
        return [e for e in self.events if e["id"] > after][:self.page]


def test_follow_yields_every_event_once_and_ends_with_the_finished_job():
    job = ScriptedJob([1, 0, 5, 3])                # 5 and 3 new events: more than a page of 2
    updates = list(follow(job.read_job, job.read_events, poll=0))
    assert [u.job["status"] for u in updates] == ["running"] * 3 + ["succeeded"]
    assert [len(u.events) for u in updates] == [1, 0, 5, 3]
    assert [e["id"] for u in updates for e in u.events] == list(range(1, 10))
    assert updates[-1].job["finished"]


def test_follow_starts_after_an_event_id_and_times_out():
    job = ScriptedJob([4, 1])
    assert [e["id"] for u in follow(job.read_job, job.read_events, after=3, poll=0) for e in u.events] == [4, 5]
    forever = ScriptedJob([1] * 10_000)
    with pytest.raises(TimeoutError, match="job j still running after 0.05 s"):
        for _ in follow(forever.read_job, forever.read_events, poll=0.01, timeout=0.05):
            pass


def test_client_follow_and_wait_go_through_the_api(api):
    """Against the real app in-process (temp SQLite): a job that runs and ends while it is followed."""
    job = api.store.create_job(parse_spec({"name": "followed"}))

    def run_it():                                   # what a driver would record, step by step
        time.sleep(0.3)
        api.store.claim_queued(1)
        for i in range(5):
            api.store.event(job.id, f"step {i}")
            time.sleep(0.05)
        api.store.job_failed(job.id, "the end")
    c = Client(http=api)                            # the SDK's requests go to the in-process app
    seen = []
    worker = threading.Thread(target=run_it)
    worker.start()
    final = c.wait(job.id, progress=False, poll=0.05, on_event=seen.append)
    worker.join()
    assert final["finished"] and final["status"] == "failed" and final["error"] == "the end"
    messages = [e["message"] for e in seen]
    assert messages == [f"step {i}" for i in range(5)] + ["job failed: the end"]       # each once, in order
    assert [e["message"] for u in c.follow(job.id, poll=0) for e in u.events] == messages   # ended: one pass
