"""flash-linear-attention families through flame: the fla tier of the model zoo.

Each family (tests/fla_family.py's FAMILIES: GLA, DeltaNet, Gated DeltaNet, HGRN2, RWKV7, Mamba2)
runs in a process of its own, with fla's Triton kernels in Triton's interpreter on CPU
(flame.fla_cpu), and must:
  train    4 steps with data.varlen (packed documents proven apart at start and on the trained
           weights), on the fused loss, with the loss falling;
  resume   stopped at step 2 and resumed: the same losses, bit for bit, and the same weights;
  loss     fused equals the logits path: the loss and every gradient (fp32 families);
  export   `flame export` reloads in transformers with the same logits;
  generate flame's greedy generate (on the run and on the export) equals its no-cache loop; where
           the model's cache gives the forward's logits, transformers' `generate` too, and where it
           does not (fla 0.6.0 under transformers 5 loses the state), flame says so and does
           without it;
  varlen   on the trained weights, a document's logits packed equal its logits alone with
           cu_seqlens, and differ without them (so the check can fail for these models); fla's
           Mamba2, whose CPU path ignores cu_seqlens, is refused data.varlen with the fix.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from fla_family import FAMILIES, STEPS, STOP_AT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None,
        reason="flash-linear-attention and triton are not installed (pip install -e '.[test]')",
    ),
]
WORKER = Path(__file__).with_name("fla_family.py")


def _report(family: str, work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER), family, str(work)],
        capture_output=True,
        text=True,
        timeout=900,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, f"{family} worker failed:\n{proc.stderr[-4000:]}"
    return json.loads((work / "report.json").read_text())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fla_family_trains_resumes_exports_and_generates(family, tmp_path):
    r = _report(family, tmp_path)
    losses = {int(k): v for k, v in r["losses"].items()}
    assert sorted(losses) == list(range(1, STEPS + 1)), "train: one record per step"
    assert losses[STEPS] < losses[1] - 0.1, f"train: the loss did not fall: {losses}"
    assert r["loss_path"] == "fused", "train: the fused loss was not taken"

    assert r["stopped_at"] == STOP_AT and r["resumed_to"] == STEPS
    assert r["resumed_losses"] == r["losses"], "resume: losses differ from the uninterrupted run"
    assert r["weights_equal_after_resume"], "resume: final weights differ"

    if r["dtype"] == "fp32":
        assert r["fused_probe_accepts"] and r["fused_grad_names_equal"]
        assert r["fused_loss_rel_diff"] <= 1e-6, f"loss: fused differs by {r['fused_loss_rel_diff']:.3g}"
        assert r["fused_grad_rel_diff"] <= 1e-5, f"loss: a gradient differs by {r['fused_grad_rel_diff']:.3g}"

    assert r["exported_model_type"] == FAMILIES[family]["model_type"]
    assert r["export_logits_max_diff"] <= 1e-5 * max(1.0, r["export_logits_scale"]), "export: logits differ"

    text = r["generate_run"]
    assert text.startswith("def f(x):") and not text.startswith("<exit"), f"generate: {text!r}"
    assert r["generate_run_no_cache"] == text, "generate: differs from the no-cache loop"
    assert r["generate_export"] == text, "generate: the export generates otherwise"
    if r["cache_error"] <= 1e-3:  # a sound cache: transformers' generate is the same
        assert r["generate_transformers"] == text, "generate: transformers' generate differs"
    else:  # a cache that loses the state between steps is not used, and flame says so
        assert "without the cache" in r["generate_run_said"], "generate: a broken cache was trusted"

    assert r["isolation_without"] > 1e-2, "varlen: without cu_seqlens the check could not have failed"
    if r["varlen"]:
        assert r["isolation_with_cu_seqlens"] <= 1e-5, "varlen: packed documents leak into each other"
    else:  # a model that mixes packed documents is refused data.varlen, with the way out
        assert r["isolation_with_cu_seqlens"] > 1e-2
        said = r["varlen_refusal"] or ""
        assert "does not keep packed documents apart" in said and "--data.varlen false" in said, said
