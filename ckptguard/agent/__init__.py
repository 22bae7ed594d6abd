"""The per-rank agent of ``ckptguard run`` and the trainer's side of it (docs/agent.md).

``client`` is what a trainer (or library code) imports: ``checkpoint_requested``,
``on_checkpoint_request`` and ``notify_committed``, all harmless without an agent. ``runner`` is the
agent itself; it is imported only by the ``ckptguard run`` command. This package's ``__init__``
imports nothing, so that importing the client stays cheap.
"""
