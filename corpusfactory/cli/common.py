"""Argument helpers shared by the command modules of :mod:`corpusfactory.cli`."""

from __future__ import annotations

import argparse


def metrics_port_flag(p: argparse.ArgumentParser) -> None:
    """``--metrics-port`` of a long-running command (docs/metrics.md)."""
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics on this port while running (default: metrics.ports.<component>; "
        "0 = off)",
    )
