"""The command line: the happy paths on tiny budgets, and one clear line for each bad input."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metakit.cli import main

from synthetic import folder_config, make_image_folder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def config_file(folder, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(folder_config(folder, steps=4)))
    return path


def one_error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_train_then_eval_json(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "trained protonet for 4 steps" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run"), "--episodes", "30", "--json", "--ways", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"algorithm", "dataset", "split", "ways", "shots", "queries", "episodes", "accuracy", "ci95"} <= set(record)
    assert (record["algorithm"], record["dataset"], record["split"], record["ways"], record["episodes"]) == \
        ("protonet", "folder", "test", 2, 30)
    assert 0 <= record["accuracy"] <= 1 and record["ci95"] > 0


def test_bad_inputs_give_one_clear_line(config_file, tmp_path, capsys):
    assert "config file nope.yaml not found" in one_error_line(capsys, ["train", "nope.yaml"])
    line = one_error_line(capsys, ["train", str(config_file), "--set", "train.wayz=5"])
    assert "unknown key train.wayz; valid keys in train: ways, shots, queries" in line
    line = one_error_line(capsys, ["train", str(config_file), "--set", "train.ways=7", "--out", str(tmp_path / "r")])
    assert "7 ways asked but" in line and "has only 6 classes" in line
    assert not (tmp_path / "r").exists()  # refused before any work
    line = one_error_line(capsys, ["train", str(config_file), "--set", "train.shots=8"])
    assert "shots + queries = 8 + 2 = 10" in line and "use shots + queries <= 8" in line
    line = one_error_line(capsys, ["train", str(config_file), "--set", "train.shots=0"])
    assert "train.shots must be >= 1, got 0" in line
    line = one_error_line(capsys, ["train", str(config_file), "--set", "train.checkpoint_every=-1"])
    assert "train.checkpoint_every must be >= 0, got -1" in line
    assert "checkpoint missing.pt not found" in one_error_line(capsys, ["eval", "missing.pt"])
    line = one_error_line(capsys, ["train", str(config_file), "--set", f"data.path={tmp_path / 'none'}"])
    assert "image folder" in line and "not found" in line


def test_eval_count_flags_refuse_zero_instead_of_falling_back_to_the_config(capsys):
    """``--queries 0`` used to mean the config's 15 (``args.queries or e.queries``): now it is refused, before
    the checkpoint is even read."""
    for flag in ("--ways", "--shots", "--queries", "--episodes"):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "missing.pt", flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "missing.pt", "--episodes", "many"])
    assert "must be a whole number, got 'many'" in capsys.readouterr().err


def test_train_init_checks_its_checkpoint_before_work_and_yields_to_a_resume(config_file, tmp_path, capsys):
    line = one_error_line(capsys, ["train", str(config_file), "--init-step", "--out", str(tmp_path / "r")])
    assert "--init-step continues the schedule of the checkpoint given with --init" in line
    line = one_error_line(capsys, ["train", str(config_file), "--init", "missing.pt", "--out", str(tmp_path / "r")])
    assert "checkpoint missing.pt not found" in line
    assert not (tmp_path / "r").exists()  # refused before any work
    assert main(["train", str(config_file), "--out", str(tmp_path / "src"), "--quiet"]) == 0
    assert main(["train", str(config_file), "--init", str(tmp_path / "src"), "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "r" / "init.json").read_text())["checkpoint"].endswith("best.pt")
    capsys.readouterr()
    assert main(["train", str(config_file), "--init", str(tmp_path / "src"), "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    assert "has last.pt: resuming it; --init" in capsys.readouterr().err


def test_eval_refuses_an_impossible_episode(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    line = one_error_line(capsys, ["eval", str(tmp_path / "run"), "--ways", "4"])
    assert "4 ways asked but" in line and "only 3 classes" in line


def test_ctrl_c_saves_and_the_same_command_resumes(folder, tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump(folder_config(folder, steps=100000, checkpoint_every=100000, val_every=0)))
    cmd = [sys.executable, "-m", "metakit", "train", str(config), "--out", str(tmp_path / "run"), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command to resume" in err
    import torch
    step = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"]
    assert step >= 4  # written on the way out, though checkpoint_every was never reached


@pytest.mark.skipif(not (SHARED_DATA / "omniglot" / "images_background.zip").exists(),
                    reason="needs the Omniglot archives in ../shared/data")
def test_demo_path_on_a_tiny_budget(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--episodes", "20", "--root", str(SHARED_DATA),
                 "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy, 5-way 1-shot over 20 episodes:" in out and "(95% CI)" in out
    assert (tmp_path / "demo" / "learning_curve.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "best.pt").exists()


def test_data_command_reports_completeness(tmp_path, capsys):
    assert main(["data", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"images_background\.zip\s+missing", out) and "incomplete" in out
    if (SHARED_DATA / "omniglot" / "images_background.zip").exists():
        assert main(["data", "--root", str(SHARED_DATA)]) == 0
        assert "Omniglot is complete." in capsys.readouterr().out


def test_fixed_head_learners_refuse_other_ways_before_work(config_file, tmp_path, capsys):
    import yaml as _yaml
    values = _yaml.safe_load(config_file.read_text())
    values["algorithm"], values["model"] = "maml", {"hidden": 4}
    values["train"].update(steps=1, meta_batch_size=2)
    values["eval"]["ways"] = 2
    path = tmp_path / "maml.yaml"
    path.write_text(_yaml.safe_dump(values))
    line = one_error_line(capsys, ["train", str(path), "--out", str(tmp_path / "r")])
    assert "eval.ways = 2, but this maml learner has a 3-way classifier head" in line
    assert not (tmp_path / "r").exists()
    assert main(["train", str(path), "--set", "eval.ways=3", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    capsys.readouterr()
    line = one_error_line(capsys, ["eval", str(tmp_path / "r"), "--ways", "2", "--episodes", "3"])
    assert "--ways = 2, but this maml learner has a 3-way classifier head" in line


def test_eval_set_changes_test_time_inner_steps_only(tmp_path, capsys):
    """``metakit eval --set model.inner_steps_test=N``: the same weights, another test-time schedule."""
    config = tmp_path / "sin.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": "maml", "model": {"inner_lr": 0.01, "inner_steps_test": 1},
        "data": {"dataset": "sinusoid"},
        "train": {"shots": 5, "queries": 5, "meta_batch_size": 4, "steps": 3, "val_every": 0},
        "eval": {"shots": 5, "queries": 20, "episodes": 20}}))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    mses = {}
    for steps in (0, 10):
        assert main(["eval", str(tmp_path / "run" / "last.pt"), "--json",
                     "--set", f"model.inner_steps_test={steps}"]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["set"] == [f"model.inner_steps_test={steps}"]
        mses[steps] = record["mse"]
    assert mses[10] != mses[0]  # the same episodes, so only the schedule differs
    from metakit.engine import load
    assert load(tmp_path / "run" / "last.pt", ["model.inner_steps_test=10"]).options.inner_steps_test == 10
    line = one_error_line(capsys, ["eval", str(tmp_path / "run" / "last.pt"), "--set", "train.steps=5"])
    assert "only model.* options can change at evaluation" in line
    line = one_error_line(capsys, ["eval", str(tmp_path / "run" / "last.pt"), "--set", "model.inner_stepz=5"])
    assert "unknown key model.inner_stepz" in line
    line = one_error_line(capsys, ["eval", str(tmp_path / "run" / "last.pt"), "--set", "model.mlp_hidden=[8]"])
    assert "weights do not fit" in line


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not (SHARED_DATA / "omniglot" / "images_background.zip").exists(),
                    reason="needs the shared Omniglot archives")
def test_readme_error_examples_are_what_the_cli_prints(capsys, monkeypatch):
    # The README shows `$ metakit ...` lines each followed by the one error line it prints; both must stay true.
    monkeypatch.setenv("METAKIT_DATA", str(SHARED_DATA))
    text = README.read_text()
    examples = re.findall(r"^\$ metakit (.+)\n(metakit .+: error: .+)$", text, flags=re.M)
    assert len(examples) >= 2
    for command, printed in examples:
        # paths in the examples are relative to the repository root
        argv = [str(README.parent / a) if (README.parent / a).is_file() else a for a in command.split()]
        line = one_error_line(capsys, argv)
        assert line == printed, f"README shows for `metakit {command}`:\n{printed}\nthe CLI prints:\n{line}"
