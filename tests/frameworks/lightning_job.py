"""A small Lightning training run with ckptguard's CheckpointIO, for tests/test_lightning.py.

Usage: lightning_job.py ROOT EPOCHS [--resume last|PATH] [--ddp] [--top-k K] [--save-last MODE]
[--arm-epoch E]. Checkpoints go to ROOT/ckpts (ModelCheckpoint: every epoch, top k by
train_loss, or all with K=-1; MODE: none, true or link); at the end rank 0 writes ROOT/final.pt
(torch.save: the weights, the optimizer and scheduler states, the step it started
from and the one it ended at). ``--arm-epoch E`` moves
the environment's ARM_FAILPOINT into CKPTGUARD_FAILPOINT when epoch E starts, so that the
failpoint fires in a save of that epoch and not before. The model, data and seeds are fixed:
two runs to the same epoch end bitwise equal, however often they stopped and resumed.
"""

from __future__ import annotations

import argparse
import os
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import ckptguard.lightning


class Net(L.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)}


class Start(L.Callback):
    """Records the step training starts from (0, or the resumed checkpoint's)."""

    step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


class Arm(L.Callback):
    """Arms ARM_FAILPOINT at the start of one epoch (the saves before it run without it)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and os.environ.get("ARM_FAILPOINT"):
            os.environ["CKPTGUARD_FAILPOINT"] = os.environ["ARM_FAILPOINT"]


def data(ddp: bool) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * torch.randn(64, 1, generator=g)
    # Under DDP, Lightning's DistributedSampler shuffles by seed and epoch: a resumed run sees
    # the same order. Alone, a shuffling sampler would draw from the global RNG, which Lightning
    # does not checkpoint, so the order is fixed.
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=ddp)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("epochs", type=int)
    p.add_argument("--resume")
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--save-last", default="none", choices=["none", "true", "link"])
    p.add_argument("--arm-epoch", type=int)
    a = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is not recommended.*")
    L.seed_everything(1, verbose=False)
    torch.set_num_threads(1)
    save_last = {"none": None, "true": True, "link": "link"}[a.save_last]
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=os.path.join(a.root, "ckpts"),
        filename="{epoch}-{step}",
        save_top_k=a.top_k,
        monitor="train_loss" if a.top_k > 0 else None,
        save_last=save_last,
        every_n_epochs=1,
    )
    start = Start()
    callbacks: list = [ckpt, start]
    if a.arm_epoch is not None:
        callbacks.append(Arm(a.arm_epoch))
    trainer = L.Trainer(
        max_epochs=a.epochs,
        accelerator="cpu",
        devices=2 if a.ddp else 1,
        strategy="ddp" if a.ddp else "auto",
        plugins=[ckptguard.lightning.CheckpointIO()],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=a.root,
    )
    model = Net()
    trainer.fit(model, data(a.ddp), ckpt_path=a.resume)
    if trainer.is_global_zero:
        final = {
            "state_dict": model.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "global_step": trainer.global_step,
            "start_step": start.step,
            "epoch": trainer.current_epoch,
            "best_k_models": sorted(os.path.basename(k) for k in ckpt.best_k_models),
            "last_model_path": os.path.basename(ckpt.last_model_path),
        }
        torch.save(final, os.path.join(a.root, "final.pt"))


if __name__ == "__main__":
    main()
