"""HeldLogs at a logger (how load_backbone holds transformers' reports): the held records
reach the handlers up the logger tree only when released, in order, and a `with` block that
ends by an error leaves no filter behind. tests/test_harness.py holds at handlers (lm-eval)."""

import logging

import pytest

from dlm.held_logs import HeldLogs


@pytest.fixture
def seen():
    messages, catch = [], logging.Handler()
    catch.emit = lambda record: messages.append(record.getMessage())
    parent = logging.getLogger("held_test")
    parent.addHandler(catch)
    parent.setLevel(logging.INFO)
    yield messages
    parent.removeHandler(catch)


def test_held_records_print_in_order_on_release(seen):
    child = logging.getLogger("held_test.loading")
    with HeldLogs(child) as held:
        child.info("key table")
        child.warning("ids outside the vocabulary")
        assert seen == [] and held.records[0].getMessage() == "key table"
        held.release()
        assert seen == ["key table", "ids outside the vocabulary"]
        child.info("after")  # released: no longer held
    assert seen[-1] == "after" and child.filters == []


def test_an_error_drops_what_was_held(seen):
    child = logging.getLogger("held_test.loading")
    with pytest.raises(ValueError), HeldLogs(child):
        child.info("key table")
        raise ValueError("one line instead")
    child.info("later")
    assert seen == ["later"] and child.filters == []
