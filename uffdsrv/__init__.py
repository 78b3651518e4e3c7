"""uffdsrv: a user-space memory manager over userfaultfd."""
__version__ = "0.1.0"
