"""Property-based: random configs and random corpus bytes never end in an uncaught exception."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flame.config import all_keys, load_config
from flame.errors import ConfigError, DataError

KEYS = all_keys()
values = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "", "auto", "none", "fsdp", "cosine", "byte", "[]", "{}", '{"a": 1}']),
    st.text(string.printable, max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_lowercase + "._-", min_size=1, max_size=20))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, values), max_size=6))
def test_random_cli_configs(pairs):
    argv = []
    for k, v in pairs:
        argv += [f"--{k}", v]
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        return
    assert cfg.data.context_len > 0 and cfg.optim.lr > 0


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(KEYS),
        st.one_of(
            st.integers(),
            st.floats(),
            st.booleans(),
            st.text(max_size=8),
            st.lists(st.text(max_size=4), max_size=3),
        ),
        max_size=6,
    )
)
@pytest.mark.slow
def test_random_toml_values(d):
    try:
        load_config(overrides=d)
    except ConfigError as e:
        assert e.problems


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=3000),
    suffix=st.sampled_from([".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"]),
)
def test_random_corpus_bytes(tmp_path_factory, data, suffix):
    from flame.data.prepare import prepare

    d = tmp_path_factory.mktemp("c")
    f = d / f"corpus{suffix}"
    f.write_bytes(data)
    try:
        manifest = prepare([str(f)], "byte", str(d / "store"), workers=1, progress=False)
    except DataError as e:
        assert e.message
        return
    assert manifest["num_tokens"] >= 0


EDGES = ["nan", "inf", "-inf", "1e30", "-1e30", "0", "-1", "1e-300", "9223372036854775808"]


def _numeric_keys():
    from flame.config import _SECTION_TYPES, _field_types

    return [
        f"{s}.{n}"
        for s, cls in _SECTION_TYPES.items()
        for n, t in _field_types(cls).items()
        if t in (int, float)
    ]


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_numeric_keys()), st.sampled_from(EDGES)), min_size=1, max_size=4))
def test_numbers_at_the_edges(pairs):
    """Every numeric knob at NaN, infinities, huge, zero and negative values: a ConfigError, or a
    config whose numbers are all finite and within bounds."""
    import math

    from flame.config import _SECTION_TYPES, INT_BOUNDS, _field_types

    argv = [x for k, v in pairs for x in (f"--{k}", v)]
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        return
    for s, cls in _SECTION_TYPES.items():
        for n, t in _field_types(cls).items():
            v = getattr(getattr(cfg, s), n)
            if t is float:
                assert math.isfinite(v), (s, n, v)
            elif t is int:
                assert abs(v) <= INT_BOUNDS.get(f"{s}.{n}", 1 << 62), (s, n, v)


markers = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(
        st.text(max_size=6),
        st.one_of(
            st.integers(),
            st.text(max_size=4),
            st.dictionaries(st.sampled_from(["size", "sha256"]), st.integers()),
        ),
        max_size=3,
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(markers.map(lambda m: {"files": m}), markers), st.booleans())
def test_damaged_complete_markers_are_a_verdict_not_a_crash(tmp_path_factory, marker, as_json):
    """Any COMPLETE content (JSON of any shape, or bytes that are not JSON) makes `verify` return
    a reason or None, never raise; a listed file outside the checkpoint is never trusted."""
    import json

    from flame.checkpoint import verify

    d = tmp_path_factory.mktemp("ckpt")
    (d / "COMPLETE").write_text(json.dumps(marker) if as_json else str(marker) + "\x00{")
    got = verify(d)
    assert got is None or (isinstance(got, str) and got)
    if got is None:  # only an empty file list of a well-formed marker verifies here
        assert isinstance(marker, dict) and marker.get("files") == {}
