"""Node-local checkpoints that survive the loss of a node: partner copies and XOR parity.

``sets`` says which node protects which (failure domains apart), ``parity`` is the XOR code of a
set, ``payload`` reads a node's files as one byte string and writes a lost node's back, and
``exchange`` moves the bytes between nodes over MPI, block by block, within deadlines.
"""
