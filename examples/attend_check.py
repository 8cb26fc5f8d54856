"""Checks examples/attend.rs from outside, with NumPy as the oracle. Not run by CI.

Writes random inputs with np.save, runs the `attend` example on them, loads its outputs with
np.load and compares them with a plain NumPy implementation of causal attention with a per-query
temperature and a value gate (and kv_len, GQA, LSE), and of its gradients (dQ, dK, dV, dtau,
dgate), written here from DESIGN.md section 1 and independent of the crate's own f64 reference. Then feeds it a few broken inputs and checks the
exit status and the one-line error.

    pip install numpy
    cargo build --release --example attend
    python3 examples/attend_check.py                       # looks in target/release/examples
    python3 examples/attend_check.py path/to/attend        # or give the binary

Exits 1 if any comparison or error case fails.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np


def find_binary():
    if len(sys.argv) > 1:
        return sys.argv[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    return os.path.join(target, "release", "examples", "attend")


def attention(q, k, v, tau, gate, kv_len, scale):
    """Causal attention, start = Nk - Nq: O [B,Hq,Nq,D] and LSE [B,Hq,Nq], in float64."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    kh = np.repeat(k.astype(np.float64), group, axis=1)  # query head h reads KV head h // group
    vh = np.repeat((v * gate[..., None]).astype(np.float64), group, axis=1)
    s = scale * np.einsum("bhid,bhjd->bhij", q.astype(np.float64), kh)
    s = s * tau.astype(np.float64)[..., None]
    pos = (nk - nq) + np.arange(nq)
    allowed = np.arange(nk)[None, :] <= pos[:, None]  # [Nq, Nk]
    allowed = allowed[None, None] & (np.arange(nk)[None, None, None, :] < kv_len[:, None, None, None])
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # rows with no allowed key: zeros and LSE = -inf
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, e / total, 0.0)
        lse = (np.log(total) + m)[..., 0]
    return np.einsum("bhij,bhjd->bhid", p, vh), lse


