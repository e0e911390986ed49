"""The examples' command lines: named by their module, every flag explained with its default; progress lines when
the output is not a terminal; expected errors as one line; no run over a previous run's directory."""

import importlib
import io
import pathlib

import pytest

from examples import _cli, _progress

MODULES = ["mnist", "tune", "embeddings", "from_pytorch", "pytorch_parity", "multihost"]


@pytest.fixture
def parsers(monkeypatch):
  made = []
  real = _cli.parser

  def recording(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(_cli, "parser", recording)
  return made


@pytest.mark.parametrize("name", MODULES)
def test_help_names_the_module_and_explains_every_flag(name, parsers, capsys):
  main = importlib.import_module(f"examples.{name}.__main__")
  with pytest.raises(SystemExit) as exit_:
    main.parse_args(["--help"])
  assert exit_.value.code == 0
  text = capsys.readouterr().out
  assert text.startswith(f"usage: python -m examples.{name} "), text[:80]
  (p,) = parsers
  for action in p._actions:
    if action.dest == "help" or action.help == "==SUPPRESS==":
      continue
    flag = action.option_strings[0]
    assert action.help, f"{flag} has no help"
    shown = p.formatter_class("x")._get_help_string(action)
    assert "default" in shown or isinstance(action.default, bool), f"{flag}'s help shows no default: {shown!r}"


def test_progress_off_a_terminal_prints_a_line_every_interval():
  now = [0.0]
  out = io.StringIO()  # not a terminal
  bar = _progress.Progress(range(100), 100, "epoch 1/3", interval=5.0, file=out, clock=lambda: now[0])
  for step in bar:
    now[0] += 0.2  # 20 s in all: a line at 5, 10, 15 s
    if step == 50:
      bar.set_postfix(loss="0.5")
  lines = out.getvalue().splitlines()
  assert len(lines) == 3 and "\r" not in out.getvalue()
  assert lines[0].startswith("epoch 1/3: 25/100 steps (25%)") and lines[-1].endswith("loss=0.5")


def test_progress_can_be_off():
  out = io.StringIO()
  bar = _progress.Progress(range(10), 10, "x", enabled=False, interval=0.0, file=out)
  assert list(bar) == list(range(10)) and out.getvalue() == ""


def test_expected_errors_end_with_one_line(monkeypatch, capsys):
  monkeypatch.delenv("JADAM_TRACEBACK", raising=False)

  def fails():
    raise FileExistsError("workdir/x holds a previous sweep: pass a new --workdir\nmore detail")

  with pytest.raises(SystemExit) as exit_:
    _cli.run("python -m examples.tune", fails)
  assert exit_.value.code == "python -m examples.tune: error: workdir/x holds a previous sweep: pass a new --workdir"


def test_tune_refuses_a_previous_sweeps_workdir_before_training(tmp_path, monkeypatch):
  from examples.tune import train
  from examples.tune.configs import default

  (tmp_path / "sweep.json").write_text("{}")
  monkeypatch.setattr(train, "load_data", lambda config: pytest.fail("trained over a previous sweep"))
  with pytest.raises(FileExistsError, match="pass a new --workdir"):
    train.sweep_and_evaluate(default.get_config(), tmp_path)


def test_tune_makes_a_new_workdir_per_run():
  from examples.tune import __main__ as cli

  _, workdir = cli.parse_args([])
  assert workdir.startswith("workdir/tune-")


def test_embeddings_refuses_a_previous_runs_workdir(tmp_path):
  pytest.importorskip("gensim")
  from examples.embeddings import train

  (tmp_path / "metrics.json").write_text("{}")
  with pytest.raises(FileExistsError, match="pass a new --workdir"):
    train.train_and_evaluate(train.Config(max_steps=1), tmp_path)


def test_tune_replots_the_docs_sweep(tmp_path):
  pytest.importorskip("matplotlib")
  from examples.tune import train

  train.replot(pathlib.Path(__file__).parent.parent / "docs" / "tune_mnist_mlp.json", tmp_path / "sweep.png")
  assert (tmp_path / "sweep.png").stat().st_size > 10_000


class _Stop(Exception):
  pass


def test_tune_warns_that_a_vmapped_cnn_sweep_on_cpu_is_slower(tmp_path, monkeypatch, capsys):
  import types

  from examples.tune import train
  from examples.tune.configs import default

  data = {"train": [0] * 10, "val": [0], "test": [0]}
  monkeypatch.setattr(train, "load_data", lambda config: (data, types.SimpleNamespace(origin="sample")))
  monkeypatch.setattr(train.jax, "default_backend", lambda: "cpu")

  def stop(*args, **kwargs):
    raise _Stop

  monkeypatch.setattr(train, "train_configs", stop)
  for sequential, warned in ((False, True), (True, False)):
    config = default.Config(model="cnn", sequential=sequential)
    with pytest.raises(_Stop):
      train.sweep_and_evaluate(config, tmp_path / str(sequential))
    assert ("--sequential" in capsys.readouterr().err) == warned
