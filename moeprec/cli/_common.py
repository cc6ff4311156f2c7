"""What the CLI commands share: --device parsing, table printing and the error metric."""

from __future__ import annotations

import torch


def parse_device(name: str) -> torch.device:
    """--device: cpu, cuda, cuda:N or auto (GPU when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected cpu or auto on this machine (no CUDA), got {name!r}")
    return device


def format_table(header: list[str], rows: list[list[str]], *, markdown: bool = True) -> str:
    """Columns padded to their widest cell: a markdown table (left-aligned), or plain
    right-aligned columns under a dashed rule."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    if not markdown:
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows])


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error, max abs error and 1 - 2*sum(xy)/sum(x^2+y^2), in fp64."""
    x, y = out.double().flatten(), ref.double().flatten()
    diff = x - y
    ref_norm = y.norm().item()
    denom = (x * x + y * y).sum().item()
    return {
        "rel_l2": diff.norm().item() / ref_norm if ref_norm else float(diff.norm().item() > 0),
        "max_abs": diff.abs().max().item() if diff.numel() else 0.0,
        "cos_diff": 1 - 2 * (x * y).sum().item() / denom if denom else 0.0,
        "nan": bool(torch.isnan(x).any()),
    }
