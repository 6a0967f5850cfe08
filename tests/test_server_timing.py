"""serve/server_timing.py: the header the Ingress writes reads back as it was measured."""

from serve.server_timing import ServerTiming, parse_server_timing


def test_marks_and_added_durations_round_trip_through_the_header():
    timing = ServerTiming()
    timing.mark("read")
    timing.add("classifier-batch", 41.25)
    parsed = parse_server_timing(timing.header())
    assert list(parsed) == ["read", "classifier-batch"]
    assert parsed["read"] >= 0 and parsed["classifier-batch"] == 41.2


def test_other_servers_headers_parse_and_malformed_entries_are_left_out():
    header = 'cache;desc="Cache Read";dur=23.2, db;dur=53, app;dur=x, missedCache, total;dur="7"'
    assert parse_server_timing(header) == {"cache": 23.2, "db": 53.0, "total": 7.0}
