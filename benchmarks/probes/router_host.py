"""Probe: host (launch) cost per piece of the router fast path, and graphed GPU time."""
import time, torch, triton.testing as tt
import torch.nn.functional as F
import moeprec.routing.gate as gate

def host_us(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): f()
    t1 = time.perf_counter(); torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6

def graphed_us(f):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): f()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        f()
    return tt.do_bench(lambda: gr.replay(), warmup=25, rep=100, return_mode="median") * 1e3

T, D, E = 16384, 2048, 128
xd = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
wd = (torch.randn(E, D, device="cuda") * 0.02).bfloat16()
g = torch.randn(T, E, device="cuda"); gb = g.bfloat16()
x = xd.clone().requires_grad_(); w = wd.clone().requires_grad_()
small = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
r = {}
r["F.linear small"] = host_us(lambda: F.linear(small, small))
r["mm out_dtype small"] = host_us(lambda: torch.mm(small, small, out_dtype=torch.float32))
r["mm small"] = host_us(lambda: torch.mm(small, small))
r["autocast(enabled=False) enter/exit"] = host_us(lambda: torch.autocast("cuda", enabled=False).__enter__() and None)
def ac():
    with torch.autocast("cuda", enabled=False):
        pass
r["with autocast off"] = host_us(ac)
r["_check_gate_args"] = host_us(lambda: gate._check_gate_args(x, w, None))
r["split2"] = host_us(lambda: gate._split_to_bf16(g, 2))
r["fwd ours"] = host_us(lambda: gate.router_gating_linear(x, w, "fp32"))
r["fwd bf16"] = host_us(lambda: F.linear(x, w))
def full(splits):
    def f():
        gate.BACKWARD_GRAD_SPLITS = splits
        gate.router_gating_linear(x, w, "fp32").backward(g)
    return f
def bf16full():
    F.linear(x, w).backward(gb)
def upcast():
    F.linear(x.float(), w.float()).backward(g)
for name, f in [("bf16", bf16full), ("ours s1", full(1)), ("ours s2", full(2)), ("ours s3", full(3)), ("upcast", upcast)]:
    x.grad = torch.zeros_like(x); w.grad = torch.zeros_like(w)
    r[f"host fwd+bwd {name}"] = host_us(f, 50)
    r[f"graphed fwd+bwd {name}"] = graphed_us(f)
    r[f"eager do_bench {name}"] = tt.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3
for k, v in r.items():
    print(f"  {k:40s} {v:8.1f} us")
