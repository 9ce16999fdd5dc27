"""The ``mta`` command line: a thin layer over the library."""
