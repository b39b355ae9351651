"""How failed jobs are logged: user errors quietly, bugs loudly with their traceback."""

from __future__ import annotations

import logging

from napari_bulbseg.errors import InputError, log_failure

LOG = logging.getLogger("napari_bulbseg.test_errors")


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as e:
        return e


def test_unexpected_errors_are_logged_as_errors_with_traceback(caplog):
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    log_failure(LOG, _raised(ZeroDivisionError("boom")), "prediction")
    (rec,) = caplog.records
    assert rec.levelno == logging.ERROR and "prediction failed: boom" in rec.getMessage()
    assert rec.exc_info is not None and rec.exc_info[2] is not None  # the traceback


def test_user_errors_and_memory_are_not_errors(caplog):
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    log_failure(LOG, _raised(InputError("bad file", "pick another")))
    log_failure(LOG, _raised(MemoryError()))
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.WARNING]
