"""TensorBoard and W&B get every number of metrics.jsonl (train and eval, per-source fields too) and
the run's resolved config, on real tiny CPU runs read back from the files the sinks wrote."""

import json
import math
import tomllib
from pathlib import Path

import pytest
from conftest import LOREM, metrics, tiny_overrides

from flame.config import load_config
from flame.logging import sink_scalars
from flame.trainer import run_training

# what TensorBoard could not show before every field went to the sinks
WANTED = ("tokens", "epoch", "data_wait", "memory_gib", "tokens_per_s_per_device", "elapsed_s", "eta_s")


def _records(run_dir):
    return metrics(run_dir)


def _same(a: float, b: float, rel: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=rel, abs=1e-30)


def test_sink_scalars_flattens_sources_and_skips_what_is_not_a_number():
    rec = {
        "kind": "train",
        "step": 7,
        "time": 1.7e9,
        "loss": 2.5,
        "tokens": 1024,
        "mfu": None,  # unknown peak
        "resumed": True,
        "flops_source": "measured",
        "grad_norm": float("nan"),
        "sources": {
            "web": {"loss": 2.0, "tokens": 700, "share": 0.7, "target_share": 0.7},
            "code": {"loss": 3.0, "tokens": 300, "share": 0.3, "target_share": 0.3},
        },
        "extra": {"a": 1, "b": {"c": 2.0}},
    }
    out = sink_scalars(rec)
    nan = out.pop("train/grad_norm")
    assert math.isnan(nan)  # kept: a NaN loss or gradient is what a user most needs to see
    assert out == {
        "train/loss": 2.5,
        "train/tokens": 1024,
        "train/loss/web": 2.0,
        "train/tokens/web": 700,
        "train/share/web": 0.7,
        "train/target_share/web": 0.7,
        "train/loss/code": 3.0,
        "train/tokens/code": 300,
        "train/share/code": 0.3,
        "train/target_share/code": 0.3,
        "train/extra/a": 1,
        "train/extra/b/c": 2.0,
    }
    assert sink_scalars({"kind": "eval", "step": 3, "loss": 1.0, "sources": {"web": {"loss": 0.5}}}) == {
        "eval/loss": 1.0,
        "eval/loss/web": 0.5,
    }


@pytest.fixture
def mixture(tmp_path):
    """Two prepared stores of different text, named web and code, and a held-out corpus."""
    from flame.data.prepare import prepare

    dirs = {}
    for name, text in (
        ("web", LOREM),
        ("code", "def f(x):\n    return x + 1\n"),
        ("held", "A tale, told again. "),
    ):
        d = tmp_path / f"{name}-text"
        d.mkdir()
        for i in range(4):
            (d / f"doc{i}.txt").write_text(f"Document {i}. " + text * (6 + i))
        dirs[name] = d
    for name in ("web", "code"):
        prepare([str(dirs[name])], "byte", str(tmp_path / name), progress=False)
    return {"mix": f"web={tmp_path / 'web'}:0.7,code={tmp_path / 'code'}:0.3", "held": dirs["held"]}


def _mixture_run(run_dir, mixture, **extra):
    over = tiny_overrides(
        run_dir,
        mixture["held"],
        **{
            "data.mix": mixture["mix"],
            "train.max_steps": 6,
            "eval.interval": 3,
            "eval.inputs": [str(mixture["held"])],
            "eval.batches": 1,
            **extra,
        },
    )
    del over["data.inputs"]
    return load_config(overrides=over)


def _crash_at(step):
    def cb(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt

    return cb


@pytest.mark.slow
def test_tensorboard_has_every_number_and_the_config_across_a_restart(tmp_path, mixture):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "r"
    cfg = _mixture_run(run_dir, mixture, **{"log.tensorboard": True, "checkpoint.interval": 2})
    with pytest.raises(KeyboardInterrupt):  # steps 1-3 logged, the checkpoint is at 2: step 3 is redone
        run_training(cfg, callbacks=[_crash_at(3)])
    run_training(cfg)

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    counts = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    recs = _records(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert any(r["kind"] == "eval" for r in recs)
    expected: dict[str, dict[int, float]] = {}
    for rec in recs:
        for tag, v in sink_scalars(rec).items():
            expected.setdefault(tag, {})[rec["step"]] = v
    assert set(scalars) == set(expected)  # every number, and nothing else
    for tag, by_step in expected.items():
        assert counts[tag] == sorted(by_step), tag  # once per step: the redone step 3 is not doubled
        for step, v in by_step.items():
            assert _same(scalars[tag][step], v, rel=1e-6), (tag, step)  # TensorBoard stores float32
    for k in WANTED:
        assert f"train/{k}" in scalars, k
    for k in ("loss", "tokens", "tokens_total", "share", "target_share"):
        assert {f"train/{k}/web", f"train/{k}/code"} <= set(scalars), k
    assert {"eval/loss", "eval/perplexity"} <= set(scalars)
    assert "train/mfu" not in scalars  # None on a CPU without log.peak_flops: no point at all

    # the resolved config, as text, at the first step of each start
    texts = acc.Tensors("config/text_summary")
    assert [e.step for e in texts] == [1, 3]
    saved = (run_dir / "config.toml").read_text()
    for e in texts:
        body = e.tensor_proto.string_val[0].decode()
        assert body.startswith("```toml\n") and body.endswith("```")
        assert tomllib.loads(body[len("```toml\n") : -3]) == tomllib.loads(saved)


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks,
    after a 7-byte header; each chunk has a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _items(items) -> dict:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


@pytest.mark.slow
def test_wandb_history_has_every_number_and_the_config(tmp_path, mixture, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "r"
    run_training(_mixture_run(run_dir, mixture, **{"log.wandb": "offline"}))

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(path)
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = _items(r.history.item)
            history.setdefault(row["_step"], {}).update(row)
    recs = _records(run_dir)
    assert sorted(history) == sorted({r["step"] for r in recs})
    for rec in recs:
        row = history[rec["step"]]
        for tag, v in sink_scalars(rec).items():
            assert _same(row[tag], v, rel=1e-12), (tag, rec["step"])
    sent = set().union(*history.values())
    for k in WANTED:
        assert f"train/{k}" in sent, k
    assert {"train/loss/web", "train/share/code", "eval/loss", "eval/perplexity"} <= sent

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {k: v for k, v in _items(run.config.update).items() if not k.startswith("_")}
    assert config == tomllib.loads((run_dir / "config.toml").read_text())  # the resolved config
