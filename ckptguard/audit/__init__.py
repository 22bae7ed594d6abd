"""A store's tamper-evident audit log (docs/audit.md, normative; docs/security.md).

``STORE/.audit/`` holds append-only entries (canonical JSON lines: who did what to which
checkpoint, when), an RFC 6962 Merkle tree over them whose heads are signed with an Ed25519 key
where the store has one, and a copy of each new head in a witness directory elsewhere. A store
without ``.audit/config.json`` (``ckptguard audit init``) is not audited and behaves as if this
package did not exist.

``append`` (entries sealed under the lock), ``init``, ``note`` (an append after an operation's
commit point: a failure becomes a warning message) and ``enabled``: append.py and files.py.
``verify``, ``read``, ``inclusion``, ``consistency``: verify.py. ``merkle``: the tree and its
proofs.
"""

from __future__ import annotations

from .append import KEY_ENV, Appended, append, init, note, read_witness, write_witness
from .files import AUDIT_DIR, WITNESS_SUBDIR, enabled, witness_name
from .verify import AuditLog, AuditReport, consistency, head_from_file, inclusion, read, verify

__all__ = [
    "AUDIT_DIR",
    "KEY_ENV",
    "WITNESS_SUBDIR",
    "Appended",
    "AuditLog",
    "AuditReport",
    "append",
    "consistency",
    "enabled",
    "head_from_file",
    "inclusion",
    "init",
    "note",
    "read",
    "read_witness",
    "verify",
    "witness_name",
    "write_witness",
]
