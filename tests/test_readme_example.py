"""The README's example, verbatim: a recorded call as a regression test, with the bridge's pytest plugin."""


def test_a_barge_in_still_cuts_the_answer_where_the_caller_stopped(bridge_replay):  # type: ignore[no-untyped-def]
    result = bridge_replay("tests/recordings/barge-in.jsonl.gz")
    assert result.passed, result.divergences
    assert result.clears == 1 and 600 <= result.truncations[0][1] <= 700
