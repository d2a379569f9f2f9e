"""hyzo.demo: identical figures run after run on one machine, and the pieces its claims
rest on (the base on the attack's grid, the grid measurements)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from hyzo._quantization import SCHEMES  # noqa: E402
from hyzo.demo import attacks, controls, experiment, model, objectives, world  # noqa: E402

BNB = ("bnb nf4", "bnb fp4", "bnb int8")


def _run(out: str) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run([sys.executable, "-m", "hyzo.demo", "--tiny", "--quiet", "--out", out],
                   check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)


def test_two_runs_write_identical_json(tmp_path):
    """The demo in a tiny configuration, twice in fresh processes: byte-identical
    results.json (timings are kept out of it), every row and attack present, and a plot."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run(a)
    _run(b)
    with open(os.path.join(a, "results.json"), "rb") as f:
        ja = f.read()
    with open(os.path.join(b, "results.json"), "rb") as f:
        jb = f.read()
    assert ja == jb
    r = json.loads(ja)
    for obj in objectives.OBJECTIVES:
        rows = r["mean_std"][obj]["0.25"]
        assert list(rows) == controls.ROWS
        for name in controls.ROWS:
            for k in ("forget", "retain", "forget 4-bit g32", "forget 4-bit per-channel",
                      "forget 8-bit per-channel", "forget relearned", "grid values changed",
                      "mean |delta| / step") + tuple(
                          f"{what} {a}" for a in BNB for what in ("forget", "retain")):
                assert 0.0 <= rows[name][k]["mean"], (name, k)
        # The displacement controls use the hybrid's measured RMS, and it is not zero.
        hyb = r["per_seed"][0]["runs"][obj]["0.25"][controls.HYBRID]
        ctl = r["per_seed"][0]["runs"][obj]["0.25"][controls.NOISE_ADAMW]
        assert ctl["displacement_rms"] == hyb["zo_changes_rms"] > 0
    assert list(r["verdict bitsandbytes"]) == list(BNB)
    assert os.path.getsize(os.path.join(a, "robustness.png")) > 10_000


# The weights transformers hands to bitsandbytes in TinyLM: every projection of the blocks;
# not the embeddings, positions, norms, biases or the output head.
BNB_WEIGHTS = [f"body.layers.{i}.{w}" for i in (0, 1) for w in (
    "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
    "linear2.weight")]


def test_bnb_attacks_quantize_the_linear_weights_as_loading_does():
    """Each bitsandbytes attack changes exactly the block projections, each to
    ``hyzo._quantization``'s round trip of its own scheme, and leaves every other tensor."""
    assert tuple(attacks.BNB_ATTACKS) == BNB
    torch.manual_seed(0)
    lm = model.TinyLM(40)
    assert list(attacks.bnb_weights(lm)) == BNB_WEIGHTS
    original = dict(lm.named_parameters())
    quantized = {a: dict(attacks.bnb_quantized(lm, a).named_parameters()) for a in BNB}
    for name, w in original.items():
        for a in BNB:
            q = quantized[a][name]
            if name in BNB_WEIGHTS:
                assert not torch.equal(q, w), (a, name)
                assert torch.equal(q, SCHEMES[a](w)), (a, name)
            else:
                assert torch.equal(q, w), (a, name)
    # Three different attacks: no two give the same weights.
    for i, a in enumerate(BNB):
        for b in BNB[i + 1:]:
            assert not torch.equal(quantized[a][BNB_WEIGHTS[0]], quantized[b][BNB_WEIGHTS[0]])


def test_measure_scores_each_bnb_attack_on_its_own_quantized_model(monkeypatch):
    """``measure``'s "forget/retain bnb ..." figures are the accuracy of that attack's model
    (accuracy replaced by a fingerprint of the model it is given, and of the facts)."""
    w = world.make_world(30, 0, "cpu")
    torch.manual_seed(0)
    lm = model.TinyLM(len(w.vocab))
    base = attacks.quantized(lm, *attacks.BASE_SCHEME)
    weight = BNB_WEIGHTS[0]

    def fingerprint(m, facts):
        return float(dict(m.named_parameters())[weight].detach().double().sum()) + len(facts)

    monkeypatch.setattr(attacks, "accuracy", fingerprint)
    out = attacks.measure(lm, base, w, experiment.Setup.tiny(), 0)
    n_forget = int(w.forget.sum())
    for a in BNB:
        expect = fingerprint(attacks.bnb_quantized(lm, a), [])
        assert out[f"forget {a}"] == expect + n_forget, a
        assert out[f"retain {a}"] == expect + len(w.facts) - n_forget, a
    assert len({out[f"forget {a}"] for a in BNB} | {out["forget"]}) == len(BNB) + 1


def test_base_sits_on_the_attack_grid():
    """Re-quantizing the int4 base with its own scheme changes no value (the built-in
    assumption), and the grid measurements read zero on it."""
    torch.manual_seed(0)
    lm = model.TinyLM(40)
    base = attacks.quantized(lm, *attacks.BASE_SCHEME)
    again = attacks.quantized(base, *attacks.BASE_SCHEME)
    for p, q in zip(base.parameters(), again.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=0)
    assert attacks.grid_change(base, base) == (0.0, 0.0)
    # Moving one weight off a zero code by 0.6 of its step changes exactly that value.
    moved = attacks.quantized(lm, *attacks.BASE_SCHEME)
    w = moved.head.weight
    step = attacks.fake_quant(base.head.weight, *attacks.BASE_SCHEME)[1]
    i, j = [int(v) for v in torch.nonzero(base.head.weight == 0)[0]]
    with torch.no_grad():
        w[i, j] += 0.6 * step[i, j]
    frac, mean_steps = attacks.grid_change(moved, base)
    n = sum(p.numel() for p in base.parameters() if p.dim() == 2)
    assert frac == pytest.approx(1 / n)
    assert mean_steps == pytest.approx(0.6 / n, rel=1e-4)


def test_accuracy_is_an_exact_ratio():
    """6 of 60 right is <= 0.1 (a float32 mean would read 0.100000001)."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], x.shape[1], 4)
            logits[:6, -1, 1] = 1.0  # the first six answer 1, the rest 0
            return logits

    facts = torch.ones(60, 5, dtype=torch.long)
    assert model.accuracy(Fixed(), facts) <= 0.1
