"""The ``corpusfactory ingest`` command: refine an existing chat corpus, then admit it.

    corpusfactory ingest FILE --format fauno|baize|oasst|jsonl [--dry-run] [--json]
                         [--language it] [--min-chars N] [--cut-non-target] [--in-flight N]

The refinement (method.md §4, ``producers.ingest``) runs first and its report
is printed. Messages in another language than ``--language`` are counted and kept,
as the paper did; ``--cut-non-target`` cuts each conversation before its first
exchange holding one (``--keep-non-target``, the default, is accepted too).
Without ``--dry-run`` the surviving conversations then go through the factory's
scoring and admission turn by turn (``producers.ingest.publish``), and the
accepted prefixes are published to ``corpus.accepted``; the publishing counts are
printed under ``publish``. The scorer and admitter workers must be
running on the broker (``KAFKA_BOOTSTRAP_SERVERS``, or the embedded one, which
must already be started: without workers nothing would ever be decided).

Bad input (a file that is not the given format) raises ``IngestError`` naming the
file and line before anything is sent; ``corpusfactory.cli.main.main`` exits with 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from corpusfactory.settings import Settings

SettingsFn = Callable[[argparse.Namespace], Settings]


def cmd_ingest(args: argparse.Namespace, s: Settings) -> int:
    import asyncio

    from producers.ingest import refine_file

    language, min_chars, cut = args.language, args.min_chars, args.cut_non_target
    # The whole file is refined before anything is sent: a broken line fails the
    # run with nothing half-published.
    conversations, report = refine_file(
        args.file, args.format, language=language, min_chars=min_chars, cut_non_target=cut
    )
    out: dict[str, Any] = dict(report)
    if not args.dry_run:
        from corpusfactory.engines.broker import resolve_bootstrap
        from corpusfactory.kafka_clients import ensure_topics
        from producers.ingest.publish import IngestPublisher, run_identity

        bootstrap = resolve_bootstrap(s, start_embedded=False)
        ensure_topics(s, bootstrap)
        namespace, run_id = run_identity(
            args.file, args.format, language=language, min_chars=min_chars, drop_non_target=cut
        )
        publisher = IngestPublisher(
            s, bootstrap, args.format, namespace, run_id, in_flight=args.in_flight
        )
        out["publish"] = asyncio.run(publisher.run(conversations)).as_dict()
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_plain(out)
    return 0


def _print_plain(out: dict[str, Any], indent: str = "") -> None:
    for key, value in out.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_plain(value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key}: {value:.2f}")
        else:
            print(f"{indent}{key}: {value}")


def add_commands(
    add: Callable[[str, Callable[[argparse.Namespace], int], str], Any], settings: SettingsFn
) -> None:
    from producers.ingest.formats import FORMATS

    p = add(
        "ingest",
        lambda args: cmd_ingest(args, settings(args)),
        "Refine a chat corpus (method.md §4) and send it through scoring and admission.",
    )
    p.add_argument("file", help="the corpus file (a JSON list or JSONL)")
    p.add_argument("--format", required=True, choices=FORMATS, help="how to read the file")
    p.add_argument("--dry-run", action="store_true", help="refine and report only: send nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--language", default="it", help="target language, ISO 639-1 (default it)")
    p.add_argument(
        "--min-chars",
        type=int,
        default=20,
        help="shorter messages are not language-checked (default 20)",
    )
    keep_or_cut = p.add_mutually_exclusive_group()
    keep_or_cut.add_argument(
        "--cut-non-target",
        dest="cut_non_target",
        action="store_true",
        default=False,
        help="cut each conversation before its first exchange holding a message in another "
        "language (default: count such messages and keep them, as the paper did)",
    )
    keep_or_cut.add_argument(
        "--keep-non-target",
        dest="cut_non_target",
        action="store_false",
        help="count other-language messages and keep them (the default)",
    )
    p.set_defaults(cut_non_target=False)
    p.add_argument(
        "--in-flight",
        type=int,
        default=32,
        help="conversations waiting on a decision at once (default 32)",
    )
