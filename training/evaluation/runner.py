"""Evaluate one model (a snapshot or the base model) on the configured tasks.

Tasks (``evaluation.tasks``):

* ``squad_it``: k-shot extractive QA, F1 and EM (``squad_it.py``);
* ``ami2020``, ``ironita2018``, ``sentipolc2014``: 5-shot rank classification, macro F1
  and accuracy (``evalita.py``), on files the user supplies (read by ``evalita_files.py``);
* ``heldout``: perplexity on the snapshot's held-out accepted conversations (never
  trained on by it or its ancestors), beside the base model's perplexity on the very
  same conversations so the two are comparable (the held-out set grows over time);
* ``generation_nll``: the model answers the first user turn of ``generation_prompts``
  seed conversations, sampled with the producers' settings, and the scorer's MLM-NLL
  of each answer is reported as a distribution (mean, quantiles, share under the
  admission threshold), the per-model version of the paper's figure 4.

Every task writes ``<eval_dir>/<task>.json`` (atomically, after its per-item predictions
file), so every number can be recomputed, and an evaluation interrupted half-way resumes
at the first task without a result. With ``on_error`` a task that fails is handed to it
and the next task runs; the evaluator service records such a task in
``<eval_dir>/<task>.failure`` (``corpusfactory.failures``) and skips it from then on, until
it is asked for by name (``eval run``), which clears the record once the task succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from corpusfactory.atomicio import write_json_atomic, write_jsonl_atomic
from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.engines.models.registry import resolve_model
from corpusfactory.errors import UsageError, is_transient
from corpusfactory.failures import FailureRecords
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import Settings
from training.data import TrainingConversation, read_jsonl
from training.evaluation.lm import CausalLM
from training.snapshots import BASE_ID, HELDOUT, SnapshotStore

log = logging.getLogger(__name__)

TASKS = ("squad_it", "ami2020", "ironita2018", "sentipolc2014", "heldout", "generation_nll")
EVALITA_TASKS = ("ami2020", "ironita2018", "sentipolc2014")

# Called with (task, error) when a task fails and the evaluation should go on.
OnError = Callable[[str, Exception], None]


class Evaluator:
    """Runs the configured tasks for one model id and stores the results."""

    def __init__(self, settings: Settings, store: SnapshotStore | None = None) -> None:
        self.s = settings
        self.e = settings.evaluation
        self.store = store or SnapshotStore(settings.snapshots_path)
        self.fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)
        self._scorer: Any = None
        self._base: CausalLM | None = None

    def model_path(self, model_id: str) -> str:
        if model_id == BASE_ID:
            return resolve_model(self.s.training.base_model, self.s.models.models_dir)
        return str(self.store.get(model_id).path)

    def failures(self, model_id: str) -> FailureRecords:
        """The tasks of ``model_id`` recorded as failed (next to its results)."""
        if model_id == BASE_ID:
            return FailureRecords(self.store.eval_dir(BASE_ID, self.s.training.base_model))
        # Not eval_dir(): that needs the snapshot to exist, and reading must not.
        return FailureRecords(self.store.root / model_id / "eval")

    def pending_tasks(
        self, model_id: str, tasks: Sequence[str] | None = None, skip_failed: bool = False
    ) -> list[str]:
        """Tasks without a result; ``skip_failed``: without a failure record either."""
        done = self.store.evaluations(model_id, self.s.training.base_model)
        if skip_failed:
            done = {**done, **self.failures(model_id).all()}
        wanted = [
            t for t in (tasks or self.e.tasks) if not (model_id == BASE_ID and t == "heldout")
        ]
        return [t for t in wanted if t not in done]

    def check_tasks(self, tasks: Sequence[str], read_files: bool = False) -> None:
        """UsageError unless every task is known and has its inputs configured; with
        ``read_files``, the EVALITA files are read too (EvalitaFileError for one in
        another layout), before any model loads."""
        problems = []
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            problems.append(f"unknown evaluation tasks {unknown} (known: {', '.join(TASKS)})")
        if "squad_it" in tasks and not self.e.squad_it_path:
            problems.append("task squad_it needs evaluation.squad_it_path")
        missing = [t for t in EVALITA_TASKS if t in tasks and t not in self.e.evalita]
        if missing:
            problems.append(f"tasks {missing} need evaluation.evalita.<task>.train/test files")
        if problems:
            raise UsageError("; ".join(problems))
        if not read_files:
            return
        from training.evaluation import evalita_files

        for task in tasks:
            if task in EVALITA_TASKS:
                files = self.e.evalita[task]
                read = getattr(evalita_files, f"read_{task}")
                for path in dict.fromkeys((files.train, files.test)):
                    read(path)

    def evaluate(
        self,
        model_id: str,
        tasks: Sequence[str] | None = None,
        force: bool = False,
        *,
        on_error: OnError | None = None,
        skip_failed: bool = False,
    ) -> Iterator[tuple[str, dict[str, Any], Path]]:
        """Run each task not yet done (all with ``force``); yield (task, results, file).

        A task that fails raises, or with ``on_error`` is passed to it (the model failing
        to load: every task) and the next one runs; transient errors always raise.
        ``skip_failed`` leaves out tasks with a failure record. A task that succeeds
        clears its failure record."""
        self.check_tasks(list(tasks or self.e.tasks))
        if force:
            todo = list(tasks or self.e.tasks)
        else:
            todo = self.pending_tasks(model_id, tasks, skip_failed=skip_failed)
        if model_id == BASE_ID:
            todo = [t for t in todo if t != "heldout"]  # base figures ride on each snapshot
        if not todo:
            return
        out_dir = self.store.eval_dir(model_id, self.s.training.base_model)
        failures = FailureRecords(out_dir)
        path = self.model_path(model_id)
        try:
            lm = CausalLM.load(path, device=self.e.device, batch_size=self.e.batch_size)
        except Exception as exc:
            if on_error is None or is_transient(exc):
                raise
            for task in todo:
                on_error(task, exc)
            return
        for task in todo:
            started = time.perf_counter()
            log.info("evaluating %s on %s", model_id, task)
            try:
                results = self._run(task, model_id, lm, out_dir)
            except Exception as exc:
                if on_error is None or is_transient(exc):
                    raise
                on_error(task, exc)
                continue
            results.update(
                task=task,
                model_id=model_id,
                model_path=path,
                seconds=round(time.perf_counter() - started, 3),
                evaluated_at=time.time(),
            )
            target = out_dir / f"{task}.json"
            write_json_atomic(target, results)
            failures.clear(task)
            yield task, results, target

    # -- tasks ------------------------------------------------------------------------------

    def _run(self, task: str, model_id: str, lm: CausalLM, out_dir: Path) -> dict[str, Any]:
        e = self.e
        if task == "squad_it":
            from training.evaluation.squad_it import article_filter, evaluate_squad_it

            assert e.squad_it_path is not None  # checked by the settings
            return evaluate_squad_it(
                lm,
                e.squad_it_path,
                out_dir,
                shots=e.squad_it_shots,
                limit=e.squad_it_limit,
                seed=e.seed,
                max_new_tokens=e.squad_it_max_new_tokens,
                articles=article_filter(e.squad_it_articles),
                fmt=self.fmt,
            )
        if task in ("ami2020", "ironita2018", "sentipolc2014"):
            from training.evaluation.evalita import evaluate_evalita

            files = e.evalita[task]
            return evaluate_evalita(
                lm,
                task,
                files.train,
                files.test,
                out_dir,
                shots=e.evalita_shots,
                limit=e.evalita_limit,
                seed=e.seed,
                fmt=self.fmt,
            )
        if task == "heldout":
            return self._heldout(model_id, lm, out_dir)
        if task == "generation_nll":
            return self._generation_nll(lm, out_dir)
        raise UsageError(f"unknown evaluation task {task!r} (known: {', '.join(TASKS)})")

    def _heldout(self, model_id: str, lm: CausalLM, out_dir: Path) -> dict[str, Any]:
        snap = self.store.get(model_id)
        convs: list[TrainingConversation] = list(read_jsonl(snap.path / HELDOUT))
        if self.e.heldout_limit is not None:
            convs = convs[: self.e.heldout_limit]
        if not convs:
            return {"n": 0, "perplexity": None, "base_perplexity": None, "nll": None}
        texts = [self.fmt.render(c.messages) for c in convs]
        base = self._base_lm()
        rows = []
        totals = {"model": [0.0, 0], "base": [0.0, 0]}
        for conv, text in zip(convs, texts, strict=True):
            nll, tokens = lm.nll([text])
            base_nll, base_tokens = base.nll([text])
            rows.append(
                {"id": conv.conversation_id, "nll": nll, "tokens": tokens, "base_nll": base_nll}
            )
            totals["model"][0] += nll
            totals["model"][1] += tokens
            totals["base"][0] += base_nll
            totals["base"][1] += base_tokens
        pred = out_dir / "heldout.predictions.jsonl"
        write_jsonl_atomic(pred, rows)
        mean = totals["model"][0] / totals["model"][1]
        base_mean = totals["base"][0] / totals["base"][1]
        return {
            "n": len(convs),
            "tokens": int(totals["model"][1]),
            "nll": mean,
            "perplexity": float(np.exp(mean)),
            "base_nll": base_mean,
            "base_perplexity": float(np.exp(base_mean)),
            "predictions": str(pred.resolve()),
        }

    def _threshold(self) -> float:
        """The admission NLL threshold, computed as the scorer workers compute it."""
        a = self.s.admission
        if a.nll_threshold_percentile is None:
            return a.nll_threshold
        from corpusfactory.engines.scoring.calibration import seed_nll_threshold

        p = self.s.producer
        texts = [m.text for c in load_seeds(p.seed_file, p.seed_format) for m in c.messages]
        return seed_nll_threshold(self._scorer, texts, a.nll_threshold_percentile)[0]

    def _base_lm(self) -> CausalLM:
        if self._base is None:
            self._base = CausalLM.load(
                self.model_path(BASE_ID), device=self.e.device, batch_size=self.e.batch_size
            )
        return self._base

    def _generation_nll(self, lm: CausalLM, out_dir: Path) -> dict[str, Any]:
        from corpusfactory.engines.scoring.nll import MLMScorer

        p = self.s.producer
        seeds = load_seeds(p.seed_file, p.seed_format)[: self.e.generation_prompts]
        prompts = [
            self.fmt.prompt([Message("user", s.messages[0].text)], "assistant") for s in seeds
        ]
        g = p.generation
        outputs = lm.generate(
            prompts,
            self.e.generation_max_new_tokens,
            stop=[*self.fmt.stop_strings, "\n"],
            temperature=g.temperature,
            top_p=g.top_p,
            seed=self.e.seed,
        )
        if self._scorer is None:
            self._scorer = MLMScorer.from_settings(self.s, device=self.e.device)
        scored = [(s, o) for s, o in zip(seeds, outputs, strict=True) if o.strip()]
        results = self._scorer.score([o for _, o in scored]) if scored else []
        rows = [
            {"id": s.id, "prompt": s.messages[0].text, "generation": o, "nll": r.nll,
             "tokens": r.tokens}
            for (s, o), r in zip(scored, results, strict=True)
        ]  # fmt: skip
        pred = out_dir / "generation_nll.predictions.jsonl"
        write_jsonl_atomic(pred, rows)
        nlls = np.array([r["nll"] for r in rows], dtype=float)
        summary: dict[str, Any] = {
            "n": len(rows),
            "empty_generations": len(outputs) - len(rows),
            "scorer": self.s.models.scorer,
            "predictions": str(pred.resolve()),
        }
        if len(nlls):
            q = np.quantile(nlls, [0.1, 0.5, 0.9])
            summary.update(
                mean=float(nlls.mean()),
                p10=float(q[0]),
                median=float(q[1]),
                p90=float(q[2]),
                histogram=np.histogram(nlls, bins=10)[0].tolist(),
                histogram_edges=np.histogram(nlls, bins=10)[1].round(4).tolist(),
            )
            threshold = self._threshold()
            summary["nll_threshold"] = threshold
            summary["below_threshold"] = float((nlls < threshold).mean())
        return summary
