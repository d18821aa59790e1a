"""The training commands of ``corpusfactory``: train, evaluate, snapshots, eval.

``train`` and ``evaluate`` are services (``--once``: do what is waiting, then exit);
``snapshots list|show`` reads the snapshot directory; ``eval run|compare|metrics`` runs
an evaluation by hand, prints the table across snapshots, or scores a custom task file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from corpusfactory.cli.common import run_service
from corpusfactory.errors import UsageError
from corpusfactory.settings import Settings

SettingsFn = Callable[[argparse.Namespace], Settings]


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def cmd_train(args: argparse.Namespace, s: Settings) -> int:
    from corpusfactory.contract import ACCEPTED
    from corpusfactory.metrics import TrainerMetrics
    from training.service import Trainer

    metrics = TrainerMetrics()
    port = 0 if args.once else args.metrics_port  # a one-off run is never scraped
    with (
        run_service(s, "trainer", metrics, port) as svc,
        Trainer(s, svc.bootstrap, metrics) as trainer,
    ):
        if args.once:
            svc.ready()
            snap = trainer.run_once()
            print(snap.id if snap else "no new conversations: no snapshot")
            return 0
        svc.watch_lag(trainer.group_id, [s.topic(ACCEPTED)])
        svc.ready()
        trainer.run(svc.stop_event(), max_snapshots=args.max_snapshots)
    return 0


def cmd_evaluate(args: argparse.Namespace, s: Settings) -> int:
    from corpusfactory.contract import SNAPSHOTS
    from corpusfactory.metrics import EvaluatorMetrics
    from training.evaluation.service import EvaluatorService

    metrics = EvaluatorMetrics()
    port = 0 if args.once else args.metrics_port  # a one-off run is never scraped
    lag = (f"{s.kafka.topic_prefix}{s.evaluation.group_id}", [s.topic(SNAPSHOTS)])
    with (
        run_service(s, "evaluator", metrics, port, lag=lag) as svc,
        EvaluatorService(s, svc.bootstrap, metrics) as service,
    ):
        svc.ready()
        n = service.run(None if args.once else svc.stop_event(), once=args.once)
    print(f"evaluated {n} model(s)")
    return 0


def cmd_snapshots(args: argparse.Namespace, s: Settings) -> int:
    from training.snapshots import SnapshotStore

    store = SnapshotStore(s.snapshots_path)
    if args.action == "show":
        if not args.id:
            raise UsageError("snapshots show needs a snapshot ID")
        _print(store.describe(store.get(args.id)))
        return 0
    snaps = [store.describe(x) for x in store.all()]
    if args.json:
        _print(snaps)
        return 0
    if not snaps:
        print(f"no snapshots in {store.root}")
    for d in snaps:
        m = d["manifest"]
        print(
            f"{d['id']}  parent={m.get('parent') or '-'}  conversations={m.get('conversations')}"
            f"  loss={m.get('first_loss')}->{m.get('final_loss')}  eval={','.join(d['eval'])}"
        )
    return 0


def cmd_eval(args: argparse.Namespace, s: Settings) -> int:
    if args.action == "metrics":
        return _eval_metrics(args, s)
    if args.action == "compare":
        from training.evaluation.compare import compare_rows, render_table

        rows = compare_rows(s)
        if args.json:
            _print(rows)
        else:
            print(render_table(rows))
        return 0
    from training.evaluation.runner import Evaluator

    tasks = args.tasks.split(",") if args.tasks else None
    evaluator = Evaluator(s)
    # By hand, a task file in another layout is one clear line before any model loads
    # (the evaluator service records such a task as failed and goes on instead).
    evaluator.check_tasks(tasks or s.evaluation.tasks, read_files=True)
    results = {
        task: res for task, res, _ in evaluator.evaluate(args.model, tasks, force=args.force)
    }
    _print(results)
    return 0


def _eval_metrics(args: argparse.Namespace, s: Settings) -> int:
    from training.evaluation.tasks import evaluate_task_file

    encoder = None
    if args.kind == "similarity":
        from corpusfactory.engines.embedder import Embedder

        encoder = Embedder(args.embedder or s.models.embedder)
    _print(evaluate_task_file(args.file, args.kind, encoder))
    return 0


def cmd_build(args: argparse.Namespace, s: Settings) -> int:
    from corpusfactory.metrics import BuilderMetrics
    from serving.builder import Builder

    metrics = BuilderMetrics()

    def build_now(builder: Builder) -> int:
        snapshot = builder.snapshots.get(args.snapshot) if args.snapshot else None
        made = builder.build(snapshot) if snapshot else builder.build_all()
        _print([b.describe() for b in made])
        return 0

    if args.no_announce:  # no Kafka at all: build what is there, announce nothing
        return build_now(Builder(s, None, metrics))
    follow = not (args.snapshot or args.once)
    with run_service(s, "builder", metrics, args.metrics_port if follow else 0) as svc:
        builder = Builder(s, svc.bootstrap, metrics)
        if not follow:
            return build_now(builder)
        svc.ready()
        builder.follow(svc.stop_event())
    return 0


def cmd_builds(args: argparse.Namespace, s: Settings) -> int:
    from serving.builder import list_builds

    builds = list_builds(s)
    if args.json:
        _print(builds)
        return 0
    if not builds:
        print(f"no builds in {s.builds_path}")
    for b in builds:
        g = b["gate"]
        print(
            f"{b['snapshot']}  {b['quant']:<7} {b['size_bytes']:>12,d} B  "
            f"KL={g.get('kl_mean', float('nan')):.4g} top1={g.get('top1_agreement', 0):.3f} "
            f"ppl{g.get('ppl_delta_pct', 0):+.2f}%  "
            + ("published" if b["published"] else "held back")
        )
    return 0


def add_commands(
    add: Callable[[str, Callable[[argparse.Namespace], int], str], Any],
    settings: SettingsFn,
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register the commands; ``settings`` builds the Settings from parsed arguments and
    ``common`` adds the shared options (--config, --state-dir) to a parser."""
    from corpusfactory.cli.common import metrics_port_flag

    def bind(fn: Callable[[argparse.Namespace, Settings], int]) -> Callable[..., int]:
        return lambda args: fn(args, settings(args))

    p = add("train", bind(cmd_train), "Fine-tune snapshots from corpus.accepted (DeepSpeed).")
    p.add_argument("--once", action="store_true", help="train once on what is new, then exit")
    p.add_argument("--max-snapshots", type=int, help="exit after publishing this many")
    metrics_port_flag(p)

    p = add("evaluate", bind(cmd_evaluate), "Evaluate new snapshots (and the base model).")
    p.add_argument("--once", action="store_true", help="evaluate what is waiting, then exit")
    metrics_port_flag(p)

    p = add("snapshots", bind(cmd_snapshots), "List or show fine-tuning snapshots.")
    p.add_argument("action", choices=["list", "show"], help="what to do")
    p.add_argument("id", nargs="?", help="show: the snapshot id")
    p.add_argument("--json", action="store_true", help="list: manifests and evaluations as JSON")

    p = add("build", bind(cmd_build), "GGUF builds (f16 + quantized) of snapshots, gated.")
    p.add_argument("--once", action="store_true", help="build what is missing, then exit")
    p.add_argument("--snapshot", help="build this snapshot only")
    p.add_argument(
        "--no-announce", action="store_true", help="do not announce on models.builds (no Kafka)"
    )
    metrics_port_flag(p)

    p = add("builds", bind(cmd_builds), "List GGUF builds with their gate figures.")
    p.add_argument("action", choices=["list"], help="what to do")
    p.add_argument("--json", action="store_true", help="JSON list")

    p = add("eval", bind(cmd_eval), "Run an evaluation, compare models, or score a task file.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="evaluate a snapshot or the base model now")
    run.add_argument("--model", required=True, help="a snapshot id, or 'base'")
    run.add_argument("--tasks", help="comma-separated tasks (default: evaluation.tasks)")
    run.add_argument("--force", action="store_true", help="redo tasks that have results")
    cmp_ = actions.add_parser("compare", help="the table across the base model and snapshots")
    cmp_.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    met = actions.add_parser("metrics", help="generic metrics of a JSONL task file")
    met.add_argument("--kind", required=True, choices=["classification", "similarity", "tags"])
    met.add_argument("file", help="the task file, one JSON object per line")
    met.add_argument("--embedder", help="similarity: the embedder (default models.embedder)")
    for sub in (run, cmp_, met):
        common(sub)
