# Runs torch_peer.py unchanged, with a time limit of `limit` seconds on each measurement: Triton's
# do_bench is wrapped before the script imports it, so the alarm is armed only while one attempt
# is measured (compile included) and disarmed in `finally`, never during the script's own
# exception handling (peer_alarm.py re-armed it there, and a slow unwind after a timed-out flex
# compile crashed the script on 2026-11-29, second session). A timed-out attempt is recorded by
# the script's own `except Exception` as FAILED with this message.
import runpy, signal, sys
import triton.testing
limit = int(sys.argv[1])
sys.argv = [".devrun-lead/torch_peer.py"] + sys.argv[2:]
orig = triton.testing.do_bench
def boom(*_):
    raise RuntimeError(f"over the {limit} s limit of this run")
def bench(*a, **k):
    signal.alarm(limit)
    try:
        return orig(*a, **k)
    finally:
        signal.alarm(0)
signal.signal(signal.SIGALRM, boom)
triton.testing.do_bench = bench
runpy.run_path(sys.argv[0], run_name="__main__")
