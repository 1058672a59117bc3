"""The temperature policy of `simulate` and `refine`, in one place.

Two temperatures matter. The *run* temperature is the thermostat's. The *sampling*
temperature of the reference frames decides whether reference observables are reweighted.
MD17, rMD17 and MD22 files record neither, so the rules are:

* run temperature: the value asked for, else the temperature the dataset records,
  else 500 K (MD17's), with a note;
* sampling temperature of the reference: the value asked for (``--reference-temperature``),
  else the one the reference records, else the run temperature (no reweighting), with a note.

Reweighting happens only between two known temperatures.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Optional

from openmm_stable.errors import InputError

FALLBACK_TEMPERATURE_K = 500.0  # MD17's temperature: the default when a dataset records none


def _positive(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def recorded_temperature(dataset) -> Optional[float]:
    """The sampling temperature (K) a dataset records (``dataset.temperature``, or
    ``metadata["temperature_K"]`` in older files of ours), or None."""
    for value in (getattr(dataset, "temperature", None),
                  (getattr(dataset, "metadata", None) or {}).get("temperature_K")):
        if _positive(value) is not None:
            return _positive(value)
    return None


def _note(message: str, log) -> None:
    print(f"note: {message}", file=log or sys.stderr)


def dataset_temperature(dataset, requested: Optional[float] = None, log=None) -> float:
    """The run temperature (K): `requested`, else the dataset's, else 500 K with a note."""
    if requested is not None:
        if _positive(requested) is None:
            raise InputError(f"temperature must be a positive number of kelvin, got {requested!r}")
        return float(requested)
    recorded = recorded_temperature(dataset)
    if recorded is not None:
        return recorded
    _note(f"{getattr(dataset, 'source', 'the dataset')} records no sampling temperature; simulating at "
          f"{FALLBACK_TEMPERATURE_K:g} K (--temperature chooses another)", log)
    return FALLBACK_TEMPERATURE_K


def with_sampling_temperature(reference, run_temperature_K: float, reference_temperature_K: Optional[float] = None,
                              log=None):
    """`reference` with its sampling temperature settled (a copy when it changes): the one
    asked for, else the recorded one, else `run_temperature_K` with a note."""
    if reference_temperature_K is not None:
        value = _positive(reference_temperature_K)
        if value is None:
            raise InputError(f"reference temperature must be a positive number of kelvin, "
                             f"got {reference_temperature_K!r}")
    else:
        value = recorded_temperature(reference)
        if value is None:
            value = float(run_temperature_K)
            _note(f"{getattr(reference, 'source', 'the reference')} records no sampling temperature; taking its "
                  f"frames as sampled at the run temperature, {value:g} K, without reweighting "
                  "(--reference-temperature states it, e.g. 500 for MD17)", log)
    if getattr(reference, "temperature", None) == value:
        return reference
    return dataclasses.replace(reference, temperature=value)


def settle_temperatures(engine, dataset, reference=None, reference_temperature_K: Optional[float] = None, log=None):
    """(`engine` config with its run temperature set, `reference` with its sampling
    temperature set or None): the two rules above, as `simulate` and `refine` apply them."""
    run_K = dataset_temperature(dataset, engine.temperature_K, log)
    engine = dataclasses.replace(engine, temperature_K=run_K)
    if reference is not None:
        reference = with_sampling_temperature(reference, run_K, reference_temperature_K, log)
    return engine, reference
