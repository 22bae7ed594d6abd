"""``ckptguard latest STORE``: the absolute path of a store's LATEST checkpoint, for scripts."""

from __future__ import annotations

import os
import warnings

import click

import ckptguard

from ._output import CheckFailed, echo


@click.command("latest")
@click.argument("store")
@click.option(
    "--skip-failed-validation",
    is_flag=True,
    help="If LATEST failed validation, the newest checkpoint before it that did not (as "
    "ckptguard.load(store, skip_failed_validation=True) chooses).",
)
def command(store: str, skip_failed_validation: bool) -> None:
    """Print the absolute path of STORE's LATEST checkpoint.

    Exits 1, with a message on stderr, if there is none (or no STORE): start fresh then. With
    --skip-failed-validation, also when every checkpoint up to LATEST failed validation.
    """
    if not os.path.isdir(store):
        info = None
    elif skip_failed_validation:
        from ckptguard.validation import latest_valid

        with warnings.catch_warnings(record=True) as caught:  # what was skipped: one line each
            warnings.simplefilter("always", ckptguard.CheckpointWarning)
            try:
                info = latest_valid(store)
            except ckptguard.ValidationFailedError as exc:
                echo(str(exc), err=True)
                raise CheckFailed from None
            finally:
                for w in caught:
                    echo(f"warning: {w.message}", err=True)
    else:
        info = ckptguard.Store(store).latest()
    if info is None:
        echo(f"no committed checkpoint in {store}", err=True)
        raise CheckFailed
    echo(os.path.abspath(info.path))
