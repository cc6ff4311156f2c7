"""Probe: time each piece of the router fast path on CUDA (which GEMM layout is slow?)."""
import torch, triton.testing as tt
import moeprec.routing.gate as gate

def ms(f):
    return tt.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3

for T, D, E in [(16384, 2048, 128), (16384, 7168, 256)]:
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(E, D, device="cuda") * 0.02).bfloat16().requires_grad_()
    g = torch.randn(T, E, device="cuda")
    gb = g.bfloat16()
    gs = gate._split_to_bf16(g, 2)
    ws = torch.cat([w.detach()] * 2)
    xd, wd = x.detach(), w.detach()
    r = {}
    r["fwd bf16 F.linear"] = ms(lambda: torch.nn.functional.linear(xd, wd))
    r["fwd mm out_dtype x@w.t()"] = ms(lambda: torch.mm(xd, wd.t(), out_dtype=torch.float32))
    r["fwd mm out_dtype (w@x.t()).t()"] = ms(lambda: torch.mm(wd, xd.t(), out_dtype=torch.float32))
    r["fwd fp32 upcast"] = ms(lambda: torch.nn.functional.linear(xd.float(), wd.float()))
    r["split2"] = ms(lambda: gate._split_to_bf16(g, 2))
    r["gx bf16 mm(gb, w)"] = ms(lambda: torch.mm(gb, wd))
    r["gx bf16 mm(gs2, ws)"] = ms(lambda: torch.mm(gs, ws))
    r["gw out_dtype mm(gs.t(), x)"] = ms(lambda: torch.mm(gs.t(), xd, out_dtype=torch.float32))
    r["gw out_dtype mm(gs.t().contig, x)"] = ms(lambda: torch.mm(gs.t().contiguous(), xd, out_dtype=torch.float32))
    r["gw bf16 mm(gb.t(), x)"] = ms(lambda: torch.mm(gb.t(), xd))
    r["gw fp32 mm(g.t(), x.float())"] = ms(lambda: torch.mm(g.t(), xd.float()))
    r["gw out_dtype (x.t()@gs).t()"] = ms(lambda: torch.mm(xd.t(), gs, out_dtype=torch.float32))
    def full(splits):
        def f():
            x.grad = w.grad = None
            gate.BACKWARD_GRAD_SPLITS = splits
            gate.router_gating_linear(x, w, "fp32").backward(g)
        return f
    def bf16full():
        x.grad = w.grad = None
        torch.nn.functional.linear(x, w).backward(gb)
    r["full bf16 fwd+bwd"] = ms(bf16full)
    r["full ours s1"] = ms(full(1))
    r["full ours s2"] = ms(full(2))
    # host overhead: wall time of one call without sync
    import time
    f = full(2); torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(50): f()
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    r["host us/call (launch only)"] = (t1 - t0) / 50 * 1e6
    print(f"T={T} D={D} E={E}")
    for k, v in r.items():
        print(f"  {k:40s} {v:8.1f} us")
