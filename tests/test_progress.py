"""The progress rate: counted from the first unit done, no time left before there is a rate."""

import logging

from pipeline.progress import Progress, Rate


def test_no_rate_and_no_time_left_until_two_units_are_done():
    rate = Rate(45)
    assert (rate.per_second, rate.seconds_left, rate.describe("candidates")) == (None, None, "rate not known yet")
    rate.advance(1, now=61.0)  # the first unit took the setup's minute: it says nothing about the others
    assert (rate.per_second, rate.seconds_left) == (None, None)


def test_the_rate_runs_from_the_first_unit_done_not_from_the_start():
    rate = Rate(45)
    rate.advance(1, now=61.0)
    rate.advance(4, now=63.0)  # 4 units in the 2 s since the first
    assert (rate.per_second, rate.seconds_left) == (2.0, 20.0)
    assert rate.describe("candidates") == "2.0 candidates/s, ETA 20 s"


def test_the_log_line_says_the_rate_is_not_known_after_the_first_unit(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.progress"), Progress(2, "sweep", unit="fits",
                                                                             every_s=0) as progress:
        progress.advance(1)
    assert caplog.messages == ["sweep: 1/2 fits, rate not known yet"]
