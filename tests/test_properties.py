"""Property-based: random configs and random corpus bytes never end in an uncaught exception."""

import string

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
