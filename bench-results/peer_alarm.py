# Runs torch_peer.py unchanged, with a time limit per stretch of `limit` seconds: the timer raises
# inside whatever attempt is running (caught by the script's own `except Exception`, recorded as
# FAILED with this message), then re-arms, so a slow torch.compile cannot eat the whole call.
import runpy, signal, sys
limit = int(sys.argv[1])
sys.argv = [".devrun-backward/torch_peer.py"] + sys.argv[2:]
def boom(*_):
    signal.alarm(limit)
    raise RuntimeError(f"over the {limit} s limit of this run")
signal.signal(signal.SIGALRM, boom)
signal.alarm(limit)
runpy.run_path(sys.argv[0], run_name="__main__")
