"""Checker: durable execution by memory checkpointing.

Inside a job, use the SDK functions exported here::

    import checker

    settings = checker.params()
    ...
    result = checker.checkpoint()
    if result.restored:
        reconnect()
    ...
    checker.exit({"rows": 42})

This module imports only the standard library, so jobs can use it anywhere.
"""

from checker import sdk as _sdk
from checker.sdk import *  # noqa: F401,F403 - the SDK's public names, listed once in checker.sdk.__all__

__all__ = list(_sdk.__all__)
__version__ = "0.1.0"
