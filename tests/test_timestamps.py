"""Times on the wire: the service's own Timestamp conversion agrees with protobuf's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from service.transport.convert import timestamp

_ZONES = st.one_of(
    st.none(),
    st.just(UTC),
    st.integers(min_value=-23 * 60, max_value=23 * 60).map(
        lambda minutes: timezone(timedelta(minutes=minutes))
    ),
)


@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    _ZONES,
)
def test_timestamp_matches_protobufs_own_conversion(moment: datetime, zone: timezone | None) -> None:
    value = moment if zone is None else moment.replace(tzinfo=zone)
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected


def test_a_missing_time_stays_unset() -> None:
    assert timestamp(None) is None
