"""Dynamics of trajectories: time correlations, mean squared displacement, diffusivity.

Time series are (T, N, 3) or (T, R, N, 3) (T equally spaced time points, R replicas):
every (replica, atom) is treated as one independent particle. Velocities in A/ps,
positions in Angstrom, diffusivities in A^2/ps (times `A2_PER_PS_IN_CM2_PER_S` for
cm^2/s). Two routes to the self-diffusion coefficient, which should agree:

  * Einstein: `unwrap` periodic positions, `mean_squared_displacement`, `diffusivity`
    (slope of the MSD); `molecular_diffusivity` does it for molecular centres of mass;
  * Green-Kubo: `vacf` (or `vacf_over_segments` for replicas of different lengths) of
    `molecular_velocities`, integrated by `green_kubo_diffusivity`.

`simulate` runs the replicas and reports; this module only analyses the series.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from openmm_stable.errors import InputError
from openmm_stable.geometry import ArrayLike, as_tensor, box_tensor, minimum_image

# 1 Angstrom^2/ps = 1e-16 cm^2 / 1e-12 s = 1e-4 cm^2/s.
A2_PER_PS_IN_CM2_PER_S = 1e-4

# Reference velocities saved further apart than this resolve neither a VACF's first minimum
# nor its integral (liquid water: O-H stretch period ~10 fs, molecular VACF minimum ~0.1 ps).
VACF_MAX_REFERENCE_INTERVAL_PS = 0.01


# --- correlation functions and displacements ----------------------------------------------
def _particles(series: ArrayLike, what: str) -> torch.Tensor:
    x = as_tensor(series)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise InputError(f"{what} must have shape (T, N, 3) or (T, R, N, 3), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, 3)


def _autocorrelation_sums(x: torch.Tensor) -> torch.Tensor:
    """S(tau) = sum_t x(t) . x(t + tau) per particle, x (T, M, 3) -> (T, M), via FFT."""
    T = x.shape[0]
    n = 1 << (2 * T - 1).bit_length()
    f = torch.fft.rfft(x, n=n, dim=0)
    return torch.fft.irfft(f * f.conj(), n=n, dim=0)[:T].sum(-1)


def vacf(velocities: ArrayLike, max_lag: Optional[int] = None, normalize: bool = True) -> torch.Tensor:
    """Velocity autocorrelation C(tau) = <v_i(t) . v_i(t + tau)>, lags 0..max_lag.

    velocities (T, N, 3) or (T, R, N, 3) in A/ps, equally spaced in time; averaged over
    all particles and all time origins (O(T log T) with FFT). normalize=True returns
    C(tau)/C(0) (shape only, comparable across temperatures); otherwise A^2/ps^2."""
    v = _particles(velocities, "velocities")
    T = v.shape[0]
    max_lag = T - 1 if max_lag is None else int(max_lag)
    if not 0 <= max_lag < T:
        raise InputError(f"max_lag must be in [0, {T - 1}], got {max_lag}")
    s = _autocorrelation_sums(v.to(torch.float64))[: max_lag + 1].mean(1)
    c = s / torch.arange(T, T - max_lag - 1, -1, dtype=torch.float64, device=v.device)
    if normalize:
        c = c / c[0]
    return c.to(v.dtype)


def unwrap(positions: ArrayLike, box: ArrayLike) -> torch.Tensor:
    """Undo periodic wrapping of a time series (T, ..., 3), for MSD and diffusivity.

    Adds up minimum-image steps between consecutive frames, so atoms must move less than
    half a box width between saved frames. box (3, 3) or per-frame (T, 3, 3)."""
    x = as_tensor(positions)
    flat = x.reshape(x.shape[0], -1, 3)
    b = box_tensor(box, flat)
    if b is not None and b.ndim == 3:
        b = b[1:]
    steps = minimum_image(flat[1:] - flat[:-1], b)
    out = torch.cat([flat[:1], flat[:1] + torch.cumsum(steps, 0)], 0)
    return out.reshape(x.shape)


def mean_squared_displacement(positions: ArrayLike, max_lag: Optional[int] = None) -> torch.Tensor:
    """MSD(tau) = <|x_i(t + tau) - x_i(t)|^2>, lags 0..max_lag, in A^2.

    positions (T, N, 3) or (T, R, N, 3), equally spaced in time and UNWRAPPED (use
    `unwrap` for periodic boxes); averaged over particles and time origins with the FFT
    algorithm, MSD = (S1 - 2 S2) / (T - tau), computed in float64."""
    x = _particles(positions, "positions").to(torch.float64)
    x = x - x.mean(0, keepdim=True)  # shift-invariant; keeps the FFT sums small
    T = x.shape[0]
    max_lag = T - 1 if max_lag is None else int(max_lag)
    if not 0 <= max_lag < T:
        raise InputError(f"max_lag must be in [0, {T - 1}], got {max_lag}")
    sq = (x * x).sum(-1)  # (T, M)
    csum = torch.cat([sq.new_zeros(1, sq.shape[1]), torch.cumsum(sq, 0)], 0)  # csum[k] = sum_{t<k}
    lags = torch.arange(max_lag + 1, device=x.device)
    s1 = csum[T - lags] + (csum[T] - csum[lags])  # sum_{t < T-tau} (|x(t)|^2 + |x(t+tau)|^2)
    s2 = _autocorrelation_sums(x)[: max_lag + 1]
    msd = ((s1 - 2.0 * s2) / (T - lags).unsqueeze(-1).to(x.dtype)).mean(1)
    return msd.clamp_min(0.0).to(as_tensor(positions).dtype)


def diffusivity(
    msd: ArrayLike, dt_ps: float, fit_range: Optional[tuple[float, float]] = None, dim: int = 3
) -> float:
    """Self-diffusion coefficient D in A^2/ps from the Einstein relation MSD = 2 dim D t.

    msd: (L,) values at lags 0..L-1, spaced dt_ps. fit_range (t_start, t_end) in ps picks
    the linear (diffusive) regime for a least-squares line with intercept; the default
    skips the first 20 % (ballistic regime) and uses the rest. Multiply by
    `A2_PER_PS_IN_CM2_PER_S` (1e-4) for cm^2/s."""
    m = as_tensor(msd).to(torch.float64).reshape(-1)
    t = torch.arange(m.numel(), dtype=torch.float64, device=m.device) * dt_ps
    if fit_range is None:
        fit_range = (0.2 * float(t[-1]), float(t[-1]))
    sel = (t >= fit_range[0] - 1e-12) & (t <= fit_range[1] + 1e-12)
    if int(sel.sum()) < 2:
        raise InputError(f"fit_range {fit_range} ps holds fewer than 2 lags of the MSD")
    ts, ms = t[sel], m[sel]
    tc = ts - ts.mean()
    slope = float((tc * (ms - ms.mean())).sum() / (tc * tc).sum())
    return slope / (2.0 * dim)


# --- molecules and replicas ---------------------------------------------------------------
def molecular_diffusivity(positions: np.ndarray, box, dt_ps: float, molecules: np.ndarray, masses: np.ndarray,
                          max_lag: Optional[int] = None) -> float:
    """Self-diffusion coefficient (A^2/ps) of molecular centres of mass from a time series
    (T, N, 3) or (T, R, N, 3) of positions spaced `dt_ps` (wrapped or not).

    The box's own centre-of-mass drift is removed first: a Langevin thermostat does not
    conserve momentum, and in a box of M molecules the whole box diffuses with
    D = kT / (M m gamma), which at 64 waters and 1/ps is as large as water's own D."""
    x = unwrap(torch.as_tensor(positions, dtype=torch.float64), box)
    m = torch.as_tensor(masses, dtype=torch.float64)
    ids = torch.as_tensor(np.asarray(molecules), dtype=torch.long)
    n_mol = int(ids.max()) + 1
    mx = x * m[:, None]
    com = mx.new_zeros(*x.shape[:-2], n_mol, 3).index_add_(-2, ids, mx)
    com = com / m.new_zeros(n_mol).index_add_(0, ids, m)[:, None]
    com = com - (mx.sum(-2) / m.sum())[..., None, :]  # relative to the box's centre of mass
    msd = mean_squared_displacement(com, max_lag)
    return diffusivity(msd, dt_ps)



