"""Optional integrations with other libraries, each behind its own import."""

import contextlib
import logging

# torchao, when installed, is imported by transformers' quantizer registry; it logs a warning
# for each CUDA-only library it cannot load on a CPU-only torch, and torch warns about its enums
TORCHAO_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torchao():
    loggers = [logging.getLogger(n) for n in TORCHAO_LOGGERS]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
