"""Virtual time: device profiles (compute speed, bandwidths, latency) and the rounds decided on them.

With `clock=virtual` a client's duration is simulated, never slept: download(broadcast bytes) +
compute(samples it processes) + upload(update bytes). Deadlines, quorum, late clients and over-selection
are decided from these durations in the driver, so the same seed gives the same run on any machine and
on every runtime (FedScale's approach: Lai et al. 2022, "FedScale: Benchmarking Model and System
Performance of Federated Learning at Scale").
"""

from raypfl.clock.profiles import TRACE_COLUMNS, DeviceProfiles, build_profiles, read_trace
from raypfl.clock.timing import VirtualClock, client_samples, close_round, upload_bytes

__all__ = [
    "TRACE_COLUMNS",
    "DeviceProfiles",
    "VirtualClock",
    "build_profiles",
    "client_samples",
    "close_round",
    "read_trace",
    "upload_bytes",
]
