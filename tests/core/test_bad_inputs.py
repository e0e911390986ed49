"""The bad-input matrix: every public constructor and update, called wrongly, raises a clear and specific error.

Each case names what it calls, the exception type it must raise (exactly that
type) and a regular expression its message must match: the argument, or the
stage and the trees, that are wrong. docs/guides/reliability.md states
how many cases there are; a test keeps them true.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.experimental import sparse as jsparse
from jax.experimental.sparse import BCOO

import jadam

jt, jk = jadam.torch, jadam.keras
ROOT = pathlib.Path(__file__).resolve().parents[2]
P = {"w": jnp.ones((2, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
EXTRA = {**P, "c": jnp.ones(2, jnp.float32)}
MISSING = {"w": P["w"]}
RESHAPED = {**P, "b": jnp.zeros(4, jnp.float32)}
BROADCAST = {**P, "b": jnp.zeros((1, 3), jnp.float32)}  # would broadcast silently into the state's (3,)
NAN, INF = float("nan"), float("inf")
SPARSE = BCOO((jnp.ones((1, 2)), jnp.array([[1]])), shape=(4, 2))  # a row-sparse gradient of a (4, 2) table


def update(tx, grads=P, params=P, init=P, state=None, **extra):
  """A call of `tx.update` with a state made by `tx.init(init)` (or the one given)."""
  return lambda: tx.update(grads, tx.init(init) if state is None else state, params, **extra)


def stage_update(stage, updates):
  return lambda: stage.update(updates, stage.init(P), P)


def moments():
  """What scale_by_moments hands to the next stage: jadam.Moments, not a parameter tree."""
  tx = jadam.scale_by_moments()
  return tx.update(P, tx.init(P))[0]


def chain_update(*stages):
  tx = optax.chain(*stages)
  return update(tx)


def replaced(state, i, new):
  """A chain's state with its i-th stage's state replaced."""
  return (*state[:i], new, *state[i + 1 :])


def _with_x64(call):
  """`call` run with jax_enable_x64 (int64 ids exist only there)."""

  def run():
    with jax.enable_x64(True):
      return call()

  return run


STATE = r"Was the state made by this optimizer's init for these parameters\?"
PARAMS = r"Pass update\(grads, state, params\) the parameters"
NEED_MOMENTS = (
  r"^{0} expects the Moments that jadam.scale_by_moments .* Put jadam.scale_by_moments\(\.\.\.\) before {0} in"
)
NEED_TREE = r"^{0} expects parameter-shaped updates but received jadam.Moments.* before {0}\.$"

CONSTRUCTORS = [
  # jadam's optimizers
  ("adam lr negative", lambda: jadam.adam(-1e-3), ValueError, r"Invalid learning_rate: -0.001"),
  ("adam lr nan", lambda: jadam.adam(NAN), ValueError, r"Invalid learning_rate: nan"),
  ("adam lr inf", lambda: jadam.adam(INF), ValueError, r"Invalid learning_rate: inf"),
  ("adam lr string", lambda: jadam.adam("1e-3"), TypeError, r"learning_rate must be a float.*str '1e-3'"),
  ("adam lr bool", lambda: jadam.adam(True), TypeError, r"learning_rate must be a float.*bool"),
  ("adam lr complex", lambda: jadam.adam(1j), TypeError, r"learning_rate must be a float.*complex"),
  ("adam lr vector", lambda: jadam.adam(jnp.ones(3)), ValueError, r"learning_rate must be a scalar.*\(3,\)"),
  ("adam b1 one", lambda: jadam.adam(b1=1.0), ValueError, r"Invalid b1: 1.0; it must lie in \[0.0, 1.0\)"),
  ("adam b1 negative", lambda: jadam.adam(b1=-0.1), ValueError, r"Invalid b1: -0.1"),
  ("adam b2 above one", lambda: jadam.adam(b2=1.5), ValueError, r"Invalid b2: 1.5"),
  ("adam b2 nan", lambda: jadam.adam(b2=NAN), ValueError, r"Invalid b2: nan"),
  ("adam b1 list", lambda: jadam.adam(b1=[0.9]), TypeError, r"b1 must be a float.*list"),
  ("adam b1 bfloat16", lambda: jadam.adam(b1=jnp.asarray(0.9, jnp.bfloat16)), TypeError, r"b1 arrived as bfloat16"),
  ("adam eps negative", lambda: jadam.adam(eps=-1e-8), ValueError, r"Invalid eps: -1e-08"),
  ("adam eps float16", lambda: jadam.adam(eps=jnp.asarray(1e-8, jnp.float16)), TypeError, r"eps arrived as float16"),
  ("adam eps_root negative", lambda: jadam.adam(eps_root=-1.0), ValueError, r"Invalid eps_root: -1.0"),
  ("adam weight_decay negative", lambda: jadam.adam(weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0.1"),
  ("adam amsgrad int", lambda: jadam.adam(amsgrad=1), TypeError, r"amsgrad must be a bool; got int 1"),
  ("adam maximize string", lambda: jadam.adam(maximize="yes"), TypeError, r"maximize must be a bool"),
  ("adam mu_dtype int", lambda: jadam.adam(mu_dtype=jnp.int32), TypeError, r"mu_dtype must be a floating dtype"),
  ("adam nu_dtype unknown", lambda: jadam.adam(nu_dtype="foo"), TypeError, r"nu_dtype must be a floating dtype.*'foo'"),
  ("adamw weight_decay negative", lambda: jadam.adamw(weight_decay=-1.0), ValueError, r"Invalid weight_decay: -1.0"),
  ("adamw amsgrad string", lambda: jadam.adamw(amsgrad="no"), TypeError, r"amsgrad must be a bool"),
  ("sgd lr negative", lambda: jadam.sgd(-1.0), ValueError, r"Invalid learning_rate: -1.0"),
  ("sgd momentum above one", lambda: jadam.sgd(momentum=1.5), ValueError, r"Invalid momentum: 1.5"),
  ("sgd dampening above one", lambda: jadam.sgd(momentum=0.9, dampening=2.0), ValueError, r"Invalid dampening: 2.0"),
  (
    "sgd nesterov without momentum",
    lambda: jadam.sgd(nesterov=True),
    ValueError,
    r"Nesterov momentum requires a momentum",
  ),
  (
    "sgd nesterov with dampening",
    lambda: jadam.sgd(momentum=0.9, dampening=0.5, nesterov=True),
    ValueError,
    r"Nesterov momentum requires zero dampening",
  ),
  ("sgd nesterov string", lambda: jadam.sgd(nesterov="y"), TypeError, r"nesterov must be a bool"),
  ("rmsprop alpha one", lambda: jadam.rmsprop(alpha=1.0), ValueError, r"Invalid b2: 1.0"),
  ("rmsprop eps negative", lambda: jadam.rmsprop(eps=-1.0), ValueError, r"Invalid eps: -1.0"),
  ("rmsprop momentum above one", lambda: jadam.rmsprop(momentum=2.0), ValueError, r"Invalid momentum: 2.0"),
  ("rmsprop weight_decay nan", lambda: jadam.rmsprop(weight_decay=NAN), ValueError, r"Invalid weight_decay: nan"),
  ("rmsprop centered string", lambda: jadam.rmsprop(centered="no"), TypeError, r"centered must be a bool"),
  ("adagrad lr string", lambda: jadam.adagrad("0.1"), TypeError, r"learning_rate must be a float.*str"),
  ("adagrad lr_decay negative", lambda: jadam.adagrad(lr_decay=-1.0), ValueError, r"Invalid lr_decay: -1.0"),
  (
    "adagrad initial_accumulator_value negative",
    lambda: jadam.adagrad(initial_accumulator_value=-1.0),
    ValueError,
    r"Invalid initial_accumulator_value: -1.0",
  ),
  (
    "adagrad initial_accumulator_value schedule",
    lambda: jadam.adagrad(initial_accumulator_value=lambda c: 0.1),
    TypeError,
    r"initial_accumulator_value must be a number, not a schedule",
  ),
  ("adagrad eps nan", lambda: jadam.adagrad(eps=NAN), ValueError, r"Invalid eps: nan"),
  ("adamax b1 one", lambda: jadam.adamax(b1=1.0), ValueError, r"Invalid b1: 1.0"),
  ("adamax eps negative", lambda: jadam.adamax(eps=-1.0), ValueError, r"Invalid eps: -1.0"),
  ("adamax mu_dtype int", lambda: jadam.adamax(mu_dtype=jnp.int32), TypeError, r"mu_dtype must be a floating dtype"),
  (
    "nadam momentum_decay negative",
    lambda: jadam.nadam(momentum_decay=-1.0),
    ValueError,
    r"Invalid momentum_decay: -1.0",
  ),
  (
    "nadam decoupled_weight_decay string",
    lambda: jadam.nadam(decoupled_weight_decay="yes"),
    TypeError,
    r"decoupled_weight_decay must be a bool",
  ),
  ("radam b2 one", lambda: jadam.radam(b2=1.0), ValueError, r"Invalid b2: 1.0"),
  ("radam eps nan", lambda: jadam.radam(eps=NAN), ValueError, r"Invalid eps: nan"),
  # jadam's stages
  ("scale_by_moments mu_dtype int", lambda: jadam.scale_by_moments(mu_dtype=jnp.int32), TypeError, r"mu_dtype"),
  ("scale_by_moments b2 string", lambda: jadam.scale_by_moments(b2="0.999"), TypeError, r"b2 must be a float.*'0.999'"),
  ("max_nu nu_dtype int", lambda: jadam.max_nu(nu_dtype=jnp.int8), TypeError, r"nu_dtype must be a floating dtype"),
  ("accumulate_squares nu_dtype int", lambda: jadam.accumulate_squares(nu_dtype=jnp.int32), TypeError, r"nu_dtype"),
  (
    "accumulate_squares negative start",
    lambda: jadam.accumulate_squares(-1.0),
    ValueError,
    r"Invalid initial_accumulator_value: -1.0",
  ),
  ("bias_correct into_step string", lambda: jadam.bias_correct(into_step="x"), TypeError, r"into_step must be a bool"),
  ("normalize eps_root negative", lambda: jadam.normalize(eps_root=-1.0), ValueError, r"Invalid eps_root: -1.0"),
  ("scale_by_lr None", lambda: jadam.scale_by_lr(None), TypeError, r"learning_rate must be a float.*None"),
  ("scale_by_lr inf", lambda: jadam.scale_by_lr(INF), ValueError, r"Invalid learning_rate: inf"),
  ("add_l2 string", lambda: jadam.add_l2("a"), TypeError, r"weight_decay must be a float.*str"),
  ("add_l2 negative", lambda: jadam.add_l2(-1.0), ValueError, r"Invalid weight_decay: -1.0"),
  ("momentum decay above one", lambda: jadam.momentum(1.5), ValueError, r"Invalid momentum: 1.5"),
  (
    "momentum accumulator_dtype int",
    lambda: jadam.momentum(accumulator_dtype=jnp.int32),
    TypeError,
    r"accumulator_dtype must be a floating dtype",
  ),
  ("momentum nesterov string", lambda: jadam.momentum(nesterov="y"), TypeError, r"nesterov must be a bool"),
  ("decoupled_decay lr negative", lambda: jadam.decoupled_decay(0.1, -1.0), ValueError, r"Invalid learning_rate: -1.0"),
  ("nesterov_correct string", lambda: jadam.nesterov_correct("a"), TypeError, r"momentum_decay must be a float"),
  ("rectify eps negative", lambda: jadam.rectify(-1.0), ValueError, r"Invalid eps: -1.0"),
  (
    "scale_by_inf_moments mu_dtype int",
    lambda: jadam.scale_by_inf_moments(mu_dtype=jnp.int32),
    TypeError,
    r"mu_dtype must be a floating dtype",
  ),
  # jadam.torch: PyTorch's messages where PyTorch has one
  ("torch Adam lr negative", lambda: jt.Adam(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
  ("torch Adam lr string", lambda: jt.Adam(lr="1e-3"), TypeError, r"lr must be a float.*'1e-3'"),
  ("torch Adam beta one", lambda: jt.Adam(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1.0"),
  ("torch Adam betas single", lambda: jt.Adam(betas=(0.9,)), TypeError, r"betas must be a pair"),
  ("torch Adam eps negative", lambda: jt.Adam(eps=-1.0), ValueError, r"Invalid epsilon value: -1.0"),
  (
    "torch Adam weight_decay negative",
    lambda: jt.Adam(weight_decay=-1.0),
    ValueError,
    r"Invalid weight_decay value: -1.0",
  ),
  ("torch Adam amsgrad int", lambda: jt.Adam(amsgrad=1), TypeError, r"amsgrad must be a bool"),
  (
    "torch Adam lr as params",
    lambda: jt.Adam(1e-3),
    TypeError,
    r"Adam's first argument is PyTorch's `params`.*lr=0.001",
  ),
  (
    "torch Adam group without params",
    lambda: jt.Adam([{"lr": 1e-3}]),
    ValueError,
    r"param group 0 of Adam has no 'params'",
  ),
  (
    "torch Adam group unknown key",
    lambda: jt.Adam([{"params": "w", "momentum": 0.9}]),
    ValueError,
    r"param group 0 of Adam sets 'momentum', which Adam does not take",
  ),
  (
    "torch Adam group bad regex",
    lambda: jt.Adam([{"params": "(["}]),
    ValueError,
    r"param group 0: 'params' '\(\[' is not a valid regular expression",
  ),
  ("torch Adam group bad selector", lambda: jt.Adam([{"params": 3}]), TypeError, r"param group 0: 'params' must be"),
  (
    "torch Adam group selects nothing",
    lambda: jt.Adam([{"params": "nope", "lr": 1e-2}]).init(P),
    ValueError,
    r"param group 0 of Adam \('nope'\) selects no parameter",
  ),
  (
    "torch Adam groups overlap",
    lambda: jt.Adam([{"params": "w"}, {"params": ".*"}]).init(P),
    ValueError,
    r"some parameters appear in more than one parameter group: 'w'",
  ),
  ("torch AdamW weight_decay negative", lambda: jt.AdamW(weight_decay=-1.0), ValueError, r"Invalid weight_decay value"),
  ("torch SGD nesterov without momentum", lambda: jt.SGD(nesterov=True), ValueError, r"Nesterov momentum requires"),
  ("torch SGD momentum negative", lambda: jt.SGD(momentum=-0.1), ValueError, r"Invalid momentum value: -0.1"),
  ("torch RMSprop alpha negative", lambda: jt.RMSprop(alpha=-0.1), ValueError, r"Invalid alpha value: -0.1"),
  ("torch RMSprop centered string", lambda: jt.RMSprop(centered="y"), TypeError, r"centered must be a bool"),
  ("torch Adagrad lr_decay negative", lambda: jt.Adagrad(lr_decay=-1.0), ValueError, r"Invalid lr_decay value: -1.0"),
  (
    "torch Adagrad initial_accumulator_value negative",
    lambda: jt.Adagrad(initial_accumulator_value=-1.0),
    ValueError,
    r"Invalid initial_accumulator_value value: -1.0",
  ),
  (
    "torch Adagrad with OneCycleLR",
    lambda: jt.Adagrad(lr=jt.OneCycleLR(0.1, total_steps=10)),
    ValueError,
    r"cycle_momentum.*Adagrad has neither",
  ),
  (
    "torch Adamax beta above one",
    lambda: jt.Adamax(betas=(0.9, 1.5)),
    ValueError,
    r"Invalid beta parameter at index 1",
  ),
  (
    "torch NAdam momentum_decay negative",
    lambda: jt.NAdam(momentum_decay=-1.0),
    ValueError,
    r"Invalid momentum_decay value: -1.0",
  ),
  (
    "torch RAdam decoupled_weight_decay string",
    lambda: jt.RAdam(decoupled_weight_decay="y"),
    TypeError,
    r"decoupled_weight_decay must be a bool",
  ),
  # jadam.torch's schedulers
  ("StepLR step_size zero", lambda: jt.StepLR(1e-3, step_size=0), ValueError, r"step_size must be a positive integer"),
  ("StepLR lr string", lambda: jt.StepLR("1e-3", step_size=3), TypeError, r"lr must be a number"),
  ("StepLR gamma string", lambda: jt.StepLR(1e-3, step_size=3, gamma="0.1"), TypeError, r"gamma must be a number"),
  (
    "MultiStepLR milestones int",
    lambda: jt.MultiStepLR(1e-3, milestones=5),
    TypeError,
    r"milestones must be a list of integers",
  ),
  ("ExponentialLR gamma string", lambda: jt.ExponentialLR(1e-3, gamma="a"), TypeError, r"gamma must be a number"),
  ("CosineAnnealingLR T_max zero", lambda: jt.CosineAnnealingLR(1e-3, T_max=0), ValueError, r"T_max must be positive"),
  (
    "LinearLR start_factor zero",
    lambda: jt.LinearLR(1e-3, start_factor=0.0),
    ValueError,
    r"Starting multiplicative factor",
  ),
  ("LinearLR end_factor two", lambda: jt.LinearLR(1e-3, end_factor=2.0), ValueError, r"Ending multiplicative factor"),
  (
    "LinearLR total_iters zero",
    lambda: jt.LinearLR(1e-3, total_iters=0),
    ValueError,
    r"total_iters must be a positive integer",
  ),
  ("OneCycleLR no length", lambda: jt.OneCycleLR(0.1), ValueError, r"total_steps OR \(epochs AND steps_per_epoch\)"),
  ("OneCycleLR pct_start two", lambda: jt.OneCycleLR(0.1, total_steps=10, pct_start=2.0), ValueError, r"pct_start"),
  (
    "OneCycleLR anneal_strategy",
    lambda: jt.OneCycleLR(0.1, total_steps=10, anneal_strategy="foo"),
    ValueError,
    r"anneal_strategy must be one of 'cos' or 'linear'",
  ),
  ("ReduceLROnPlateau mode", lambda: jt.ReduceLROnPlateau(1e-3, mode="foo"), ValueError, r"mode foo is unknown"),
  (
    "ReduceLROnPlateau factor one",
    lambda: jt.ReduceLROnPlateau(1e-3, factor=1.0),
    ValueError,
    r"Factor should be < 1.0",
  ),
  (
    "ReduceLROnPlateau threshold_mode",
    lambda: jt.ReduceLROnPlateau(1e-3, threshold_mode="foo"),
    ValueError,
    r"threshold mode foo is unknown",
  ),
  (
    "per_epoch zero",
    lambda: jt.StepLR(1e-3, step_size=2).per_epoch(0),
    ValueError,
    r"steps_per_epoch must be a positive integer",
  ),
  # jadam.keras
  ("keras Adam beta_1 one", lambda: jk.Adam(beta_1=1.0), ValueError, r"Invalid beta_1: 1.0"),
  (
    "keras Adam learning_rate negative",
    lambda: jk.Adam(learning_rate=-1.0),
    ValueError,
    r"Invalid learning_rate: -1.0",
  ),
  ("keras Adam epsilon string", lambda: jk.Adam(epsilon="a"), TypeError, r"epsilon must be a float"),
  ("keras Adam amsgrad int", lambda: jk.Adam(amsgrad=1), TypeError, r"amsgrad must be a bool"),
  ("keras Adam weight_decay negative", lambda: jk.Adam(weight_decay=-1.0), ValueError, r"Invalid weight_decay: -1.0"),
  ("keras AdamW weight_decay None", lambda: jk.AdamW(weight_decay=None), ValueError, r"`weight_decay` must be a float"),
  # the step helpers and optax.inject_hyperparams
  (
    "make_update_step given the factory",
    lambda: jadam.make_update_step(jadam.adam),
    TypeError,
    r"tx must be an optax.GradientTransformation.*the factory: call it",
  ),
  (
    "make_train_step given a string",
    lambda: jadam.make_train_step(lambda p: 0.0, "adam"),
    TypeError,
    r"tx must be an optax.GradientTransformation; got 'adam'",
  ),
  (
    "make_train_step has_aux int",
    lambda: jadam.make_train_step(lambda p: 0.0, jadam.adam(), has_aux=1),
    TypeError,
    r"has_aux must be a bool",
  ),
  (
    "update_and_apply given the factory",
    lambda: jadam.update_and_apply(jadam.adam, P, None, P),
    TypeError,
    r"tx must be an optax.GradientTransformation",
  ),
  (
    "inject_hyperparams bfloat16 params",
    lambda: optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3).init({"w": jnp.ones(3, jnp.bfloat16)}),
    TypeError,
    r"b1 arrived as bfloat16.*hyperparam_dtype=jnp.float32",
  ),
]

UPDATES = [
  # updates, state and params of different trees
  (
    "adam params with an extra leaf",
    update(jadam.adam(weight_decay=0.1), params=EXTRA),
    ValueError,
    rf"jadam.add_l2: the updates and the params are different trees: \['c'\] is in the params but not in the updates"
    rf".*{PARAMS}",
  ),
  (
    "adam params missing a leaf",
    update(jadam.adam(weight_decay=0.1), params=MISSING),
    ValueError,
    r"jadam.add_l2: .* \['b'\] is in the updates but not in the params",
  ),
  (
    "adam params of another shape",
    update(jadam.adam(weight_decay=0.1), params=RESHAPED),
    ValueError,
    r"jadam.add_l2: the updates and the params differ at \['b'\]: the updates have float32\[3\],"
    r" the params float32\[4\]",
  ),
  (
    "adam params a list",
    update(jadam.adam(weight_decay=0.1), params=[P["b"], P["w"]]),
    ValueError,
    r"jadam.add_l2: the updates and the params are different trees: \['b'\] is in the updates but not in the params",
  ),
  (
    "adam updates with an extra leaf",
    update(jadam.adam(), grads=EXTRA),
    ValueError,
    rf"jadam.scale_by_moments: the updates and the state's nu are different trees: \['c'\] is in the updates.*{STATE}",
  ),
  (
    "adam updates missing a leaf",
    update(jadam.adam(), grads=MISSING),
    ValueError,
    r"jadam.scale_by_moments: .* \['b'\] is in the state's nu but not in the updates",
  ),
  (
    "adam updates of another shape",
    update(jadam.adam(), grads=RESHAPED),
    ValueError,
    r"jadam.scale_by_moments: the updates and the state's nu differ at \['b'\]: the updates have float32\[4\]",
  ),
  (
    "adam updates that would broadcast",
    update(jadam.adam(), grads=BROADCAST),
    ValueError,
    r"differ at \['b'\]: the updates have float32\[1,3\], the state's nu float32\[3\]",
  ),
  (
    "adam state of other params",
    update(jadam.adam(), init={"x": jnp.ones(3, jnp.float32)}),
    ValueError,
    r"jadam.scale_by_moments: .* \['b'\] is in the updates but not in the state's nu; \['x'\] is in the state's nu",
  ),
  (
    "adam amsgrad state of other params",
    update(jadam.adam(amsgrad=True), state=replaced(jadam.adam(amsgrad=True).init(P), 2, jadam.max_nu().init(MISSING))),
    ValueError,
    r"jadam.max_nu: the updates and the state's nu_max are different trees",
  ),
  (
    "sgd updates with an extra leaf",
    update(jadam.sgd(momentum=0.9), grads=EXTRA),
    ValueError,
    r"jadam.momentum: the updates and the state's trace are different trees: \['c'\]",
  ),
  (
    "rmsprop updates of another shape",
    update(jadam.rmsprop(centered=True), grads=RESHAPED),
    ValueError,
    r"jadam.scale_by_moments: the updates and the state's nu differ at \['b'\]",
  ),
  (
    "adagrad state of other params",
    update(jadam.adagrad(), init=MISSING),
    ValueError,
    r"jadam.accumulate_squares: the updates and the state's sum_of_squares are different trees",
  ),
  (
    "adamax updates with an extra leaf",
    update(jadam.adamax(), grads=EXTRA),
    ValueError,
    r"jadam.scale_by_inf_moments: the updates and the state's nu are different trees",
  ),
  (
    "adamw params with an extra leaf",
    update(jadam.adamw(), params=EXTRA),
    ValueError,
    r"jadam.add_l2: the updates and the params are different trees",
  ),
  (
    "torch AdamW params with an extra leaf",
    update(jt.AdamW(), params=EXTRA),
    ValueError,
    r"jadam.decoupled_decay: the updates and the params are different trees: \['c'\]",
  ),
  (
    "torch Adam groups params with an extra leaf",
    update(jt.Adam([{"params": "b", "lr": 1e-2}]), params=EXTRA),
    ValueError,
    r"jadam.torch.Adam: the updates and the params are different trees: \['c'\] is in the params",
  ),
  (
    "torch Adam groups updates of another shape",
    update(jt.Adam([{"params": "b", "lr": 1e-2}]), grads=RESHAPED),
    ValueError,
    r"jadam.torch.Adam: the updates and the params differ at \['b'\]",
  ),
  (
    "keras Adam updates with an extra leaf",
    update(jk.Adam(), grads=EXTRA),
    ValueError,
    r"jadam.keras.scale_by_keras_moments: the updates and the state's nu are different trees",
  ),
  (
    "keras AdamW params of another shape",
    update(jk.AdamW(), params=RESHAPED),
    ValueError,
    r"jadam.decoupled_decay: the updates and the params differ at \['b'\]",
  ),
  # the state of another optimizer (as many stages, so optax.chain accepts it)
  (
    "adam given adamax's state",
    update(jadam.adam(), state=jadam.adamax().init(P)),
    TypeError,
    r"jadam.adam's update received a state made by jadam.adamax's init: .*ScaleByInfMomentsState",
  ),
  (
    "adamax given adam's state",
    update(jadam.adamax(), state=jadam.adam().init(P)),
    TypeError,
    r"jadam.adamax's update received a state made by jadam.adam's init",
  ),
  (
    "nadam given adam's state",
    update(jadam.nadam(), state=jadam.adam().init(P)),
    TypeError,
    r"jadam.nadam's update received a state made by jadam.adam's init: its stages' states are \(AddL2State, "
    r"ScaleByMomentsState, EmptyState, EmptyState, ScaleByLrState\), where jadam.nadam's are \(AddL2State, "
    r"ScaleByMomentsState, NesterovCorrectState, EmptyState, ScaleByLrState\)",
  ),
  (
    "sgd given adagrad's state",
    update(jadam.sgd(momentum=0.9), state=replaced(jadam.sgd(momentum=0.9).init(P), 1, jadam.adagrad().init(P)[1])),
    TypeError,
    r"jadam.sgd's update received a state made by another optimizer's init: .*AccumulateSquaresState",
  ),
  (
    "keras Adam given adam's state",
    update(jk.Adam(), state=replaced(jk.Adam().init(P), 0, jadam.adam().init(P)[0])),
    TypeError,
    r"jadam.keras.scale_by_keras_moments expects its state to be the KerasMomentsState",
  ),
  (
    "adam given nadam's state",
    update(jadam.adam(), state=jadam.nadam().init(P)),
    TypeError,
    r"jadam.adam's update received a state made by jadam.nadam's init",
  ),
  (
    "adam None gradient for an array",
    update(jadam.adam(), grads={**P, "b": None}),
    ValueError,
    r"jadam.adam: the gradient at \['b'\] is None, but the params hold float32\[3\]",
  ),
  (
    "adam schedule returning an array",
    update(jadam.adam(lambda count: jnp.full(4, 1e-3))),
    ValueError,
    r"The schedule given as learning_rate returned an array of shape \(4,\)",
  ),
  (
    "sgd momentum schedule returning an array",
    update(jadam.sgd(momentum=lambda count: jnp.full(3, 0.9))),
    ValueError,
    r"The schedule given as momentum returned an array of shape \(3,\)",
  ),
  (
    "ReduceLROnPlateau non-scalar metric",
    update(jt.Adam(lr=jt.ReduceLROnPlateau(0.1)), value=jnp.arange(4.0)),
    ValueError,
    r"ReduceLROnPlateau's value \(the metric\) must be a scalar; got an array of shape \(4,\)",
  ),
  (
    "clip_grad_norm max_norm negative",
    lambda: jt.clip_grad_norm(-1.0),
    ValueError,
    r"Invalid max_norm: -1.0",
  ),
  ("clip_grad_norm norm_type zero", lambda: jt.clip_grad_norm(1.0, 0.0), ValueError, r"norm_type must be positive"),
  ("clip_grad_norm norm_type text", lambda: jt.clip_grad_norm(1.0, "two"), TypeError, r"norm_type must be a positive"),
  (
    "clip_grad_norm error_if_nonfinite",
    update(jt.clip_grad_norm(1.0, error_if_nonfinite=True), grads={**P, "b": jnp.full(3, jnp.inf)}),
    RuntimeError,
    r"The total norm of order 2.0 for gradients from `parameters` is non-finite",
  ),
  ("clip_grad_value negative", lambda: jt.clip_grad_value(-0.5), ValueError, r"Invalid clip_value: -0.5"),
  (
    "ConstantLR factor above one",
    lambda: jt.ConstantLR(0.1, factor=2.0),
    ValueError,
    r"Constant multiplicative factor",
  ),
  ("LambdaLR not callable", lambda: jt.LambdaLR(0.1, 0.5), TypeError, r"lr_lambda should be a function, but got float"),
  (
    "CosineAnnealingWarmRestarts T_0",
    lambda: jt.CosineAnnealingWarmRestarts(0.1, 0),
    ValueError,
    r"positive integer T_0",
  ),
  ("CyclicLR mode", lambda: jt.CyclicLR(0.01, 0.1, mode="sine"), ValueError, r"mode is invalid and scale_fn is None"),
  (
    "SequentialLR milestones",
    lambda: jt.SequentialLR([jt.StepLR(0.1, 2)], milestones=[3]),
    ValueError,
    r"number of schedulers 1 and the number of milestones to be equal to 1",
  ),
  (
    "Adagrad with CyclicLR momentum",
    lambda: jt.Adagrad(lr=jt.CyclicLR(0.01, 0.1)),
    ValueError,
    r"optimizer must support momentum or beta1.*CyclicLR\(\.\.\., cycle_momentum=False\)",
  ),
  ("torch Adadelta rho", lambda: jt.Adadelta(rho=1.5), ValueError, r"Invalid rho value: 1.5"),
  ("torch Rprop etas", lambda: jt.Rprop(etas=(1.2, 0.5)), ValueError, r"Invalid eta values: 1.2, 0.5"),
  (
    "torch SGD weight_decay with a sparse gradient",
    update(
      jt.SGD(weight_decay=0.1), grads={"t": SPARSE}, params={"t": jnp.zeros((4, 2))}, init={"t": jnp.zeros((4, 2))}
    ),
    ValueError,
    r"weight_decay is not compatible with sparse gradients",
  ),
  ("torch ASGD weight_decay", lambda: jt.ASGD(weight_decay=-1.0), ValueError, r"Invalid weight_decay value: -1.0"),
  # missing params or extra arguments
  (
    "adam weight decay without params",
    update(jadam.adam(weight_decay=0.1), params=None),
    ValueError,
    r"jadam.add_l2 needs the parameters: call update\(grads, state, params\)",
  ),
  ("adamw without params", update(jadam.adamw(), params=None), ValueError, r"jadam.add_l2 needs the parameters"),
  (
    "torch AdamW without params",
    update(jt.AdamW(), params=None),
    ValueError,
    r"jadam.decoupled_decay needs the parameters",
  ),
  (
    "keras AdamW without params",
    update(jk.AdamW(), params=None),
    ValueError,
    r"jadam.decoupled_decay needs the parameters",
  ),
  (
    "ReduceLROnPlateau without the metric",
    update(jt.Adam(lr=jt.ReduceLROnPlateau(1e-3))),
    TypeError,
    r"ReduceLROnPlateau needs the metric: call update\(grads, state, params, value=metric\)",
  ),
  # the wrong kind of updates between stages
  ("normalize given a tree", stage_update(jadam.normalize(), P), TypeError, NEED_MOMENTS.format("jadam.normalize")),
  (
    "bias_correct given a tree",
    stage_update(jadam.bias_correct(), P),
    TypeError,
    NEED_MOMENTS.format("jadam.bias_correct"),
  ),
  ("max_nu given a tree", stage_update(jadam.max_nu(), P), TypeError, NEED_MOMENTS.format("jadam.max_nu")),
  ("center given a tree", stage_update(jadam.center(), P), TypeError, NEED_MOMENTS.format("jadam.center")),
  ("rectify given a tree", stage_update(jadam.rectify(), P), TypeError, NEED_MOMENTS.format("jadam.rectify")),
  (
    "normalize_inf given a tree",
    stage_update(jadam.normalize_inf(), P),
    TypeError,
    NEED_MOMENTS.format("jadam.normalize_inf"),
  ),
  (
    "nesterov_correct given a tree",
    stage_update(jadam.nesterov_correct(), P),
    TypeError,
    NEED_MOMENTS.format("jadam.nesterov_correct"),
  ),
  (
    "keras_step given a tree",
    stage_update(jk.keras_step(), P),
    TypeError,
    NEED_MOMENTS.format("jadam.keras.keras_step"),
  ),
  (
    "scale_by_lr given Moments",
    lambda: jadam.scale_by_lr(1e-3).update(moments(), jadam.scale_by_lr(1e-3).init(P)),
    TypeError,
    NEED_TREE.format("jadam.scale_by_lr", "jadam.scale_by_lr"),
  ),
  (
    "add_l2 given Moments",
    lambda: jadam.add_l2(0.1).update(moments(), jadam.add_l2(0.1).init(P), P),
    TypeError,
    NEED_TREE.format("jadam.add_l2", "jadam.add_l2"),
  ),
  (
    "momentum given Moments",
    lambda: jadam.momentum().update(moments(), jadam.momentum().init(P)),
    TypeError,
    NEED_TREE.format("jadam.momentum", "jadam.momentum"),
  ),
  (
    "flip_sign given Moments",
    lambda: jadam.flip_sign().update(moments(), optax.EmptyState()),
    TypeError,
    NEED_TREE.format("jadam.flip_sign", "jadam.flip_sign"),
  ),
  (
    "scale_by_moments given Moments",
    lambda: jadam.scale_by_moments().update(moments(), jadam.scale_by_moments().init(P)),
    TypeError,
    NEED_TREE.format("jadam.scale_by_moments", "jadam.scale_by_moments"),
  ),
  (
    "decoupled_decay given Moments",
    lambda: jadam.decoupled_decay(0.1, 1e-3).update(moments(), jadam.decoupled_decay(0.1, 1e-3).init(P), P),
    TypeError,
    NEED_TREE.format("jadam.decoupled_decay", "jadam.decoupled_decay"),
  ),
  (
    "chain without normalize",
    chain_update(jadam.scale_by_moments(), jadam.bias_correct(), jadam.scale_by_lr(1e-3)),
    TypeError,
    NEED_TREE.format("jadam.scale_by_lr", "jadam.scale_by_lr"),
  ),
  (
    "chain without scale_by_moments",
    chain_update(jadam.bias_correct(), jadam.normalize()),
    TypeError,
    NEED_MOMENTS.format("jadam.bias_correct"),
  ),
  (
    "bias_correct twice",
    chain_update(jadam.scale_by_moments(), jadam.bias_correct(), jadam.bias_correct()),
    TypeError,
    r"jadam.bias_correct received moments that are already bias-corrected",
  ),
  (
    "rectify after bias_correct",
    chain_update(jadam.scale_by_moments(), jadam.bias_correct(), jadam.rectify()),
    TypeError,
    r"jadam.rectify corrects the moments itself; do not put jadam.bias_correct before it",
  ),
  (
    "nesterov_correct after bias_correct",
    chain_update(jadam.scale_by_moments(), jadam.bias_correct(), jadam.nesterov_correct()),
    TypeError,
    r"jadam.nesterov_correct replaces jadam.bias_correct",
  ),
  (
    "keras_step after bias_correct",
    chain_update(jadam.scale_by_moments(), jadam.bias_correct(), jk.keras_step()),
    TypeError,
    r"jadam.keras.keras_step corrects the moments itself",
  ),
  # sweeps
  (
    "sweep learning_rate beyond float32",
    lambda: jadam.sweep(jadam.adam, {"learning_rate": [1e-3, 1e39]}),
    ValueError,
    r"configs\[1\]: learning_rate=1e\+39 is injected as float32, which holds it as inf",
  ),
  (
    "sweep eps below float32",
    lambda: jadam.sweep(jadam.adam, {"eps": [1e-50]}),
    ValueError,
    r"configs\[0\]: eps=1e-50 is injected as float32, which holds it as 0.0",
  ),
  (
    "sweep with nothing to sweep",
    lambda: jadam.sweep(jadam.adam, {}),
    ValueError,
    r"nothing to sweep: the configurations name no hyperparameter",
  ),
  # row-sparse ids
  (
    "value_and_sparse_grad id -1 outside jit",
    lambda: jadam.value_and_sparse_grad(lambda p, i: jnp.sum(p["t"][i["t"]]))(
      {"t": jnp.ones((4, 2))}, {"t": jnp.array([2, -1])}
    ),
    ValueError,
    r"jadam.value_and_sparse_grad: ids\['t'\] has row indices out of range for a table of 4 rows: \[-1\]",
  ),
  (
    "sparse_adam int64 id beyond int32",
    _with_x64(
      lambda: jadam.sparse_adam().update(
        {"t": jsparse.BCOO((jnp.ones((1, 2), jnp.float32), jnp.asarray([[2**32 + 3]], jnp.int64)), shape=(4, 2))},
        jadam.sparse_adam().init({"t": jnp.zeros((4, 2), jnp.float32)}),
      )
    ),
    ValueError,
    r"has row indices out of range for a table of 4 rows: \[4294967299\]",
  ),
  # checkpoints
  (
    "save_state PRNG key",
    lambda: jadam.save_state("/nonexistent/never-written", {"key": jax.random.key(0)}),
    TypeError,
    r"PRNG key arrays cannot be checkpointed.*jax.random.key_data",
  ),
  (
    "restore_state no checkpoint",
    lambda: jadam.restore_state("/nonexistent/never-written", P),
    FileNotFoundError,
    r"no checkpoint at /nonexistent/never-written",
  ),
]

CASES = CONSTRUCTORS + UPDATES


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, error, match, capsys):
  with pytest.raises(Exception) as info:
    call()
  assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
  assert re.search(match, str(info.value)), str(info.value)
  assert capsys.readouterr() == ("", ""), "a bad input printed something"


def test_case_names_are_unique():
  names = [c[0] for c in CASES]
  assert len(set(names)) == len(names)


@pytest.mark.parametrize("document", ["docs/guides/reliability.md"])
def test_the_documents_count_the_cases(document):
  counts = re.findall(r"(\d+) bad inputs", (ROOT / document).read_text())
  assert counts and all(int(n) == len(CASES) for n in counts), (counts, len(CASES))
