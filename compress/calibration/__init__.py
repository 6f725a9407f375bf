"""One calibration engine: observers with one update / all_reduce protocol (observers.py) and
the driver that feeds them module inputs, real tokens only (driver.py)."""
from lathe.compress.calibration.driver import observe, real_tokens, run_batches, token_mask  # noqa: F401
from lathe.compress.calibration.observers import (GRANULARITIES, METHODS, AbsMaxObserver,  # noqa: F401
                                                  ChannelSum, HistogramObserver, MinMaxObserver, Observer,
                                                  RowSample, Scaled, make_observer, smoothquant_scales)


def observe_inputs(model, names, batches, progress=None) -> dict:
    """Per-channel |x| max of the input of each module in `names`, over `batches`
    (a list of dicts of model inputs)."""
    obs = observe(model, {n: [AbsMaxObserver()] for n in names}, batches, progress)
    return {n: o[0].all_reduce().amax for n, o in obs.items()}
