"""The progress display: tqdm on a terminal, plain lines in logs, the remote driver's figures."""

import io
import re

from jobs.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_output_gets_plain_lines_with_the_rate_and_eta_of_this_run():
    stream = io.StringIO()
    bar = ProgressBar(100, already_done=40, stream=stream, interval=0.0)
    bar.started -= 10.0  # this run began 10 s ago
    bar.update(done=19, failed=1)
    line = stream.getvalue().splitlines()[-1]
    assert "\r" not in stream.getvalue()
    # 20 rows settled in this run's 10 s: 2 rows/s, 40 rows left: 20 s; the 40 rows of earlier runs do not count
    assert re.search(r"60/100 \[00:10<00:20,\s+2\.00row/s, 1 failed\]", line), line
    assert abs(bar.rate() - 2.0) < 0.05


def test_a_terminal_gets_a_tqdm_bar_that_redraws_in_place():
    stream = Terminal()
    bar = ProgressBar(10, stream=stream)
    bar.update(done=3)
    bar.update(failed=1, force=True)
    bar.close()
    text = stream.getvalue()
    assert bar.interactive and "\r" in text
    assert "4/10" in text and "1 failed" in text


def test_following_a_cluster_job_shows_the_drivers_own_rate_and_eta():
    stream = io.StringIO()
    bar = ProgressBar(1000, stream=stream, interval=0.0)
    bar.show_remote(done=300, failed=2, rows_per_s=12.5, eta_s=55.8)
    assert (bar.done, bar.failed, bar.rate(), bar.eta_seconds()) == (300, 2, 12.5, 55.8)
    assert "12.50row/s" in stream.getvalue().splitlines()[-1]


def test_nothing_is_printed_when_disabled():
    stream = Terminal()
    bar = ProgressBar(10, stream=stream, enabled=False)
    bar.update(done=10, force=True)
    bar.close()
    assert stream.getvalue() == ""
