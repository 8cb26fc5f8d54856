# Device-to-device copy bandwidth on the benchmark machine (run beside examples/bench).
import torch
from triton.testing import do_bench
x = torch.empty(2**30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
ms = do_bench(lambda: y.copy_(x), warmup=20, rep=200, return_mode="median")
print(f"device-to-device copy 1 GiB: {ms:.3f} ms, {2 * 2**30 / ms / 1e6:.0f} GB/s (read + write)")
