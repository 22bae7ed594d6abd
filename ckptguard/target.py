"""Where a save's files go and how they become visible: a checkpoint directory in a store
(``DIRECTORY``); ``filesave.FileTarget`` is the other, a one-file checkpoint."""

from __future__ import annotations

import os

import pyarrow as pa

from . import commit, sign
from .coord import Coordinator
from .failpoints import failpoint
from .format.layout import datafile_name
from .format.manifest import CheckpointInfo
from .readonly import FILE_MODE


class Target:
    """Where a save's files go and how they become visible. This class: a checkpoint directory
    ``<store>/<name>``, staged in ``<store>/.staging`` and committed by ``commit.publish``;
    ``filesave.FileTarget``: a one-file checkpoint. Rank 0 calls every method but ``data_path``.
    ``announce``: whether the commit hooks hear of the commit (``hooks``). ``data_mode``: the
    permission bits each rank's writer gives its data file before its fsync (``writer``), None
    to leave them as created. A checkpoint directory's are 0444 (committed files are read-only):
    ``commit.publish`` then seals only rank 0's own files, without listing the directory.
    """

    announce = True
    data_mode: int | None = FILE_MODE

    def open(self, store: str, name: str, overwrite: bool) -> tuple[str, str]:
        """Check what is at the target, then create the staging area: (uuid, its path)."""
        commit.check_target(os.path.join(store, name), overwrite)
        failpoint("save.start")
        uid, staging = commit.new_staging(store, name)
        failpoint("save.staging_created")
        return uid, staging

    def describe(self) -> dict:
        """What this rank tells rank 0 of itself for the plan (its ``nodes`` member)."""
        return {}

    def rank_staging(self, store: str, name: str, plan: dict, rank: int, overwrite: bool) -> str:
        """The staging directory rank ``rank`` writes into: the one rank 0 created."""
        return plan["staging"]

    def data_path(self, staging: str, rank: int) -> str:
        """Where rank ``rank`` writes its data file."""
        return os.path.join(staging, datafile_name(rank))

    def write_index(self, staging: str, table: pa.Table) -> dict:
        """Store the index; return the manifest's ``index`` member."""
        return commit.write_index(staging, table)

    def publish(
        self,
        store: str,
        name: str,
        staging: str,
        body: dict,
        overwrite: bool,
        deadline: float | None,
        signer: sign.PrivateKey | None = None,
    ) -> CheckpointInfo:
        """Commit: make the staged checkpoint visible under its name (signed by ``signer``)."""
        return commit.publish(
            store, name, staging, body, overwrite=overwrite, deadline=deadline, signer=signer
        )

    def settle(self, coord: Coordinator, outcome: dict, timeout: float) -> dict:
        """What every rank returns after rank 0's commit (``outcome``): rank 0 published."""
        return outcome

    def cleanup(self, rank: int, staging: str | None) -> None:
        """After a failed save, on every rank: rank 0 removes what it staged."""
        if rank == 0 and staging:
            self.discard(staging)

    def discard(self, staging: str) -> None:
        """Remove what a save that did not commit staged."""
        if os.path.isdir(staging):
            commit.discard_staging(staging)


DIRECTORY = Target()
