"""The system layer: one module per kernel interface, each a thin wrapper
that turns -errno into OSError carrying the call's name. Nothing here
decides anything; the pure core decides and the server shell calls these."""
