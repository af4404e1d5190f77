import json

import pytest
from conftest import metrics, run_torchrun, tiny_overrides, write_config


def _batches(run_dir, rank):
    return [json.loads(x) for x in (run_dir / "batches" / f"rank-{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_two_processes_disjoint_batches(tmp_path, corpus):
    run = tmp_path / "ddp"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_overrides(
            run, corpus, **{"train.max_steps": 4, "log.batches": True, "parallel.strategy": "ddp"}
        ),
    )
    r = run_torchrun(2, ["train", "--config", str(cfg)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "strategy ddp, 2 process(es)" in r.stdout
    b0, b1 = _batches(run, 0), _batches(run, 1)
    assert len(b0) == len(b1) == 4
    for x, y in zip(b0, b1):
        assert x["step"] == y["step"]
        assert not set(x["samples"]) & set(y["samples"])
        assert x["sha"] != y["sha"]
    recs = metrics(run)
    assert [m["step"] for m in recs] == [1, 2, 3, 4]  # rank 0 only writes
    assert recs[-1]["tokens"] == 4 * 2 * 4 * 64
