"""The benchmark's results: the echo baseline, both ratios, the revocation delays, the printed
tables and the JSON summary."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import grpc

from tests.bench.delivery import Delivery
from tests.bench.load import Load, Result
from tests.bench.security import Flood, render_floods

REVOCATION_POLL_SECONDS = 0.01
# Replicas follow each other through LISTEN/NOTIFY on PostgreSQL and a revision poll this often on
# SQLite (the servers' defaults); revocation rounds start at a random phase against it.
SQLITE_POLL_SECONDS = 0.05
ECHO_DRIFT_WARNING = 0.2
# VerifyApiKey beside four writers of its organization, as a fraction of VerifyApiKey alone.
TARGET_UNDER_WRITES = 0.8
REFERENCE_NOTE = (
    "team reference (grpcio 1.85, 2 cores): one DB read per call via SQLAlchemy+aiosqlite = 0.22x"
)


@dataclass
class Revocation:
    """Milliseconds from a revoke acknowledged by replica A to replica B refusing the key."""

    delays_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None

    def as_json(self) -> dict[str, object]:
        """A JSON-ready summary."""
        summary: dict[str, object] = {
            "skipped": self.skipped,
            "delays_ms": [round(d, 1) for d in self.delays_ms],
            "problems": self.problems,
        }
        if self.delays_ms:
            summary |= {
                "min_ms": round(min(self.delays_ms), 1),
                "median_ms": round(statistics.median(self.delays_ms), 1),
                "p99_ms": round(percentile(self.delays_ms, 0.99), 1),
                "max_ms": round(max(self.delays_ms), 1),
            }
        return summary


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class Baseline:
    """The bare echo's figures that every ratio divides by: the mean of its runs."""

    calls_per_second: float
    server_us_per_call: float | None

    @classmethod
    def of(cls, *echoes: Result) -> Baseline:
        """The mean of the echo runs' throughput and server CPU per call."""
        cpu = [e.server_cpu_us_per_call for e in echoes]
        known = [value for value in cpu if value is not None]
        return cls(
            statistics.mean(e.calls_per_second for e in echoes),
            statistics.mean(known) if len(known) == len(cpu) else None,
        )

    def throughput_ratio(self, result: Result) -> float | None:
        """Calls/s relative to the echo (higher is better)."""
        if result.skipped or not self.calls_per_second:
            return None
        return result.calls_per_second / self.calls_per_second

    def cpu_ratio(self, result: Result) -> float | None:
        """Echo's server CPU per call over this scenario's: the throughput ratio one would see if
        the server alone, not the shared cores or the load client, set the pace."""
        own = result.server_cpu_us_per_call
        if result.skipped or not own or self.server_us_per_call is None:
            return None
        return self.server_us_per_call / own

    def annotate(self, result: Result) -> dict[str, object]:
        """The result's JSON summary with both ratios."""
        throughput, cpu = self.throughput_ratio(result), self.cpu_ratio(result)
        return result.as_json() | {
            "ratio_vs_echo": None if throughput is None else round(throughput, 3),
            "cpu_ratio_vs_echo": None if cpu is None else round(cpu, 3),
        }


@dataclass
class UnderWrites:
    """VerifyApiKey alone and then beside writers of its organization, back to back on one
    server (after the write rows, so both see the same database), and the writers' own rate."""

    alone: Result
    under: Result
    writes: Result

    @property
    def ratio(self) -> float | None:
        """VerifyApiKey's throughput while the writes go on, against it alone just before."""
        alone = self.alone.calls_per_second
        if self.under.skipped or not alone:
            return None
        return round(self.under.calls_per_second / alone, 3)

    def _per_write(self, verifications_per_second: float) -> float | None:
        """Verifications per second, counted per write the writers made in the same time."""
        writes = self.writes.calls_per_second
        if self.under.skipped or not writes:
            return None
        return round(verifications_per_second / writes, 2)

    @property
    def displaced(self) -> float | None:
        """How many verifications each write took the place of: what the writes cost the reads,
        counted in reads (the target, 0.8x alone, allows `allowed` of them)."""
        return self._per_write(self.alone.calls_per_second - self.under.calls_per_second)

    @property
    def allowed(self) -> float | None:
        """The most verifications a write may displace, at the writers' rate, for 0.8x alone."""
        return self._per_write((1 - TARGET_UNDER_WRITES) * self.alone.calls_per_second)

    @property
    def results(self) -> list[Result]:
        """Every row measured."""
        return [self.alone, self.under, self.writes]


