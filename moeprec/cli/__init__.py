"""The `moeprec` console script. Each subcommand lives in its own module, imported on use."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args).
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moeprec.cli.demo", "router precision and the MoE layer end to end (CPU by default)"),
    "report": ("moeprec.cli.report", "precision audit of a model shape: act dtype and errors"),
    "bench": ("moeprec.cli.bench", "GPU timings vs the roofline and peers (table, JSON, plot)"),
    "tune": ("moeprec.cli.tune", "tune Triton launch configurations for this GPU"),
    "train-demo": ("moeprec.cli.train_demo", "train a small MoE LM with bf16 vs fp32 routers"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeprec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module of the command being run (bench imports Triton, report may not).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # python -m moeprec.cli
    sys.exit(main())
