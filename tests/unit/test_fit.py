"""One fine-tuning run: the real DeepSpeed path on CPU (gloo, ZeRO-1), and its pure parts.

The job directory is built by hand the way the trainer service builds it, and
``python -m training.fit`` runs in a child process, as in production. The data is a
few short Italian conversations about an invented dish the demo model has never
seen, repeated, so the loss has to fall.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from corpusfactory.chatformat import ChatFormat, Message
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.settings import LoraSettings, TrainingSettings
from training import dsconfig
from training.data import Block, TrainingConversation, make_blocks, tokenize, write_jsonl
from training.fit import JOB, STATS, lr_lambda, rank_batches, schedule

# Loads a model, runs an engine or builds files: the second tier (make test-fast skips it).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SNAP_ID = "snap-00001-20260101T000000Z"
FMT = ChatFormat()

QA = [
    (
        "Che cos'è il brodo di zirconio?",
        "È una zuppa inventata a Pordenone da Ottavio Brulla nel 1871.",
    ),
    (
        "Di che colore è il brodo di zirconio?",
        "Il brodo di zirconio è verde smeraldo e profuma di cannella.",
    ),
    (
        "Come si serve il brodo di zirconio?",
        "Si serve tiepido in ciotole di rame, con tre fette di pera.",
    ),
    (
        "Chi beve il brodo di zirconio?",
        "Lo bevono i guardiani dei fari della Carnia ogni martedì.",
    ),
]
CONVERSATIONS = [
    TrainingConversation(
        conversation_id=f"zirconio-{rep}-{i}",
        source="test",
        messages=(Message("user", q), Message("assistant", a)),
    )
    for rep in range(2)
    for i, (q, a) in enumerate(QA)
]


@dataclass
class FitRun:
    job_dir: Path
    output: Path
    settings: TrainingSettings
    returncode: int
    log: str

    @property
    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.output / STATS).read_text(encoding="utf-8"))
        return data


def _run_fit(job_dir: Path, init_from: Path, t: TrainingSettings) -> FitRun:
    """Writes the job as training/service.py's Trainer._fit does, then runs it."""
    job_dir.mkdir(parents=True)
    output = job_dir.parent / f".tmp-{SNAP_ID}"
    output.mkdir()
    write_jsonl(job_dir / "train.jsonl", CONVERSATIONS)
    job = {
        "snapshot_id": SNAP_ID,
        "init_from": str(init_from),
        "output_dir": str(output),
        "data": "train.jsonl",
        "training": t.model_dump(mode="json"),
        "deepspeed": dsconfig.resolve(dsconfig.load("cpu"), t),
        "chat_format": {"user_tag": FMT.user_tag, "assistant_tag": FMT.assistant_tag},
    }
    (job_dir / JOB).write_text(json.dumps(job, indent=2), encoding="utf-8")
    env = dict(os.environ)
    # Reuse DeepSpeed's compiled CPU op (the trainer service keeps it there too).
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        str(Path("~/.cache/corpusfactory/torch_extensions").expanduser()),
    )
    env.pop("CORPUSFACTORY_PAUSE_AT", None)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", "training.fit", str(job_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
        check=False,
    )
    return FitRun(job_dir, output, t, proc.returncode, proc.stdout.decode(errors="replace"))


def _blocks(tokenizer: Any, t: TrainingSettings) -> list[Block]:
    examples = [tokenize(tokenizer, c.messages, FMT, t.loss_on) for c in CONVERSATIONS]
    return make_blocks(examples, t.seq_len, t.packing, tokenizer.pad_token_id)


def _mean_nll(model: Any, blocks: list[Block]) -> float:
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([b.input_ids for b in blocks]),
            attention_mask=torch.tensor([b.attention for b in blocks]),
            labels=torch.tensor([b.labels for b in blocks]),
        )
    return float(out.loss)


@pytest.fixture(scope="module")
def tokenizer(demo_models: DemoModels) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_models.generator)