def attention_backward(q, k, v, tau, gate, kv_len, scale, d_o):
    """Gradients of sum(dO * O) for the call of `attention`: dQ, dK, dV, dtau, dgate (float64)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    q64, d_o = q.astype(np.float64), d_o.astype(np.float64)
    kh = np.repeat(k.astype(np.float64), group, axis=1)
    vg = v.astype(np.float64) * gate.astype(np.float64)[..., None]
    vh = np.repeat(vg, group, axis=1)
    raw = scale * np.einsum("bhid,bhjd->bhij", q64, kh)
    t = tau.astype(np.float64)[..., None]
    pos = (nk - nq) + np.arange(nq)
    allowed = np.arange(nk)[None, :] <= pos[:, None]
    allowed = allowed[None, None] & (np.arange(nk)[None, None, None, :] < kv_len[:, None, None, None])
    s = np.where(allowed, raw * t, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, e / total, 0.0)
    o = np.einsum("bhij,bhjd->bhid", p, vh)
    dp = np.einsum("bhid,bhjd->bhij", d_o, vh)
    ds = p * (dp - (d_o * o).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhij,bhjd->bhid", ds * t, kh)
    per_kv = lambda x: x.reshape((b, hkv, group) + x.shape[2:]).sum(axis=2)
    dk = per_kv(scale * np.einsum("bhij,bhid->bhjd", ds * t, q64))
    dvg = per_kv(np.einsum("bhij,bhid->bhjd", p, d_o))
    dtau = (ds * np.where(allowed, raw, 0.0)).sum(axis=-1)
    dv = dvg * gate.astype(np.float64)[..., None]
    dgate = (dvg * v.astype(np.float64)).sum(axis=-1)
    return dict(dq=dq, dk=dk, dv=dv, dtau=dtau, dgate=dgate)


def rel(got, want):
    fin = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), fin) or not np.array_equal(got[~fin], want[~fin]):
        return float("inf")
    diff = got[fin].astype(np.float64) - want[fin]
    return float(np.linalg.norm(diff) / np.linalg.norm(want[fin]))


def main():
    exe = find_binary()
    if not os.path.exists(exe):
        sys.exit(f"{exe} not found: run `cargo build --release --example attend` first")
    rng = np.random.default_rng(7)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        f = lambda name: os.path.join(tmp, name)
        # Nq < Nk, sizes not multiples of any tile, GQA (Hq = 4 Hkv), a short kv_len.
        B, Hq, Hkv, Nq, Nk, D = 2, 4, 1, 37, 53, 32
        q = rng.standard_normal((B, Hq, Nq, D), dtype=np.float32)
        k = rng.standard_normal((B, Hkv, Nk, D), dtype=np.float32)
        v = rng.standard_normal((B, Hkv, Nk, D), dtype=np.float32)
        tau = rng.uniform(0.5, 1.5, (B, Hq, Nq)).astype(np.float32)
        gate = rng.uniform(0.05, 1.0, (B, Hkv, Nk)).astype(np.float32)
        kv_len = np.array([Nk, 10], dtype=np.int64)  # np.save's default int type
        for name, a in dict(q=q, k=k, v=v, tau=tau, gate=gate, kv_len=kv_len).items():
            np.save(f(name + ".npy"), a)
        cmd = [exe, "--q", f("q.npy"), "--k", f("k.npy"), "--v", f("v.npy"),
               "--tau", f("tau.npy"), "--gate", f("gate.npy"), "--kv-len", f("kv_len.npy"),
               "--causal", "--out", f("o.npy"), "--lse", f("lse.npy")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            sys.exit(f"attend exited {r.returncode}")
        o, lse = np.load(f("o.npy")), np.load(f("lse.npy"))
        want_o, want_lse = attention(q, k, v, tau, gate, kv_len, 1 / np.sqrt(D))
        for what, got, want in [("O", o, want_o), ("LSE", lse, want_lse)]:
            e = rel(got, want)
            ok = got.dtype == np.float32 and got.shape == want.shape and e < 1e-5
            print(f"numpy check {what} {got.shape} {got.dtype}: norm-wise relative error {e:.3e}: "
                  + ("ok" if ok else "FAILED"))
            if not ok:
                failures.append(what)

        # The backward pass: dO in, every gradient of this call out.
        d_o = rng.standard_normal((B, Hq, Nq, D), dtype=np.float32)
        np.save(f("do.npy"), d_o)
        grads = ["dq", "dk", "dv", "dtau", "dgate"]
        gcmd = cmd[:-4] + ["--out", f("o2.npy"), "--grad-o", f("do.npy")]
        for g in grads:
            gcmd += ["--" + g, f(g + ".npy")]
        r = subprocess.run(gcmd, capture_output=True, text=True)
        sys.stderr.write(r.stderr)
        if r.returncode != 0:
            sys.exit(f"attend (backward) exited {r.returncode}")
        want_g = attention_backward(q, k, v, tau, gate, kv_len, 1 / np.sqrt(D), d_o)
        for g in grads:
            got = np.load(f(g + ".npy"))
            e = rel(got, want_g[g])
            ok = got.dtype == np.float32 and got.shape == want_g[g].shape and e < 1e-5
            print(f"numpy check {g} {got.shape} {got.dtype}: norm-wise relative error {e:.3e}: "
                  + ("ok" if ok else "FAILED"))
            if not ok:
                failures.append(g)

        # Broken inputs: exit status 1 and one line naming the file.
        base = [exe, "--q", f("q.npy"), "--k", f("k.npy"), "--v", f("v.npy"), "--out", f("x.npy")]
        np.save(f("q64.npy"), q.astype(np.float64))
        np.save(f("kD.npy"), k[..., :16].copy())
        with open(f("junk.npy"), "wb") as h:
            h.write(b"not a numpy file at all")
        cases = [
            ("float64 q", [exe, "--q", f("q64.npy")] + base[3:], 1, "q64.npy"),
            ("garbage v", base[:5] + ["--v", f("junk.npy"), "--out", f("x.npy")], 1, "junk.npy"),
            ("k with wrong D", base[:3] + ["--k", f("kD.npy")] + base[5:], 1, "kD.npy"),
            ("selective without causal", base + ["--selective", "0"], 1, "--selective"),
            ("missing --q", [exe] + base[3:], 2, "--q"),
            ("--dq without --grad-o", base + ["--dq", f("dq2.npy")], 2, "--grad-o"),
        ]
        for what, c, code, needle in cases:
            r = subprocess.run(c, capture_output=True, text=True)
            lines = r.stderr.strip().splitlines()
            ok = r.returncode == code and len(lines) == 1 and needle in lines[0]
            print(f"error case {what}: exit {r.returncode}, {lines[-1] if lines else ''!r}: "
                  + ("ok" if ok else "FAILED"))
            if not ok:
                failures.append(what)
    if failures:
        sys.exit("FAILED: " + ", ".join(failures))
    print("all ok")


if __name__ == "__main__":
    main()
