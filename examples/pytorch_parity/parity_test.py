"""The parity example runs end to end; its largest differences are printed and held to float64 rounding."""

import pytest

pytest.importorskip("torch")

from examples.pytorch_parity import parity  # noqa: E402


@pytest.mark.parametrize("recipe", ["adamw_cosine", "sgd_onecycle", "nadam_layers"])
def test_float64_parity(recipe, capsys):
  out = parity.run(parity.Config(recipe=recipe, steps=200, print_every=100))
  printed = capsys.readouterr().out
  assert "final max |parameter difference|" in printed
  with capsys.disabled():
    print(f"\n{recipe}: max |loss diff| {out['max_loss_diff']:.3e}, max |param diff| {out['max_param_diff']:.3e}")
  assert out["max_loss_diff"] <= 1e-12
  assert out["max_param_rel_diff"] <= 1e-12
  assert out["final_loss"] < out["first_loss"]  # and it trains


def test_float32_parity():
  out = parity.run(parity.Config(recipe="adamw_cosine", steps=100, dtype="float32", print_every=50))
  # Forward and backward passes round differently in the two libraries; the optimizers add little.
  assert out["max_param_rel_diff"] <= 1e-5
