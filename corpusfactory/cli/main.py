"""The ``corpusfactory`` command line.

Every subcommand takes ``--config FILE`` (a YAML profile, see ``configs/``) and
``--state-dir DIR``; environment variables override the file (see
``corpusfactory.settings``). Heavy modules are imported inside each command so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from corpusfactory.cli.common import metrics_port_flag, run_service
from corpusfactory.errors import EXIT_INTERRUPTED, CorpusFactoryError, exit_code
from corpusfactory.redact import RedactingFormatter, redact_text, secret_values, secret_values_in
from corpusfactory.settings import ENV_PREFIX, Settings, load_settings

log = logging.getLogger("corpusfactory")

EXIT_UNEXPECTED = 1  # not an error of the tree: a bug, or a failure nobody foresaw
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The secret values this process knows (the environment's, then the loaded settings'):
# every error message, log line and printed JSON is scrubbed of them.
_SECRETS: set[str] = set()


def _settings(args: argparse.Namespace, **sections: dict[str, Any]) -> Settings:
    """Settings from --config and the environment, with --state-dir and the command's
    own flags (``sections``) applied on top."""
    overrides: dict[str, Any] = dict(sections)
    if getattr(args, "state_dir", None):
        overrides["state_dir"] = args.state_dir
    settings = load_settings(args.config, overrides=overrides)
    _SECRETS.update(secret_values(settings))
    return settings


def _print_json(data: Any) -> None:
    print(redact_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), _SECRETS))


# -- broker ----------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from corpusfactory.engines.broker import EmbeddedBroker

    s = _settings(args)
    if s.kafka.bootstrap_servers:
        print(f"KAFKA_BOOTSTRAP_SERVERS is set ({s.kafka.bootstrap_servers}): nothing to manage")
        return 0
    broker = EmbeddedBroker(s.state_path, s.kafka.embedded_port, s.kafka.embedded_controller_port)
    if args.action == "start":
        print(broker.start())
    elif args.action == "stop":
        broker.stop()
        print("stopped")
    else:
        st = broker.status()
        _print_json(st)
        return 0 if st.get("running") else 3
    return 0


# -- workers and producers ---------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.app import role_metrics, run_worker, worker_lag

    s = _settings(args)
    metrics = role_metrics(s, args.role)
    lag = worker_lag(s, args.role)
    with run_service(s, args.role, metrics, args.metrics_port, start_embedded=True, lag=lag) as svc:
        run_worker(s, args.role, svc.bootstrap, metrics, loglevel=args.log_level)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    import asyncio

    from corpusfactory.engines.models.registry import resolve_model
    from corpusfactory.metrics import ProducerMetrics
    from producers.generators.factory import make_generator
    from producers.service import SelfChatProducer

    if args.conversations is not None:
        s = _settings(args, producer={"conversations": args.conversations})
    else:
        s = _settings(args)
    metrics = ProducerMetrics()
    with run_service(s, "producer", metrics, args.metrics_port, start_embedded=True) as svc:
        model = resolve_model(s.models.generator, s.models.models_dir)
        generator = make_generator(s.producer, model, s.models.device)
        try:
            stats = asyncio.run(SelfChatProducer(s, svc.bootstrap, generator, metrics).run())
        finally:
            generator.close()
    _print_json(stats.as_dict())
    return 0


# -- scoring -----------------------------------------------------------------------


def cmd_score(args: argparse.Namespace) -> int:
    from corpusfactory.engines.scoring.nll import MLMScorer

    if args.text is not None:
        lines = [args.text]
    else:
        from corpusfactory.errors import InputFileError

        try:
            with open(args.file, encoding="utf-8") as fh:
                lines = [line.rstrip("\n") for line in fh]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputFileError(f"{args.file}: cannot read the texts to score: {exc}") from exc
    s = _settings(args)
    scorer = MLMScorer.from_settings(s, model=args.model)
    results = scorer.score(lines)
    out = [
        {"text": t, "nll": None if r.too_long or r.tokens == 0 else r.nll, "tokens": r.tokens}
        | ({"too_long": True} if r.too_long else {})
        for t, r in zip(lines, results, strict=True)
    ]
    if args.json:
        _print_json(out)
    else:
        for row in out:
            nll = "-" if row["nll"] is None else f"{row['nll']:.4f}"
            print(f"{nll}\t{row['tokens']}\t{row['text']}")
    return 0


# -- corpus and index --------------------------------------------------------------


def cmd_corpus(args: argparse.Namespace) -> int:
    from consumers.store import CorpusStore
    from consumers.writer import CorpusWriter
    from corpusfactory.engines.broker import resolve_bootstrap

    s = _settings(args)
    if args.action == "write":
        from consumers.writer import default_group_id
        from corpusfactory.contract import ACCEPTED, DECISIONS
        from corpusfactory.metrics import WriterMetrics

        metrics = WriterMetrics()
        lag = (default_group_id(s), [s.topic(ACCEPTED), s.topic(DECISIONS)])
        with (
            run_service(s, "writer", metrics, args.metrics_port, lag=lag) as svc,
            CorpusWriter(s, svc.bootstrap, metrics=metrics) as writer,
        ):
            writer.run()
        return 0
    if args.action == "sync" or args.sync:
        with CorpusWriter(s, resolve_bootstrap(s, start_embedded=False)) as writer:
            report = writer.run_once(args.timeout)
        if args.action == "sync":
            _print_json(report.__dict__)
            return 0
    store = CorpusStore(s.state_path / "corpus", read_only=True)
    if args.action == "stats":
        _print_json(store.stats())
    else:
        n = store.export(args.out, include_truncated=not args.no_truncated)
        print(f"exported {n} conversations to {args.out}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from corpusfactory.engines.embedder import Embedder
    from corpusfactory.engines.index import VectorIndex

    s = _settings(args, producer={"seed_file": args.file}) if args.file else _settings(args)
    if args.action == "seed":
        from streams.admit import seed_index

        index = seed_index(s)
    else:
        index = VectorIndex.from_settings(s, Embedder(s.models.embedder).dim)
    try:
        _print_json(index.stats())
    finally:
        index.close()
    return 0


# -- models, demo, bench -----------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from corpusfactory.engines.models.demo import build_demo_models
    from corpusfactory.engines.models.registry import build_all

    s = _settings(args)
    if args.force:
        build_demo_models(s.models.models_dir, force=True)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    built = build_all(
        s.models.models_dir, progress=progress, gemma=not args.toy_only, italian=not args.toy_only
    )
    _print_json(built)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from corpusfactory.tools.demo import run_demo

    s = _settings(args)
    conversations = args.conversations or s.producer.conversations or 24
    return run_demo(s, conversations, args.keep_running, train=not args.no_training)


def cmd_bench(args: argparse.Namespace) -> int:
    from corpusfactory.tools.bench import run_bench

    return run_bench(args)


# -- parser ------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML settings profile (also CORPUSFACTORY_CONFIG)")
    p.add_argument("--state-dir", help="state directory (default .state, or the profile's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corpusfactory",
        description="A streaming factory for language-specific chat corpora.",
    )
    parser.add_argument("--log-level", default=os.environ.get("CORPUSFACTORY_LOG", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        p.set_defaults(fn=fn)
        return p

    p = add("broker", cmd_broker, "Start, stop or inspect the embedded Kafka broker (KRaft).")
    p.add_argument("action", choices=["start", "stop", "status"], help="what to do")

    p = add("worker", cmd_worker, "Run a Faust stream worker.")
    p.add_argument(
        "--role",
        choices=["scorer", "admitter"],
        required=True,
        help="scorer: embed and NLL-score candidates (scale out); "
        "admitter: the single writer of the vector index",
    )
    metrics_port_flag(p)

    p = add("produce", cmd_produce, "Run a self-chat producer.")
    p.add_argument(
        "--conversations",
        type=int,
        help="stop once this producer (producer.producer_id) has closed this many "
        "conversations, counted across restarts (0 = forever)",
    )
    metrics_port_flag(p)

    p = add("score", cmd_score, "Masked-LM NLL of texts (method.md §3).")
    p.add_argument("--model", help="scorer model path or id (default: models.scorer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text to score")
    src.add_argument("--file", help="a file with one text per line")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = add("corpus", cmd_corpus, "The accepted corpus: write, sync, stats, export.")
    p.add_argument(
        "action",
        choices=["stats", "export", "sync", "write"],
        help="stats/export: read the stored shards; sync: drain the topics once; "
        "write: run the corpus writer until stopped",
    )
    p.add_argument("--out", help="export: output JSONL file")
    p.add_argument("--sync", action="store_true", help="drain the topics before stats/export")
    p.add_argument("--no-truncated", action="store_true", help="export: leave truncated ones out")
    p.add_argument("--timeout", type=float, default=10.0, help="sync: idle seconds before stop")
    metrics_port_flag(p)

    p = add("index", cmd_index, "The vector index: stats, or load seed messages.")
    p.add_argument("action", choices=["stats", "seed"], help="what to do")
    p.add_argument("file", nargs="?", help="seed: a seed file (JSONL or OASST); default built-in")

    p = add("models", cmd_models, "Build the demo models (tiny Llama generator, tiny BERT).")
    p.add_argument("action", choices=["build-demo"], help="what to do")
    p.add_argument("--force", action="store_true", help="rebuild the toy models even if cached")
    p.add_argument(
        "--toy-only", action="store_true", help="only the tiny test models, not Gemma/Italian"
    )

    p = add("demo", cmd_demo, "Run the whole factory on the embedded stack and summarise.")
    p.add_argument(
        "--conversations",
        type=int,
        default=None,
        help="conversations to generate (default: the profile's producer.conversations, "
        "or 24 when that is 0)",
    )
    p.add_argument("--keep-running", action="store_true", help="leave the broker running")
    p.add_argument("--no-training", action="store_true", help="skip the snapshot and evaluation")

    from corpusfactory.cli.training import add_commands

    add_commands(add, _settings, _common)
    from corpusfactory.cli.ingest import add_commands as add_ingest
    from corpusfactory.cli.report import add_commands as add_report
    from corpusfactory.cli.serving import add_commands as add_serving

    add_serving(add, _settings)
    add_ingest(add, _settings)
    add_report(add, _settings)

    p = add("bench", cmd_bench, "Benchmarks; results as JSON.")
    p.add_argument(
        "what",
        choices=["pipeline", "scorer", "serve", "train", "generators"],
        help="which benchmark",
    )
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--conversations", type=int, default=12, help="pipeline: conversations")
    p.add_argument("--messages", type=int, default=256, help="scorer: messages to score")
    p.add_argument(
        "--size",
        choices=["settings", "base"],
        default="settings",
        help="scorer: the settings' model, or a random BERT-base (timing only)",
    )
    p.add_argument(
        "--precisions", default="float32,bfloat16,int8", help="scorer: precisions, comma-separated"
    )
    p.add_argument(
        "--reference", type=int, default=16, help="scorer: messages for the plain float32 ways"
    )
    p.add_argument(
        "--texts", help="scorer: a `corpus export` file whose turns are decided (default: seeds)"
    )
    p.add_argument(
        "--seed-messages",
        type=int,
        default=0,
        help="scorer: seed messages the thresholds are computed from (default 0: all)",
    )
    p.add_argument("--steps", type=int, default=20, help="train: optimizer steps")
    p.add_argument("--seq-len", type=int, help="train: sequence length (default: settings)")
    p.add_argument("--micro-batch", type=int, help="train: micro-batch size (default: settings)")
    p.add_argument(
        "--model",
        default="demo:generator",
        help="serve: the Hugging Face model directory (default: the demo generator)",
    )
    p.add_argument(
        "--gguf",
        help="serve: measure this GGUF file as it is (a .gguf path, or a model name such as "
        "gemma3-270m resolved as a GGUF): no conversion, quantization or transformers baseline",
    )
    p.add_argument(
        "--quants", default="F16,Q8_0,Q4_K_M", help="serve: GGUF builds, comma-separated"
    )
    p.add_argument("--prompt-tokens", type=int, default=256, help="serve: prompt length")
    p.add_argument("--decode-tokens", type=int, default=128, help="serve: tokens decoded")
    p.add_argument("--repeats", type=int, default=3, help="serve: runs of each, best kept")
    p.add_argument(
        "--decode-batches",
        default="1,4,8",
        help="serve: batched decode, sequences decoded together, comma-separated (empty: none)",
    )
    p.add_argument(
        "--backends",
        default="llamacpp,transformers-float32,transformers-bfloat16",
        help="generators: backends, comma-separated",
    )
    p.add_argument("--batches", default="1,8", help="generators: batch sizes, comma-separated")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="generators, pipeline: turns per conversation (pipeline: in the stages-alone run)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="generators: llama.cpp and torch threads; serve: llama.cpp threads, and those of "
        "the bandwidth measurement (default: cores)",
    )
    return parser


def _log_setup(level: str) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in root.handlers:
        if handler not in before:  # ours; a host's handlers (pytest's) are left alone
            handler.setFormatter(RedactingFormatter(LOG_FORMAT, _SECRETS))
    # The Kafka clients log every metadata refresh at INFO; keep our own INFO readable.
    for noisy in ("kafka", "aiokafka", "faust", "mode", "httpx", "pymilvus", "milvus_lite"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _environment_secrets() -> set[str]:
    """Secrets set in the environment (CORPUSFACTORY_*__SASL_PASSWORD, MILVUS_URI, ...),
    known before the settings load: a command may fail before that."""
    env = {
        key.lower(): value
        for key, value in os.environ.items()
        if key.startswith(ENV_PREFIX) or key in ("MILVUS_URI", "KAFKA_BOOTSTRAP_SERVERS")
    }
    return secret_values_in(env)


def report_error(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` for the command line (scrubbed of secrets) and return its exit code.

    An error of the tree is its message (one line for a bad file, setting or argument);
    anything else is one line with its type and a hint, the traceback only at DEBUG."""
    if debug:
        trace = "".join(traceback.format_exception(exc))
        print(redact_text(trace, _SECRETS), file=sys.stderr, end="")
    if isinstance(exc, CorpusFactoryError):
        print(f"corpusfactory: error: {redact_text(str(exc), _SECRETS)}", file=sys.stderr)
        return exit_code(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    hint = "" if debug else "; run with --log-level DEBUG for the traceback"
    print(f"corpusfactory: unexpected error: {redact_text(what, _SECRETS)}{hint}", file=sys.stderr)
    return EXIT_UNEXPECTED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "corpus" and args.action == "export" and not args.out:
        parser.error("corpus export needs --out FILE")
    _SECRETS.update(_environment_secrets())
    try:
        _log_setup(args.log_level)
    except ValueError:  # an unknown level name
        parser.error(f"--log-level {args.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars
    # OpenMP threads sleep when idle instead of spinning: processes that mix torch and
    # llama.cpp (gate, builder, server) or share the cores with workers otherwise burn
    # them waiting (measured: a 2-thread torch step 0.27 s -> 0.03 s under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        return report_error(exc, debug=args.log_level.upper() == "DEBUG")


if __name__ == "__main__":
    raise SystemExit(main())