@dataclass
class Report:
    """Everything one run measured."""

    backend: str
    load: Load
    echo_first: Result
    echo_last: Result
    reads: list[Result]
    writes: list[Result]
    under_writes: UnderWrites | None
    channel_results: list[Result]
    revocation: Revocation
    floods: list[Flood] = field(default_factory=list)
    # Each read scenario with metrics off (replica A) and right after with metrics on.
    metrics_pairs: list[tuple[Result, Result]] = field(default_factory=list)
    delivery: Delivery = field(default_factory=Delivery)

    @property
    def baseline(self) -> Baseline:
        """The mean of the first and last echo runs: the 1.0 of every ratio."""
        return Baseline.of(self.echo_first, self.echo_last)

    @property
    def channel_baseline(self) -> Baseline | None:
        """The echo on several channels, the 1.0 of the multi-channel rows."""
        return Baseline.of(self.channel_results[0]) if self.channel_results else None

    def as_json(self) -> dict[str, object]:
        """A JSON-ready summary of the run."""
        baseline, channel_baseline = self.baseline, self.channel_baseline
        return {
            "environment": environment_facts(),
            "backend": self.backend,
            "load": vars(self.load),
            "echo_baseline": vars(baseline),
            "scenarios": [baseline.annotate(r) for r in (self.echo_first, *self.reads, self.echo_last)],
            "write_path": [baseline.annotate(result) for result in self.writes],
            "verify_under_writes": None
            if self.under_writes is None
            else {
                "alone": baseline.annotate(self.under_writes.alone),
                "under": baseline.annotate(self.under_writes.under),
                "writes": baseline.annotate(self.under_writes.writes),
                "x_alone": self.under_writes.ratio,
                "verifications_displaced_per_write": self.under_writes.displaced,
                "displaced_allowed_for_target": self.under_writes.allowed,
            },
            "multi_channel": [channel_baseline.annotate(r) for r in self.channel_results]
            if channel_baseline
            else [],
            "revocation": self.revocation.as_json(),
            "event_delivery": self.delivery.as_json(),
            "floods": [flood.as_json() for flood in self.floods],
            "metrics_on_vs_off": [MetricsCost(off, on).as_json() for off, on in self.metrics_pairs],
        }


@dataclass(frozen=True)
class MetricsCost:
    """One read scenario with metrics off and, right after, on."""

    off: Result
    on: Result

    @property
    def skipped(self) -> str | None:
        """Why either run did not happen."""
        return self.off.skipped or self.on.skipped

    @property
    def throughput_ratio(self) -> float | None:
        """Calls/s with metrics on over off: 1.0 is free, lower costs more."""
        if self.skipped or not self.off.calls_per_second:
            return None
        return self.on.calls_per_second / self.off.calls_per_second

    @property
    def cpu_ratio(self) -> float | None:
        """Server CPU per call off over on: 1.0 is free, lower costs more."""
        off, on = self.off.server_cpu_us_per_call, self.on.server_cpu_us_per_call
        return off / on if off and on and not self.skipped else None

    def as_json(self) -> dict[str, object]:
        """A JSON-ready summary."""
        throughput, cpu = self.throughput_ratio, self.cpu_ratio
        off_us, on_us = self.off.server_cpu_us_per_call, self.on.server_cpu_us_per_call
        return {
            "name": self.off.name,
            "skipped": self.skipped,
            "off_calls_per_second": round(self.off.calls_per_second, 1),
            "on_calls_per_second": round(self.on.calls_per_second, 1),
            "throughput_ratio": None if throughput is None else round(throughput, 3),
            "off_server_us_per_call": None if off_us is None else round(off_us, 1),
            "on_server_us_per_call": None if on_us is None else round(on_us, 1),
            "cpu_ratio": None if cpu is None else round(cpu, 3),
        }


