"""One fine-tuning run with DeepSpeed: ``python -m training.fit JOB_DIR``.

The trainer service writes a job directory (``job.json`` and ``train.jsonl``) and runs
this module in a child process: directly with ``python`` (one process; gloo on CPU,
or one GPU), or under the ``deepspeed`` launcher for several GPUs and nodes
(``training.launcher: deepspeed`` and ``launcher_args``). It reads top to bottom:

``setup()`` reads the job, joins the process group and seeds everything;
``main()`` builds the data blocks, the model (full fine-tune, or LoRA through peft) and
the DeepSpeed engine; ``fit()`` runs the optimizer steps; ``save()`` writes the weights
in Hugging Face format into the staging directory named by the job, then
``train_stats.json`` (loss curve, tokens/s, wall time) last. The service publishes the
snapshot only after this process has exited with status 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corpusfactory.chatformat import ChatFormat
from corpusfactory.faults import pause_point
from corpusfactory.settings import TrainingSettings
from training.data import Block, make_blocks, read_jsonl, tokenize
from training.dsconfig import zero_stage

log = logging.getLogger("corpusfactory.fit")

JOB = "job.json"
STATS = "train_stats.json"
SENTENCEPIECE_FILES = ("tokenizer.model", "added_tokens.json")


@dataclass
class Job:
    snapshot_id: str
    init_from: str
    output_dir: Path
    data: Path
    training: TrainingSettings
    deepspeed: dict[str, Any]
    fmt: ChatFormat

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        raw = json.loads((job_dir / JOB).read_text(encoding="utf-8"))
        return cls(
            snapshot_id=raw["snapshot_id"],
            init_from=raw["init_from"],
            output_dir=Path(raw["output_dir"]),
            data=job_dir / raw["data"],
            training=TrainingSettings.model_validate(raw["training"]),
            deepspeed=raw["deepspeed"],
            fmt=ChatFormat(**raw["chat_format"]),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(job_dir: Path) -> Job:
    job = Job.read(job_dir)
    # Without a launcher this is a world of one; DeepSpeed still wants the variables.
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )  # fmt: skip
    import deepspeed

    backend = "gloo" if job.training.device == "cpu" else "nccl"
    deepspeed.init_distributed(dist_backend=backend)
    seed = job.training.seed
    random.seed(seed)
    torch.manual_seed(seed)
    if job.training.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return job


def lr_lambda(t: TrainingSettings, total_steps: int) -> Any:
    """Multiplier of the peak learning rate at each optimizer step."""

    def at(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.lr_schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return at


def build_blocks(job: Job, tokenizer: Any) -> list[Block]:
    t = job.training
    examples = [
        tokenize(tokenizer, conv.messages, job.fmt, t.loss_on) for conv in read_jsonl(job.data)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_blocks(examples, t.seq_len, t.packing, pad)


def schedule(n_blocks: int, t: TrainingSettings, world: int) -> tuple[int, int]:
    """(micro-batches per rank, optimizer steps) for the whole run."""
    per_epoch = math.ceil(n_blocks / (t.micro_batch_size * world))
    micro = max(1, math.ceil(per_epoch * t.epochs))
    steps = math.ceil(micro / t.gradient_accumulation_steps)
    if t.max_steps is not None and steps > t.max_steps:
        steps = t.max_steps
        micro = steps * t.gradient_accumulation_steps
    # Whole optimizer steps only: every rank ends on an accumulation boundary.
    return steps * t.gradient_accumulation_steps, steps


def rank_batches(
    blocks: list[Block], t: TrainingSettings, rank: int, world: int, micro: int
) -> list[list[Block]]:
    """This rank's micro-batches: a seeded shuffle per epoch, then every world-th block.

    Epochs are concatenated until ``micro`` batches exist. When the blocks do not fill
    the last batches evenly across ranks, blocks from the start of the next shuffle
    fill them, so all ranks take the same number of steps.
    """
    need = micro * t.micro_batch_size * world
    order: list[int] = []
    epoch = 0
    while len(order) < need:
        perm = list(range(len(blocks)))
        random.Random(t.seed * 1_000_003 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    mine = order[:need][rank::world]
    size = t.micro_batch_size
    return [[blocks[i] for i in mine[k : k + size]] for k in range(0, len(mine), size)]


def _tensors(batch: list[Block], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([b.input_ids for b in batch], device=device),
        "attention_mask": torch.tensor([b.attention for b in batch], device=device),
        "labels": torch.tensor([b.labels for b in batch], device=device),
    }


def load_model(job: Job) -> Any:
    from transformers import AutoModelForCausalLM

    t = job.training
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if t.attn_implementation:
        kwargs["attn_implementation"] = t.attn_implementation
    model: Any = AutoModelForCausalLM.from_pretrained(job.init_from, **kwargs)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=t.lora.r,
            lora_alpha=t.lora.alpha,
            lora_dropout=t.lora.dropout,
            target_modules=list(t.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def main(job_dir: Path) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoTokenizer

    job = setup(job_dir)
    t = job.training
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(job.init_from)
    blocks = build_blocks(job, tokenizer)
    if not blocks:
        raise SystemExit(f"{job.data}: no training tokens")
    micro, steps = schedule(len(blocks), t, world)
    batches = rank_batches(blocks, t, rank, world, micro)
    model = load_model(job)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=job.deepspeed,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t, steps)),
    )
    stats = fit(engine, batches, t, world)
    stats.update(
        blocks=len(blocks),
        world_size=world,
        device=str(engine.device),
        zero_stage=zero_stage(job.deepspeed),
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in params),
        versions={
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": __import__("transformers").__version__,
        },
    )
    save(engine, model, tokenizer, job, stats, rank)
    dist.barrier()
    return stats


def fit(engine: Any, batches: list[list[Block]], t: TrainingSettings, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    started = time.perf_counter()
    curve: list[list[float]] = []
    step_losses: list[float] = []
    tokens = 0
    for batch in batches:
        inputs = _tensors(batch, engine.device)
        loss = engine(**inputs).loss
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        step_losses.append(float(loss.detach()))
        tokens += int(inputs["attention_mask"].sum())
        if boundary:
            pause_point("fit.train")
            mean = torch.tensor(sum(step_losses) / len(step_losses))
            dist.all_reduce(mean)  # gloo and nccl both sum; divide for the mean
            curve.append([engine.global_steps, round(float(mean) / world, 6)])
            step_losses = []
    total_tokens = torch.tensor(tokens, dtype=torch.long)
    dist.all_reduce(total_tokens)
    wall = time.perf_counter() - started
    return {
        "steps": len(curve),
        "micro_batches_per_rank": len(batches),
        "loss_curve": curve,
        "first_loss": curve[0][1] if curve else None,
        "final_loss": curve[-1][1] if curve else None,
        "tokens": int(total_tokens),
        "train_seconds": round(wall, 3),
        "tokens_per_s": round(int(total_tokens) / wall, 2) if wall > 0 else None,
    }


def save(
    engine: Any, model: Any, tokenizer: Any, job: Job, stats: dict[str, Any], rank: int
) -> None:
    """Weights, tokenizer and generation config into the staging dir; stats file last."""
    out = job.output_dir
    state = None
    if zero_stage(job.deepspeed) == 3:
        # Every rank takes part in gathering the partitioned weights.
        state = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    module = engine.module
    if job.training.lora.enabled:
        module = module.merge_and_unload()
        state = None
    module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers writes neither the SentencePiece model nor added_tokens.json, which
    # llama.cpp's converter reads for the vocabulary's scores and the role tags: without
    # them a snapshot's GGUF would tokenize differently from its transformers twin.
    for name in SENTENCEPIECE_FILES:
        source = Path(job.init_from) / name
        if source.is_file() and not (out / name).exists():
            shutil.copyfile(source, out / name)
    pause_point("fit.save")
    (out / STATS).write_text(json.dumps(stats, indent=2), encoding="utf-8")


PARENT_ENV = "CORPUSFACTORY_FIT_PARENT"


def die_with_parent() -> None:
    """Die when the trainer that started this process dies (``PARENT_ENV`` names it).

    Set here, in the child, rather than by a ``preexec_fn`` in the trainer: Python code
    between fork and exec in a process that has loaded gRPC (pymilvus) can abort the
    child (seen: "epoll_wait error: Bad file descriptor", status -6). A trainer gone
    before this runs is caught by comparing the parent's pid.
    """
    want = os.environ.get(PARENT_ENV)
    if not want:
        return
    import ctypes
    import signal

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # Started by the trainer itself: its pid must still be our parent. Under a launcher
    # (deepspeed) the parent is the launcher, which dies with the trainer in turn.
    parent = os.getppid()
    if parent == 1 or (os.environ.get("LOCAL_RANK") is None and parent != int(want)):
        os._exit(1)


def cli(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__)
    parser.add_argument("job_dir", type=Path, help="directory holding job.json and its data")
    parser.add_argument("--local_rank", type=int, default=None, help="set by some launchers")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(
        level=os.environ.get("CORPUSFACTORY_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stats = main(args.job_dir)
    log.info("trained %s steps, final loss %s", stats["steps"], stats["final_loss"])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