def molecular_velocities(velocities: np.ndarray, molecules: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """Centre-of-mass velocities (..., M, 3) of the molecules in (..., N, 3) velocities,
    relative to the box's centre-of-mass velocity (see `molecular_diffusivity`)."""
    v = np.asarray(velocities, dtype=np.float64)
    m = np.asarray(masses, dtype=np.float64)
    ids = np.asarray(molecules)
    one_hot = np.zeros((ids.size, int(ids.max()) + 1))
    one_hot[np.arange(ids.size), ids] = m
    momenta = np.einsum("...ni,nm->...mi", v, one_hot)
    com = momenta / one_hot.sum(0)[:, None]
    return com - (momenta.sum(-2) / m.sum())[..., None, :]


def vacf_over_segments(segments: list, max_lag: int) -> np.ndarray:
    """Unnormalised VACF (A^2/ps^2) at lags 0..L averaged over every time origin, particle
    and segment: segments are (T_r, N, 3) velocity series of one spacing (each replica's
    stable part). A segment contributes lags up to half its length; L <= max_lag is the
    longest lag any segment gives."""
    total, count = np.zeros(max_lag + 1), np.zeros(max_lag + 1)
    for v in segments:
        lag = min(max_lag, len(v) // 2)
        if lag < 1:
            continue
        c = vacf(torch.as_tensor(np.asarray(v), dtype=torch.float64), lag, normalize=False).numpy()
        n = len(v) - np.arange(lag + 1)
        total[:lag + 1] += c * n
        count[:lag + 1] += n
    return total[count > 0] / count[count > 0]


def first_minimum(curve: np.ndarray, drop: float = 0.01) -> Optional[int]:
    """Index of the first local minimum of a curve after lag 0 that lies at least `drop`
    x |curve[0]| below curve[0] (so rounding noise on a flat curve is no minimum); None
    if there is none (a curve that only falls, or stays flat)."""
    c = np.asarray(curve, dtype=float)
    for k in range(1, len(c) - 1):
        if c[k] < c[k - 1] and c[k] <= c[k + 1] and c[k] <= c[0] - drop * abs(c[0]):
            return k
    return None


def green_kubo_diffusivity(curve: np.ndarray, dt_ps: float, dim: int = 3) -> float:
    """D = (1/dim) * integral of <v(0).v(t)> dt (trapezoid over the curve's lags), A^2/ps."""
    c = np.asarray(curve, dtype=float)
    return float(dt_ps * (c.sum() - 0.5 * (c[0] + c[-1])) / dim)


def regular_time_step(reference: Any, temperature_K: float) -> Optional[float]:
    """The time step (ps) of a reference trajectory whose dynamics can be compared with a
    run at `temperature_K`: regularly spaced times (to 0.1 %) at the same temperature (or
    none recorded); None otherwise. Dynamics cannot be reweighted to another temperature."""
    if reference is None or reference.times is None or len(reference) < 2:
        return None
    steps = np.diff(reference.times)
    same_t = reference.temperature is None or abs(reference.temperature - temperature_K) < 1e-6
    if not (same_t and np.allclose(steps, steps[0], rtol=1e-3, atol=0)):
        return None
    return float(steps[0])
