"""A handler module that cannot import on a worker: what a job with a missing dependency looks like."""

from no_such_module_of_the_tests import double  # noqa: F401  (the point: it does not exist)
