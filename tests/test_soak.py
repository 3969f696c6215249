"""The short soak (tests/soak.py; run that file for the long random one): a 2-process FSDP2 GRPO job through the
CLI, interrupted three times -- SIGTERM to the launcher and both workers (then a flipped byte in the checkpoint
that preemption wrote), SIGKILL to one worker, SIGKILL to the launcher alone -- and rerun each time, ends with the weights
and AdamW state of an uninterrupted run, bit for bit; the corruption is detected and named; no SIGTERM loses a
finished step."""
import pytest

import soak


@pytest.mark.slow
def test_interrupted_job_ends_as_the_uninterrupted_one(tmp_path):
    steps = 6
    job = soak.build_job(tmp_path / "parts", steps)
    # (action, steps the launch logs first, then that fraction of a step, corrupt the newest checkpoint after)
    schedule = [("sigterm-all", 3, 0.3, True),  # preempted after the 4th step (or a later one): then a flipped byte
                ("sigkill-rank", 1, 0.5, False),  # resumed from the older checkpoint (2); killed a step later
                ("sigkill-launcher", 1, 0.3, False)]  # torchrun killed: its workers stop with a checkpoint
    report = soak.run_soak(job, tmp_path, steps, schedule, seed=0, say=lambda *_: None)
    log = (tmp_path / "soak.log").read_text()
    first, second, third = report.interruptions
    assert all(i.sent for i in report.interruptions), report
    assert first.preempted and first.steps_lost == 0 and first.resumed_from >= 4, first
    assert first.corrupted and first.corruption_detected, (first, log[-3000:])
    assert "preempted by SIGTERM after step" in log and "did not verify, resuming from" in log
    assert 0 <= second.steps_lost <= soak.CHECKPOINT_EVERY, second
    assert third.preempted and third.steps_lost == 0 and third.last_logged < steps, third
    assert report.same_as_uninterrupted, report.summary()
