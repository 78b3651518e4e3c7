"""cdef for io_uring, reached through Debian's liburing 2.3: only functions
(declared in native/src/native.h); Python needs none of its constants."""

INCLUDES = ""

CDEF = """
"""
