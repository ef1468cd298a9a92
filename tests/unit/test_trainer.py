"""cfs.trainer: the Trainer's callbacks; here SaveEveryMinutes (train.save_minutes), which
asks for a checkpoint at the first step end once the minutes have passed since the run
began or since the last checkpoint. (The Trainer itself is run in tests/unit/test_train.py
and test_objectives.py.)"""

from __future__ import annotations

from types import SimpleNamespace

from cfs import trainer


def test_a_checkpoint_once_the_minutes_have_passed(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(trainer.time, "monotonic", lambda: now[0])
    callback = trainer.SaveEveryMinutes(30)
    callback.on_train_begin(None, None, None)
    decisions = []
    for minutes in (10, 29, 31, 45, 62):
        now[0] = 1000.0 + 60 * minutes
        control = SimpleNamespace(should_save=False)
        callback.on_step_end(None, None, control)
        decisions.append(control.should_save)
        if control.should_save:
            callback.on_save(None, None, control)
    assert decisions == [False, False, True, False, True]
