"""Hugging Face ``Trainer`` checkpoints as ckptguard checkpoints: one atomic commit each.

A Trainer checkpoint is a directory of files written one after another (weights, optimizer,
scheduler, scaler, RNG states, ``trainer_state.json``): a crash between two leaves one that
cannot resume. Here all of it is one ckptguard checkpoint, ``<output_dir>/step-N``, committed
at once, and resuming reads it back verified. Transformers has no public hook for where a
checkpoint's state goes, so ``CheckpointMixin`` overrides the Trainer's own private save and
load steps; their signatures are checked against those of the transformers release it was
built for, and a release that differs is refused by name (``IntegrationError``) rather than
half-used.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import transformers
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import SaveStrategy
from transformers.training_args import ParallelMode

from .. import api
from ..errors import CheckpointError, IntegrationError, WorldSizeError, brief, warn_after_commit
from ..failpoints import failpoint
from ..options import SaveOptions
from . import state as cstate

__all__ = ["BUILT_FOR", "FORMAT", "CheckpointMixin", "Trainer", "check_transformers"]

logger = logging.getLogger(__name__)

BUILT_FOR = "5.24.0"
"""The transformers release whose Trainer internals the mixin overrides (any 5.x whose
signatures match is accepted)."""

FORMAT = "ckptguard.hf/1"
"""The ``format`` value of every checkpoint this integration saves (its tree's layout)."""

TRAINER_STATE = "trainer_state.json"

# The Trainer's methods the mixin overrides or calls, with their parameters after ``self`` as
# transformers 5.24 has them.
_INTERNALS: dict[str, tuple[str, ...]] = {
    "train": ("resume_from_checkpoint", "trial", "ignore_keys_for_eval"),
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_rng_state": ("checkpoint",),
    "_load_best_model": (),
    "_get_output_dir": ("trial",),
    "store_flos": (),
}


def check_transformers(base: type | None = None) -> None:
    """Raise ``IntegrationError`` unless ``base`` (transformers' Trainer) has the internals the
    mixin was built against: transformers 5.x, each overridden method with its parameters."""
    base = base or transformers.Trainer
    version = transformers.__version__
    if version.split(".")[0] != BUILT_FOR.split(".")[0]:
        raise IntegrationError(
            f"ckptguard.hf supports transformers {BUILT_FOR.split('.')[0]}.x (built against "
            f"{BUILT_FOR}); this is transformers {version}"
        )
    for name, expected in _INTERNALS.items():
        method = getattr(base, name, None)
        found = None if method is None else tuple(inspect.signature(method).parameters)[1:]
        if found != expected:
            raise IntegrationError(
                f"transformers {version}: Trainer.{name} is "
                f"{'missing' if found is None else '(' + ', '.join(found) + ')'}, not "
                f"({', '.join(expected)}) as in transformers {BUILT_FOR}, whose internals "
                "ckptguard.hf overrides; use a release it supports"
            )
    if not hasattr(transformers.TrainerState, "load_from_json"):
        raise IntegrationError(f"transformers {version}: TrainerState.load_from_json is missing")


# The mixin goes before transformers.Trainer among a class's bases; the type checker sees it as
# one, so that the Trainer's attributes and the methods it overrides are checked.
if TYPE_CHECKING:
    _Base = transformers.Trainer
else:
    _Base = object


class CheckpointMixin(_Base):
    """Makes a ``transformers.Trainer`` (or a subclass: put the mixin first) save and resume
    through ckptguard. ``save_options``: options of ``ckptguard.save`` (``compress``, ...).

    Each save is ``<output_dir>/step-<global step>``, one atomic checkpoint holding the model's
    weights and config, the optimizer, scheduler and scaler states, every rank's RNG states and
    ``trainer_state.json``'s content; every rank of a job takes part.
    ``train(resume_from_checkpoint=True)`` resumes from the store's LATEST, a path from that
    checkpoint (a checkpoint of Hugging Face's own format still loads through its loader).
    ``save_total_limit`` deletes through the store; ``load_best_model_at_end`` loads the best
    checkpoint's weights. DeepSpeed and FSDP keep their own formats and are refused here.
    """

    def __init__(self, *args: Any, save_options: dict[str, Any] | None = None, **kw: Any) -> None:
        check_transformers()
        self.ckptguard_options = dict(save_options or {})
        SaveOptions.from_kwargs(self.ckptguard_options)  # a misspelt option fails here
        if "overwrite" in self.ckptguard_options or "step" in self.ckptguard_options:
            raise TypeError("save_options may not set overwrite or step: each save sets them")
        self._ckptguard_resume: tuple[str, dict[str, Any]] | None = None
        super().__init__(*args, **kw)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise IntegrationError(
                "ckptguard.hf covers the Trainer's own checkpoints; DeepSpeed and FSDP save "
                "their own formats (ckptguard.deepspeed and ckptguard.dcp cover those)"
            )

    # -- training ---------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> Any:
        """``Trainer.train``, resuming from a ckptguard checkpoint where one is meant.

        The Trainer reads ``trainer_state.json`` from the checkpoint path itself: it is given
        a private directory holding only that file, written from the checkpoint just loaded,
        while every other part comes from the same loaded checkpoint."""
        args = self.args
        source = cstate.checkpoint_source(resume_from_checkpoint, str(args.output_dir))
        if source is None:
            result = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        else:
            view = tempfile.mkdtemp(prefix="ckptguard-hf-")
            try:
                loaded = self._load_checkpoint(source)
                with open(os.path.join(view, TRAINER_STATE), "w", encoding="utf-8") as f:
                    f.write(loaded["trainer_state"])
                self._ckptguard_resume = (source, loaded)
                result = super().train(view, trial, ignore_keys_for_eval)
            finally:
                self._ckptguard_resume = None
                shutil.rmtree(view, ignore_errors=True)
        best = self.state.best_model_checkpoint
        if args.should_save and best is not None and args.save_total_limit == 1:
            cstate.keep_only(self._get_output_dir(trial), best)
        return result

    def _load_checkpoint(self, source: str) -> dict[str, Any]:
        """The checkpoint ``source``, verified, with this rank's RNG states (none when the job's
        world size differs from the saved one, as the Trainer's own loader)."""
        try:
            loaded = api.load(source, map_location="cpu")
        except WorldSizeError:
            loaded = api.load(source, map_location="cpu", rank=0)
            loaded.pop("rng", None)
            logger.info("%s was saved at another world size: RNG states not restored", source)
        if not isinstance(loaded, dict) or loaded.get("format") != FORMAT:
            raise IntegrationError(f"{source} is not a checkpoint of ckptguard.hf ({FORMAT})")
        return loaded

    # -- saving ------------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, as one ckptguard commit on every rank; then rotation."""
        args, st = self.args, self.state
        if getattr(self, "hp_search_backend", None) is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        path = os.path.join(run_dir, cstate.checkpoint_name(st.global_step))
        saves = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if args.save_strategy in saves and st.best_global_step:
            best = os.path.join(run_dir, cstate.checkpoint_name(st.best_global_step))
            if st.best_global_step == st.global_step or cstate.is_checkpoint(best):
                st.best_model_checkpoint = best
        self._export_callback_states()
        api.save(
            self._checkpoint_state(),
            path,
            overwrite=True,
            step=st.global_step,
            **self.ckptguard_options,
        )
        if args.push_to_hub:
            logger.warning("ckptguard.hf: checkpoints are not pushed to the Hub (%s)", path)
        if args.should_save:
            try:  # the checkpoint is committed: a failure from here on is a warning
                failpoint("hf.save.committed")
                cstate.rotate(run_dir, args.save_total_limit, st.best_model_checkpoint)
            except (CheckpointError, OSError) as e:
                warn_after_commit(f"{path} is saved, but save_total_limit failed ({brief(e)})")

    def _export_callback_states(self) -> None:
        """Stateful callbacks into the state, as the Trainer does before writing it."""
        saved: Any = self.state.stateful_callbacks  # a dict by callback name, once training runs
        for cb in [*self.callback_handler.callbacks, self.control]:
            if isinstance(cb, ExportableState):
                name = cb.__class__.__name__
                if isinstance(saved[name], list):
                    saved[name].append(cb.state())
                else:
                    saved[name] = cb.state()

    def _checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs, as one tree (tensors, and JSON text for the rest)."""
        model: Any = self.model
        st = self.state
        out: dict[str, Any] = {
            "format": FORMAT,
            "model": model.state_dict(),
            "trainer_state": json.dumps(dataclasses.asdict(st), indent=2, sort_keys=True) + "\n",
        }
        for key in ("config", "generation_config"):
            config = getattr(model, key, None)
            if config is not None and hasattr(config, "to_json_string"):
                out[key] = config.to_json_string()
        if self.args.save_only_model:
            return out
        optimizer: Any = self.optimizer
        out["optimizer"] = optimizer.state_dict()
        if self.lr_scheduler is not None:
            out["scheduler"] = self.lr_scheduler.state_dict()
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            out["scaler"] = scaler.state_dict()
        out["rng"] = cstate.rng_state(self._distributed())
        return out

    def _distributed(self) -> bool:
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED

    # -- loading -----------------------------------------------------------------------------
    def _resumed(self, checkpoint: Any) -> dict[str, Any] | None:
        """The loaded checkpoint while ``train`` resumes from one of ckptguard's."""
        if checkpoint is None or self._ckptguard_resume is None:
            return None
        return self._ckptguard_resume[1]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        loaded = self._resumed(resume_from_checkpoint)
        if loaded is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target: Any = self.model if model is None else model
        target.load_state_dict(loaded["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        loaded = self._resumed(checkpoint)
        if loaded is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer: Any = self.optimizer
        if "optimizer" in loaded:
            optimizer.load_state_dict(loaded["optimizer"])
        if "scheduler" in loaded and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(loaded["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        loaded = self._resumed(checkpoint)
        if loaded is None:
            return super()._load_scaler(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in loaded:
            scaler.load_state_dict(loaded["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        loaded = self._resumed(checkpoint)
        if loaded is None:
            return super()._load_rng_state(checkpoint)
        if "rng" in loaded:
            cstate.set_rng_state(loaded["rng"], self._distributed())

    def _load_best_model(self) -> None:
        """The best checkpoint's weights into the model (the Trainer's own loader for a
        checkpoint of its format)."""
        best = self.state.best_model_checkpoint
        if best is None or not cstate.is_checkpoint(best):
            return super()._load_best_model()
        score = self.state.best_metric
        logger.info("Loading best model from %s (score: %s)", best, score)
        model: Any = self.model
        model.load_state_dict(self._load_checkpoint(best)["model"])


class Trainer(CheckpointMixin, transformers.Trainer):
    """``transformers.Trainer`` saving and resuming through ckptguard (``CheckpointMixin``)."""
