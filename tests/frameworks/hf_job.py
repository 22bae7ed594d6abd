"""A small Hugging Face Trainer run with ckptguard.hf, for tests/test_hf_trainer.py.

Usage: hf_job.py OUT MAX_STEPS [--resume true|PATH] [--limit N] [--best] [--arm-step S]
[--native]. A GPT-2 of two layers built from a config here (nothing from the Hub), on fixed
random tokens; dropout on, so a resume must restore the RNG states to match. Saves every 2
steps into the store OUT; ``--best`` evaluates every 2 steps with load_best_model_at_end (the
highest eval loss is "best", so an early checkpoint is). At the end OUT/final.pt (torch.save)
holds the weights, optimizer and scheduler states, the steps it started from and ended at,
and the losses logged.
``--arm-step S`` moves ARM_FAILPOINT into CKPTGUARD_FAILPOINT when step S begins.
``--native`` uses transformers.Trainer instead (its own checkpoint format).
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import ckptguard.hf

VOCAB, SEQ, SAMPLES = 64, 16, 32


class Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Arm(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step and os.environ.get("ARM_FAILPOINT"):
            os.environ["CKPTGUARD_FAILPOINT"] = os.environ["ARM_FAILPOINT"]


class Start(TrainerCallback):
    """Records the step training starts from (0, or the resumed checkpoint's)."""

    step = -1

    def on_train_begin(self, args, state, control, **kw):
        self.step = state.global_step


def model() -> GPT2LMHeadModel:
    transformers.set_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("max_steps", type=int)
    p.add_argument("--resume")
    p.add_argument("--limit", type=int)
    p.add_argument("--best", action="store_true")
    p.add_argument("--arm-step", type=int)
    p.add_argument("--native", action="store_true")
    a = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=a.out,
        max_steps=a.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=a.limit,
        logging_steps=1,
        eval_strategy="steps" if a.best else "no",
        eval_steps=2,
        per_device_eval_batch_size=8,
        load_best_model_at_end=a.best,
        metric_for_best_model="eval_loss" if a.best else None,
        greater_is_better=True if a.best else None,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    cls = transformers.Trainer if a.native else ckptguard.hf.Trainer
    start = Start()
    callbacks = [start] + ([Arm(a.arm_step)] if a.arm_step is not None else [])
    trainer = cls(
        model=model(),
        args=args,
        train_dataset=Tokens(1),
        eval_dataset=Tokens(2) if a.best else None,
        callbacks=callbacks,
    )
    resume = {"true": True, None: None}.get(a.resume, a.resume)
    trainer.train(resume_from_checkpoint=resume)
    final = {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "global_step": trainer.state.global_step,
        "start_step": start.step,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
    }
    if trainer.is_world_process_zero():
        torch.save(final, os.path.join(a.out, "final.pt"))


if __name__ == "__main__":
    main()