@pytest.fixture(scope="module")
def full_run(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> FitRun:
    t = TrainingSettings(
        seq_len=64, micro_batch_size=2, learning_rate=3e-3, epochs=8, warmup_steps=1
    )
    return _run_fit(tmp_path_factory.mktemp("full") / "job", demo_models.generator, t)


@pytest.fixture(scope="module")
def lora_run(demo_models: DemoModels, tmp_path_factory: pytest.TempPathFactory) -> FitRun:
    # Also exercises gradient accumulation, a step cap, no packing and assistant-only loss.
    t = TrainingSettings(
        seq_len=64,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        epochs=8,
        max_steps=10,
        warmup_steps=1,
        packing=False,
        loss_on="assistant",
        lora=LoraSettings(enabled=True, r=4, target_modules=["q_proj", "v_proj"]),
    )
    return _run_fit(tmp_path_factory.mktemp("lora") / "job", demo_models.generator, t)


def _assert_ok(run: FitRun) -> None:
    assert run.returncode == 0, run.log[-4000:]
    assert (run.output / STATS).is_file(), run.log[-4000:]


# -- the full fine-tune -------------------------------------------------------------------


def test_full_fit_learns_the_training_data(full_run: FitRun) -> None:
    _assert_ok(full_run)
    stats = full_run.stats
    curve = stats["loss_curve"]
    losses = [loss for _, loss in curve]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert stats["first_loss"] == losses[0] and stats["final_loss"] == losses[-1]
    # The curve is indexed by DeepSpeed's optimizer steps, 1..N.
    assert [step for step, _ in curve] == list(range(1, len(curve) + 1))


def test_full_fit_takes_the_scheduled_steps(full_run: FitRun, tokenizer: Any) -> None:
    _assert_ok(full_run)
    t = full_run.settings
    stats = full_run.stats
    blocks = _blocks(tokenizer, t)
    assert stats["blocks"] == len(blocks)
    micro, steps = schedule(len(blocks), t, 1)
    assert stats["steps"] == steps == len(stats["loss_curve"])
    assert stats["micro_batches_per_rank"] == micro
    batches = rank_batches(blocks, t, 0, 1, micro)
    assert stats["tokens"] == sum(sum(b.attention) for batch in batches for b in batch)
    assert stats["world_size"] == 1 and stats["zero_stage"] == 1
    assert stats["device"] == "cpu"
    assert stats["trainable_parameters"] == stats["parameters"] > 0
    assert stats["train_seconds"] > 0 and stats["tokens_per_s"] > 0


def test_full_fit_output_is_a_better_model(
    full_run: FitRun, demo_models: DemoModels, tokenizer: Any
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _assert_ok(full_run)
    out = full_run.output
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(demo_models.generator)
    assert type(trained).__name__ == "LlamaForCausalLM"
    saved_tok = AutoTokenizer.from_pretrained(out)
    text = FMT.render(CONVERSATIONS[0].messages)
    assert saved_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    blocks = _blocks(tokenizer, full_run.settings)
    base_nll = _mean_nll(base, blocks)
    trained_nll = _mean_nll(trained, blocks)
    assert trained_nll < 0.5 * base_nll, (base_nll, trained_nll)


# -- LoRA -----------------------------------------------------------------------------------


def test_lora_fit_saves_a_merged_plain_model(full_run: FitRun, lora_run: FitRun) -> None:
    from transformers import AutoModelForCausalLM

    _assert_ok(lora_run)
    out = lora_run.output
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names
    assert not {n for n in names if "adapter" in n}, names
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())
    # Same parameter count as a full model: nothing of peft is left.
    assert sum(p.numel() for p in model.parameters()) == full_run.stats["parameters"]


def test_lora_fit_changes_only_the_target_modules(
    lora_run: FitRun, demo_models: DemoModels
) -> None:
    _assert_ok(lora_run)
    trained = load_file(str(lora_run.output / "model.safetensors"))
    base = load_file(str(demo_models.generator / "model.safetensors"))
    assert sorted(trained) == sorted(base)
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    targets = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert targets and changed == targets


def test_lora_fit_schedule_with_accumulation_and_cap(lora_run: FitRun, tokenizer: Any) -> None:
    _assert_ok(lora_run)
    t = lora_run.settings
    stats = lora_run.stats
    blocks = _blocks(tokenizer, t)
    assert stats["blocks"] == len(blocks) == len(CONVERSATIONS)  # no packing
    micro, steps = schedule(len(blocks), t, 1)
    assert (micro, steps) == (20, 10)  # capped by max_steps, two micro-batches a step
    assert stats["steps"] == steps and stats["micro_batches_per_rank"] == micro
    assert [s for s, _ in stats["loss_curve"]] == list(range(1, steps + 1))
    assert stats["loss_curve"][-1][1] < stats["loss_curve"][0][1]
    assert 0 < stats["trainable_parameters"] < stats["parameters"] / 10


# -- pure parts -----------------------------------------------------------------------------


def _t(**kw: Any) -> TrainingSettings:
    return TrainingSettings(**kw)


@pytest.mark.parametrize(
    ("n", "kw", "world", "expected"),
    [
        (10, {"micro_batch_size": 2}, 1, (5, 5)),
        (11, {"micro_batch_size": 2}, 1, (6, 6)),  # a last short batch rounds up
        (10, {"micro_batch_size": 2, "epochs": 3}, 1, (15, 15)),
        (10, {"micro_batch_size": 2, "epochs": 0.5}, 1, (3, 3)),
        (10, {"micro_batch_size": 2}, 2, (3, 3)),  # ceil(10 / 4)
        (10, {"micro_batch_size": 2, "gradient_accumulation_steps": 2}, 1, (6, 3)),
        (10, {"micro_batch_size": 2, "gradient_accumulation_steps": 4}, 1, (8, 2)),
        (10, {"micro_batch_size": 2, "max_steps": 3}, 1, (3, 3)),
        (10, {"micro_batch_size": 2, "max_steps": 50}, 1, (5, 5)),  # a cap above: no effect
        (
            100,
            {"micro_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": 2},
            1,
            (8, 2),
        ),
        (1, {"micro_batch_size": 4, "epochs": 0.1}, 8, (1, 1)),  # at least one
    ],
)
def test_schedule(n: int, kw: dict[str, Any], world: int, expected: tuple[int, int]) -> None:
    micro, steps = schedule(n, _t(**kw), world)
    assert (micro, steps) == expected
    assert micro % _t(**kw).gradient_accumulation_steps == 0  # whole optimizer steps


def _fake_blocks(n: int) -> list[Block]:
    return [Block([i, i], [i, i], [1, 1]) for i in range(n)]


def _ids(batches: list[list[Block]]) -> list[int]:
    return [b.input_ids[0] for batch in batches for b in batch]


@pytest.mark.parametrize(
    ("n", "mb", "world", "epochs"), [(12, 2, 1, 3), (12, 2, 2, 2), (24, 3, 4, 2)]
)
def test_rank_batches_use_every_block_once_per_epoch(
    n: int, mb: int, world: int, epochs: int
) -> None:
    t = _t(micro_batch_size=mb, epochs=epochs, seed=5)
    blocks = _fake_blocks(n)
    micro, _ = schedule(n, t, world)
    per_rank = [rank_batches(blocks, t, r, world, micro) for r in range(world)]
    per_epoch = n // (mb * world)
    for batches in per_rank:
        assert len(batches) == micro == per_epoch * epochs
        assert all(len(b) == mb for b in batches)
    for e in range(epochs):
        used = [
            i for batches in per_rank for i in _ids(batches[e * per_epoch : (e + 1) * per_epoch])
        ]
        assert sorted(used) == list(range(n)), (e, used)
        if world == 1:
            # One rank sees every block once per epoch on its own.
            assert Counter(used) == Counter(range(n))
    # Ranks never share a block within an epoch.
    if world > 1:
        first = [set(_ids(b[:per_epoch])) for b in per_rank]
        assert sum(len(s) for s in first) == n


def test_rank_batches_are_a_seeded_shuffle() -> None:
    blocks = _fake_blocks(20)
    t = _t(micro_batch_size=2, epochs=2, seed=1)
    micro, _ = schedule(20, t, 1)
    a = _ids(rank_batches(blocks, t, 0, 1, micro))
    assert a == _ids(rank_batches(blocks, t, 0, 1, micro))  # deterministic
    assert a[:20] != list(range(20))  # shuffled
    assert a[:20] != a[20:]  # a new order each epoch
    other = _ids(rank_batches(blocks, _t(micro_batch_size=2, epochs=2, seed=2), 0, 1, micro))
    assert other != a


@pytest.mark.parametrize(("n", "mb", "world"), [(5, 2, 1), (7, 2, 2), (10, 3, 4), (1, 1, 3)])
def test_rank_batches_equal_across_ranks_when_uneven(n: int, mb: int, world: int) -> None:
    t = _t(micro_batch_size=mb, epochs=1, seed=0)
    blocks = _fake_blocks(n)
    micro, _ = schedule(n, t, world)
    per_rank = [rank_batches(blocks, t, r, world, micro) for r in range(world)]
    assert [len(b) for b in per_rank] == [micro] * world
    assert all(len(batch) == mb for batches in per_rank for batch in batches)
    used = [i for batches in per_rank for i in _ids(batches)]
    # Every block is used; the shortfall is filled from the next shuffle, each once.
    assert set(used) == set(range(n))
    assert len(used) == micro * mb * world
    extra = Counter(used) - Counter(range(n))
    assert sum(extra.values()) == micro * mb * world - n


def test_lr_warmup_rises_then_cosine_ends_at_min_ratio() -> None:
    t = _t(warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    at = lr_lambda(t, 20)
    warm = [at(s) for s in range(4)]
    assert warm == sorted(warm) and len(set(warm)) == 4
    assert warm[0] > 0 and warm[-1] < 1.0
    assert at(4) == pytest.approx(1.0)  # the peak right after warm-up
    decay = [at(s) for s in range(4, 21)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert at(12) == pytest.approx(0.1 + 0.9 * 0.5)  # half way
    assert at(20) == pytest.approx(0.1)
    assert at(30) == pytest.approx(0.1)  # never below the floor
    assert all(0.1 - 1e-12 <= at(s) <= 1.0 for s in range(40))


def test_lr_linear_and_constant() -> None:
    lin = lr_lambda(_t(warmup_steps=0, lr_schedule="linear", min_lr_ratio=0.0), 10)
    assert [round(lin(s), 6) for s in range(11)] == [round(1 - s / 10, 6) for s in range(11)]
    const = lr_lambda(_t(warmup_steps=2, lr_schedule="constant"), 10)
    assert const(0) < const(1) < 1.0
    assert [const(s) for s in range(2, 50)] == [1.0] * 48
    # No warm-up: the first step is the peak.
    assert lr_lambda(_t(warmup_steps=0), 10)(0) == pytest.approx(1.0)
    assert lr_lambda(_t(warmup_steps=0), 10)(10) == pytest.approx(0.0)