def environment_facts() -> dict[str, object]:
    """When and on what the numbers were taken."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }


# -- printing ----------------------------------------------------------------------------------

HEADER = (
    f"{'scenario':<37} {'calls/s':>8} {'x echo':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7}"
    f" {'srv us/call':>11} {'x echo cpu':>10} {'client cpu':>10}"
)


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def _row(result: Result, baseline: Baseline) -> str:
    if result.skipped:
        return f"{result.name:<37} skipped: {result.skipped}"
    errors = f"{result.error_count}{' !' if result.error_count else ''}"
    return (
        f"{result.name:<37} {result.calls_per_second:>8,.0f} {_number(baseline.throughput_ratio(result), '.2f'):>6}"
        f" {result.percentile_ms(0.5):>7.2f} {result.percentile_ms(0.99):>7.2f} {errors:>7}"
        f" {_number(result.server_cpu_us_per_call, '.0f'):>11} {_number(baseline.cpu_ratio(result), '.2f'):>10}"
        f" {result.client_cpu_share:>10.0%}"
    )


def _error_lines(results: list[Result]) -> Iterator[str]:
    for result in results:
        if result.error_count:
            details = ", ".join(f"{code} x{count}" for code, count in result.errors.most_common())
            yield f"  ! {result.name}: {details}"


def render(report: Report) -> str:
    """The report as printed tables."""
    facts = environment_facts()
    load = report.load
    lines = [
        f"AgentPost Environments benchmark, {facts['date']}",
        f"python {facts['python']}, grpcio {facts['grpcio']}, {facts['cores']} cores ({facts['machine']}), "
        f"load average {_number(cast('float | None', facts['load_average_1m']), '.2f')} at the end, backend {report.backend}",
        f"load: {load.concurrency} workers on {load.channels} channel(s), {load.warmup:g} s warm-up "
        f"+ {load.duration:g} s measured per scenario; 1.0 = mean echo "
        f"{report.baseline.calls_per_second:,.0f} calls/s (first {report.echo_first.calls_per_second:,.0f}, "
        f"last {report.echo_last.calls_per_second:,.0f})",
        "",
        HEADER,
        "-" * len(HEADER),
    ]
    first, last = report.echo_first.calls_per_second, report.echo_last.calls_per_second
    drift = abs(first - last) / max(first, last, 1.0)
    if drift > ECHO_DRIFT_WARNING:
        lines[3:3] = [
            f"! the two echo runs differ by {drift:.0%}: something else used the cores during the run;"
            " throughput ratios are unreliable, the server-CPU ratio ('x echo cpu') much less so"
        ]
    baseline = report.baseline
    main_rows = [report.echo_first, *report.reads, report.echo_last]
    lines += [_row(result, baseline) for result in main_rows]
    seconds = report.writes[0].seconds if report.writes else 0
    lines += [
        "",
        f"write path ({seconds:g} s measured each; the other replicas stopped, as for the next row):",
    ]
    lines += [_row(result, baseline) for result in report.writes]
    if report.under_writes is not None:
        under = report.under_writes
        lines += [
            "",
            "reads while writes go on (the same organization; alone measured just before, on the same server):",
            _row(under.alone, baseline),
            _row(under.under, baseline) + f"   = {_number(under.ratio, '.2f')}x alone",
            _row(under.writes, baseline),
            f"  each write took the place of {_number(under.displaced, '.1f')} verifications"
            f" ({TARGET_UNDER_WRITES:g}x alone allows {_number(under.allowed, '.1f')} at this write rate);"
            f" event-loop thread busy {_number(under.alone.loop_cpu_share, '.2f')} of a core alone,"
            f" {_number(under.under.loop_cpu_share, '.2f')} with the writes",
        ]
    if report.channel_baseline is not None:
        multi_echo = report.channel_baseline
        lines += [
            "",
            f"{report.channel_results[0].channels} channels (1.0 = echo on {report.channel_results[0].channels} channels):",
        ]
        lines += [_row(result, multi_echo) for result in report.channel_results]
    metered = [on for _, on in report.metrics_pairs]
    if report.metrics_pairs:
        lines += [
            "",
            "metrics on vs off (each read scenario interleaved off, on, on, off with a replica that has"
            " Prometheus metrics on; target on/off >= 0.95):",
            f"{'scenario':<37} {'off/s':>8} {'on/s':>8} {'on/off':>6} {'off us':>7} {'on us':>7} {'cpu off/on':>10}",
        ]
        for off, on in report.metrics_pairs:
            cost = MetricsCost(off, on)
            if cost.skipped:
                lines.append(f"{off.name:<37} skipped: {cost.skipped}")
                continue
            lines.append(
                f"{off.name:<37} {off.calls_per_second:>8,.0f} {on.calls_per_second:>8,.0f}"
                f" {_number(cost.throughput_ratio, '.2f'):>6}"
                f" {_number(off.server_cpu_us_per_call, '.0f'):>7} {_number(on.server_cpu_us_per_call, '.0f'):>7}"
                f" {_number(cost.cpu_ratio, '.2f'):>10}"
            )
    extra = report.under_writes.results if report.under_writes is not None else []
    lines += list(_error_lines([*main_rows, *report.writes, *extra, *report.channel_results, *metered]))
    lines += render_floods(report.floods)
    lines += [
        "",
        REFERENCE_NOTE,
        "",
        "revocation across replicas (revoke on A acknowledged -> B refuses the key):",
    ]
    revocation = report.revocation
    if revocation.skipped:
        lines.append(f"  skipped: {revocation.skipped}")
    elif revocation.delays_ms:
        delays = revocation.delays_ms
        lines.append(
            f"  {len(delays)} rounds ({'LISTEN/NOTIFY' if report.backend == 'postgresql' else f'revision poll {SQLITE_POLL_SECONDS * 1000:.0f} ms'}),"
            f" B polled every {REVOCATION_POLL_SECONDS * 1000:.0f} ms: min {min(delays):.0f} ms,"
            f" median {statistics.median(delays):.0f} ms, p99 {percentile(delays, 0.99):.0f} ms, max {max(delays):.0f} ms"
        )
    lines += [f"  ! {problem}" for problem in revocation.problems]
    lines += ["", "event delivery (a write's commit -> a WatchEvents consumer receives its event):"]
    lines += report.delivery.lines()
    return "\n".join(lines)
