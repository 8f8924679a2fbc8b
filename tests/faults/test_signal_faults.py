"""SIGTERM to the CLI before Ray owns the signal (issue 14, item 7): it ends the run as Ctrl-C does (the farm
closes its MLflow run KILLED), and the previous handler is restored after the run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.faults

CODE = textwrap.dedent("""
    import signal, time
    from fact_ray.cli import _terminate_as_interrupt
    before = signal.getsignal(signal.SIGTERM)
    try:
        with _terminate_as_interrupt():
            print("ready", flush=True)
            time.sleep(120)
    except KeyboardInterrupt as e:
        print("interrupted", e, flush=True)
    print("restored", signal.getsignal(signal.SIGTERM) is before, flush=True)
""")


def test_sigterm_becomes_an_interrupt_and_the_handler_is_restored():
    proc = subprocess.Popen([sys.executable, "-c", CODE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["interrupted signal 15", "restored True"]
