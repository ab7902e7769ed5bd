"""Device profiles: each client's compute speed, download and upload bandwidth and latency."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypfl import seeding
from raypfl.config import ClockSpec
from raypfl.errors import ConfigError

#: The columns of a device trace (`clock.trace`), one row per device; row i is client i's device, and a
#: trace with fewer rows than clients is reused cyclically (client c gets row c mod rows).
TRACE_COLUMNS = ("compute_sps", "down_mbps", "up_mbps", "latency_s")

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfiles:
    """Per-client device speeds: training samples/s, bytes/s down and up, seconds of latency per transfer."""

    compute_sps: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray
    latency_s: np.ndarray

    def __len__(self) -> int:
        return len(self.compute_sps)

    def duration(self, client: int, samples: int, down_bytes: int, up_bytes: int) -> float:
        """Seconds from the broadcast to the server holding the update: download + compute + upload."""
        down = self.latency_s[client] + down_bytes / self.down_bps[client]
        up = self.latency_s[client] + up_bytes / self.up_bps[client]
        return float(down + samples / self.compute_sps[client] + up)


def build_profiles(spec: ClockSpec, num_clients: int, seed: int) -> DeviceProfiles:
    """The federation's profiles: read from `clock.trace`, else drawn (seeded) from lognormal distributions
    around the configured medians (FedScale-style heterogeneity: speeds spread over orders of magnitude)."""
    if spec.trace:
        return read_trace(spec.trace, num_clients)
    rng = seeding.rng(seed, seeding.DEVICE)
    draws = rng.lognormal(0.0, 1.0, size=(3, num_clients))  # one stream: compute, down, up
    return DeviceProfiles(
        compute_sps=spec.compute_sps * np.exp(spec.compute_sigma * np.log(draws[0])),
        down_bps=spec.down_mbps * MBIT * np.exp(spec.bandwidth_sigma * np.log(draws[1])),
        up_bps=spec.up_mbps * MBIT * np.exp(spec.bandwidth_sigma * np.log(draws[2])),
        latency_s=np.full(num_clients, spec.latency_s),
    )


def read_trace(path: str | Path, num_clients: int) -> DeviceProfiles:
    """Profiles from a CSV with the columns `TRACE_COLUMNS` (extra columns are ignored); ConfigError naming
    `clock.trace` for a missing file or column, or a value that is not a positive number (latency >= 0)."""
    key = f"clock.trace={path}"
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read it ({exc.strerror or exc})") from None
    missing = [c for c in TRACE_COLUMNS if c not in header]
    if missing:
        raise ConfigError(
            f"{key}: missing column(s) {', '.join(missing)}; a trace has {', '.join(TRACE_COLUMNS)}"
        )
    if not rows:
        raise ConfigError(f"{key}: no rows")
    values = {c: np.empty(len(rows)) for c in TRACE_COLUMNS}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        for column in TRACE_COLUMNS:
            text = (row.get(column) or "").strip()
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{key}: line {line}: {column}={text!r} is not a number") from None
            low_ok = value >= 0 if column == "latency_s" else value > 0
            if not (math.isfinite(value) and low_ok):
                bound = ">= 0" if column == "latency_s" else "> 0"
                raise ConfigError(f"{key}: line {line}: {column}={text} must be {bound}")
            values[column][line - 2] = value
    pick = np.arange(num_clients) % len(rows)
    return DeviceProfiles(
        compute_sps=values["compute_sps"][pick],
        down_bps=values["down_mbps"][pick] * MBIT,
        up_bps=values["up_mbps"][pick] * MBIT,
        latency_s=values["latency_s"][pick],
    )
