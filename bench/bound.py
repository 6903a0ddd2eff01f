"""The physical lower bound on step time: the busiest resource at its measured peak rate."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.step_time import ssd_busy_s


@dataclass(frozen=True)
class PeakRates:
    """Measured on the machine of the run."""

    matmul_flops_per_s: float
    ssd_read_gbps: float | None  # fio, sequential O_DIRECT, 10^9 bytes/s (None: fio not installed)
    ssd_write_gbps: float | None
    ssd_mixed_gbps: float | None = None  # fio reading and writing at once: both directions together


@dataclass(frozen=True)
class StepBound:
    compute_s: float
    ssd_read_s: float
    ssd_write_s: float
    ssd_mixed_s: float = 0.0  # reads and writes together at the mixed rate (one device serves both)

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.ssd_read_s, self.ssd_write_s, self.ssd_mixed_s)

    @property
    def limiter(self) -> str:
        times = {"compute": self.compute_s, "ssd read": self.ssd_read_s, "ssd write": self.ssd_write_s,
                 "ssd read + write": self.ssd_mixed_s}
        return max(times, key=lambda k: times[k])

    def efficiency(self, achieved_s: float) -> float:
        """bound / achieved: 1.0 means the step runs at the speed of its busiest resource."""
        return self.bound_s / achieved_s if achieved_s > 0 else 0.0


def step_bound(flops: float, read_bytes: float, write_bytes: float, rates: PeakRates) -> StepBound:
    """Each resource's time for one step's work at its peak rate; the bound is the largest (an SSD
    rate not measured bounds nothing). The SSD is one device: a step that reads and writes is
    also bounded by both (``_ssd_both_s``)."""
    return StepBound(compute_s=flops / rates.matmul_flops_per_s,
                     ssd_read_s=read_bytes / (rates.ssd_read_gbps * 1e9) if read_bytes and rates.ssd_read_gbps else 0.0,
                     ssd_write_s=write_bytes / (rates.ssd_write_gbps * 1e9) if write_bytes and rates.ssd_write_gbps
                     else 0.0,
                     ssd_mixed_s=_ssd_both_s(read_bytes, write_bytes, rates))


def _ssd_both_s(read_bytes: float, write_bytes: float, rates: PeakRates) -> float:
    """Seconds of SSD for a step's reads and writes: the bytes that can pair up (as many read as
    written) at the rate fio measured doing both at once, the rest alone at the read or write rate
    (the cost model's rule, ``ssd_busy_s``); never more than reading all, then writing all (a
    lower bound: an engine could order them so). 0 without every rate."""
    r_gbps, w_gbps, m_gbps = rates.ssd_read_gbps, rates.ssd_write_gbps, rates.ssd_mixed_gbps
    if not (read_bytes and write_bytes and r_gbps and w_gbps and m_gbps):
        return 0.0
    return min(sum(ssd_busy_s(read_bytes, write_bytes, r_gbps, w_gbps, m_gbps)),
               read_bytes / (r_gbps * 1e9) + write_bytes / (w_gbps * 1e9))
