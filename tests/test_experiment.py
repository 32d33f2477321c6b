"""`metamlip experiment` end to end on real data, small: outputs, reproducibility, cache, early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metamlip.cli.main import main
from metamlip.config import load_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.run import run_experiment


def experiment_config(tmp_path: Path, data_dir: Path, name: str = "out", **changes) -> Path:
    config = {
        "datasets": [
            {"path": str(data_dir / "qm7x_226_raw.npz")},
            {"path": str(data_dir / "comp6_s66x8_wb97x_631gd_4mol.h5")},
            {"path": str(data_dir / "md17_ethanol_dft.npz"), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"},
        ],
        "pretrain_levels": ["pbe0+mbd", "wB97X/6-31G*"],
        "target_level": "pbe+vdw-ts",
        "n_test": 20,
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1, "cutoff_angstrom": 5.0},
        "pretrain": {
            "gradient_steps": 8, "steps_per_epoch": 4,
            "training": {"batch_size": 4, "progress": False},
            "reptile": {"inner_steps": 2, "tasks_per_meta_step": 2},
        },
        "finetune": {"n_finetune": [4, 8], "seeds": 2, "training": {"batch_size": 4, "max_epochs": 3, "progress": False}},
        "threads": 1,
        "output_dir": str(tmp_path / name),
    }
    config.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("experiment")
    path = experiment_config(tmp_path, data_dir)
    return path, run_experiment(load_config(path, ExperimentConfig))


def test_results_json_has_the_documented_fields(finished):
    path, results = finished
    out = Path(load_config(path, ExperimentConfig).output_dir)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["target_level"] == "pbe+vdw-ts"
    assert on_disk["pretrain_levels"] == ["pbe0+mbd", "wb97x/6-31g(d)"]
    assert isinstance(on_disk["metamlip_version"], str)
    records = on_disk["records"]
    assert {(r["strategy"], r["n_finetune"]) for r in records} == {
        (s, n) for s in ("scratch", "joint", "multihead", "reptile") for n in (4, 8)
    }
    for record in records:
        assert record["seeds"] == 2
        for key in ("energy_mae_ev", "energy_mae_per_atom_ev", "force_mae_ev_per_angstrom"):
            assert set(record[key]) == {"mean", "std"} and record[key]["mean"] > 0
    for name in ("learning_curve.png", "report.md"):
        assert (out / name).stat().st_size > 0
    assert "learning_curve.png" in (out / "report.md").read_text()


def test_same_seeds_give_the_same_results_and_the_cache_is_reused(finished, tmp_path, data_dir):
    path, results = finished
    config = load_config(path, ExperimentConfig)
    cached = sorted((Path(config.output_dir) / "pretrained").glob("*.pt"))
    assert [p.name.split("-")[0] for p in cached] == ["joint", "multihead", "reptile", "scratch"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    config.finetune.n_finetune = [4, 8, 12]
    again = run_experiment(config)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # adding an N does not retrain
    first = {(r["strategy"], r["n_finetune"]): r for r in results["records"]}
    for record in again["records"]:
        key = (record["strategy"], record["n_finetune"])
        if key in first:
            assert record["energy_mae_ev"] == first[key]["energy_mae_ev"]


def test_parallel_workers_give_the_same_results(finished, tmp_path, data_dir):
    _, results = finished
    config = load_config(experiment_config(tmp_path, data_dir, "parallel", workers=2, strategies=["scratch", "reptile"]), ExperimentConfig)
    parallel = run_experiment(config)
    first = {(r["strategy"], r["n_finetune"]): r["energy_mae_ev"] for r in results["records"]}
    for record in parallel["records"]:
        assert record["energy_mae_ev"] == pytest.approx(first[(record["strategy"], record["n_finetune"])], rel=1e-6)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"strategies": ["scratch", "maml"]}, "unknown strategy 'maml'"),
        ({"target_level": "ccsd(t)/cbs"}, "ccsd(t)/cbs"),
        ({"pretrain_levels": ["pbe0+mbd", "b3lyp/6-31g*"]}, "b3lyp/6-31g(d)"),
        ({"datasets": [{"path": "missing.h5"}]}, "missing.h5"),
        ({"finetune": {"n_finetune": [5000]}}, "n_finetune 5000"),
    ],
)
def test_bad_experiment_configs_fail_before_training(tmp_path, data_dir, capsys, changes, fragment):
    path = experiment_config(tmp_path, data_dir, **changes)
    assert main(["experiment", str(path)]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out" / "pretrained").exists()


def test_pretraining_cache_key_ignores_the_target_file_only(tmp_path, data_dir):
    """A target file that grows (labelling still running) keeps the cached pre-trainings; a
    pre-training file that changes does not."""
    import shutil

    from metamlip.experiment.run import pretrain_cache_key
    from metamlip.strategies import get_strategy

    target, pretraining = tmp_path / "target.npz", tmp_path / "pretraining.npz"
    shutil.copy(data_dir / "md17_ethanol_dft.npz", target)
    shutil.copy(data_dir / "qm7x_226_raw.npz", pretraining)
    config = load_config(experiment_config(tmp_path, data_dir), ExperimentConfig)
    config.datasets[0].path, config.datasets[2].path = str(pretraining), str(target)
    joint = get_strategy("joint")
    key = pretrain_cache_key(config, joint, [1, 6, 8])
    with open(target, "ab") as handle:
        handle.write(b"more target structures")
    assert pretrain_cache_key(config, joint, [1, 6, 8]) == key
    with open(pretraining, "ab") as handle:
        handle.write(b"more pre-training structures")
    assert pretrain_cache_key(config, joint, [1, 6, 8]) != key


def test_pretrain_only_fills_the_cache_that_the_full_run_reuses(tmp_path, data_dir, capsys):
    path = experiment_config(tmp_path, data_dir, strategies=["joint", "scratch"], n_test=1000)
    assert main(["experiment", str(path), "--pretrain-only"]) == 0  # n_test larger than the target: not checked
    assert "joint: 8 steps" in capsys.readouterr().out
    config = load_config(path, ExperimentConfig)
    cached = sorted((Path(config.output_dir) / "pretrained").glob("*.pt"))
    assert [p.name.split("-")[0] for p in cached] == ["joint", "scratch"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert not (Path(config.output_dir) / "results.json").exists()
    summaries = json.loads((Path(config.output_dir) / "pretraining.json").read_text())
    assert summaries["joint"]["gradient_steps"] == 8 and summaries["scratch"]["stop_reason"] == "not pre-trained"
    table = (Path(config.output_dir) / "pretraining.md").read_text()
    assert "| joint | 8 |" in table and "`pbe0+mbd`" in table and "`wb97x/6-31g(d)`" in table
    config.n_test = 20
    results = run_experiment(config)
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert results["pretraining"]["joint"]["gradient_steps"] == 8


def test_stopped_pretraining_resumes_to_the_uninterrupted_result(tmp_path, data_dir, monkeypatch):
    """A pre-training stopped after its first epoch (SIGTERM) continues from its checkpoint when the
    same experiment runs again, and caches the same weights as a run that was never stopped."""
    import signal

    import torch

    from metamlip.training import loop
    from metamlip.training.checkpoint import read_checkpoint
    from metamlip.training.signals import TrainingInterrupted

    def cached_weights(config: ExperimentConfig) -> dict:
        (path,) = (Path(config.output_dir) / "pretrained").glob("joint-*.pt")
        return read_checkpoint(path)["state_dict"]

    whole = load_config(experiment_config(tmp_path, data_dir, name="whole", strategies=["joint"]), ExperimentConfig)
    run_experiment(whole)
    stopped = load_config(experiment_config(tmp_path, data_dir, name="stopped", strategies=["joint"]), ExperimentConfig)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_pending_signal", lambda stop_requests: signal.SIGTERM)
        with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped; .* resume from their last checkpoint"):
            run_experiment(stopped)
    assert not list((Path(stopped.output_dir) / "pretrained").glob("joint-*.pt"))
    (run_dir,) = (Path(stopped.output_dir) / "runs").glob("pretrain-joint-*")
    assert (run_dir / "checkpoint.pt").exists()
    results = run_experiment(stopped)
    log_epochs = [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log_epochs == [1, 2]
    assert results["pretraining"]["joint"]["epochs"] == 2
    expected = cached_weights(whole)
    for key, value in cached_weights(stopped).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_pretraining_cache_key_follows_file_contents_not_folders(tmp_path, data_dir):
    """The same data in another folder keeps the key (a study copied elsewhere reuses its cache);
    a changed byte of a pre-training file changes it."""
    import shutil

    from metamlip.experiment.run import pretrain_cache_key
    from metamlip.strategies import get_strategy

    config = load_config(experiment_config(tmp_path, data_dir), ExperimentConfig)
    joint = get_strategy("joint")
    key = pretrain_cache_key(config, joint, [1, 6, 8])
    moved = tmp_path / "moved"
    moved.mkdir()
    copy = moved / "qm7x_226_raw.npz"
    shutil.copy(data_dir / "qm7x_226_raw.npz", copy)
    config.datasets[0].path = str(copy)
    assert pretrain_cache_key(config, joint, [1, 6, 8]) == key
    content = bytearray(copy.read_bytes())
    content[-1] ^= 1
    copy.write_bytes(bytes(content))
    assert pretrain_cache_key(config, joint, [1, 6, 8]) != key


def test_backbone_table_pairs_two_runs_draw_by_draw(finished, tmp_path):
    """scripts/backbone_table.py: the second run's error / the first's on the same draws, per strategy."""
    import subprocess
    import sys

    path, results = finished
    first = Path(load_config(path, ExperimentConfig).output_dir) / "results.json"
    second = json.loads(first.read_text())
    for run in second["runs"]:
        if run["strategy"] == "joint":
            run["test"] = {key: 2 * value if key.endswith("_ev") or key.endswith("_angstrom") else value for key, value in run["test"].items()}
    (tmp_path / "second.json").write_text(json.dumps(second))
    script = Path(__file__).parents[1] / "scripts" / "backbone_table.py"
    printed = subprocess.run(
        [sys.executable, str(script), f"a={first}", f"b={tmp_path / 'second.json'}"], capture_output=True, text=True, check=True
    ).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in printed.splitlines() if line.startswith("| ") and "strategy" not in line}
    assert "### N = 4, E MAE (meV)" in printed  # the smallest N by default
    assert rows["joint"].endswith("| 2.00 [2.00, 2.00] |") and rows["scratch"].endswith("| 1.00 [1.00, 1.00] |")
    assert sum(line.startswith("- a: scratch / ") for line in printed.splitlines()) == 2  # energy and forces
    second["runs"] = [run for run in second["runs"] if run["strategy"] == "joint"]  # a rerun of one strategy
    (tmp_path / "joint_only.json").write_text(json.dumps(second))
    printed = subprocess.run(
        [sys.executable, str(script), f"a={first}", f"b={tmp_path / 'joint_only.json'}"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert len(rows) == 2 and all(row.startswith("| joint |") and row.endswith("| 2.00 [2.00, 2.00] |") for row in rows)
    assert "- b: runs ['joint'] only" in printed
