"""Per-strategy settings, selection on proxy levels without reading the target, paired statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from metamlip.cli.main import main
from metamlip.config import load_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.run import config_for_strategy, run_experiment, strategy_names
from metamlip.experiment.selection import run_selection
from metamlip.experiment.statistics import paired_ratio


def write_config(tmp_path: Path, data_dir: Path, name: str, target_path: Path | None = None, **changes) -> Path:
    """Pre-training on QM7-X (PBE0+MBD) and COMP6 (wB97X/6-31G(d)); target MD17 ethanol, declared by level."""
    config = {
        "datasets": [
            {"path": str(data_dir / "qm7x_226_raw.npz")},
            {"path": str(data_dir / "comp6_s66x8_wb97x_631gd_4mol.h5")},
            {"path": str(target_path or data_dir / "md17_ethanol_dft.npz"), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"},
        ],
        "pretrain_levels": ["pbe0+mbd", "wB97X/6-31G*"],
        "target_level": "pbe+vdw-ts",
        "strategies": ["joint", "reptile"],
        "n_test": 20,
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1, "cutoff_angstrom": 5.0},
        "pretrain": {"gradient_steps": 8, "steps_per_epoch": 4, "training": {"batch_size": 4, "progress": False},
                     "reptile": {"inner_steps": 2, "tasks_per_meta_step": 1}},
        "finetune": {"n_finetune": [4], "seeds": 3, "training": {"batch_size": 4, "max_epochs": 2, "progress": False}},
        "selection": {"n_finetune": [4], "seeds": 2, "n_test": 10,
                      "grid": {"reptile": {"pretrain.reptile.inner_steps": [1, 2], "finetune.training.learning_rate": [0.001]}}},
        "threads": 1,
        "output_dir": str(tmp_path / name),
    }
    config.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_paired_ratio_bootstrap_and_verdicts():
    same = paired_ratio([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["ratio"] == pytest.approx(1.0) and same["verdict"] == "tie"
    half = paired_ratio([0.5, 1.0, 1.5, 2.0, 2.5], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert half["ratio"] == pytest.approx(0.5) and half["low"] == pytest.approx(0.5) and half["high"] == pytest.approx(0.5)
    assert half["verdict"] == "win"
    worse = paired_ratio([2.0, 2.2, 1.9, 2.1, 2.0], [1.0, 1.1, 1.0, 1.05, 0.95])
    assert worse["verdict"] == "loss" and worse["low"] > 1
    mixed = paired_ratio([1.0, 3.0, 1.0, 3.0, 2.0], [3.0, 1.0, 3.0, 1.0, 2.0])
    assert mixed["verdict"] == "tie" and mixed["low"] < 1 < mixed["high"]


def test_strategy_settings_apply_to_one_strategy_and_shared_keys_are_refused(tmp_path, data_dir, capsys):
    path = write_config(tmp_path, data_dir, "settings", strategies=["joint", "single"],
                        strategy_settings={"joint": {"finetune.training.learning_rate": 0.005}, "single": {"pretrain.gradient_steps": 4}})
    config = load_config(path, ExperimentConfig)
    assert strategy_names(config) == ["joint", "single:pbe0+mbd", "single:wb97x/6-31g(d)"]
    assert config_for_strategy(config, "joint").finetune.training.learning_rate == 0.005
    assert config_for_strategy(config, "single:pbe0+mbd").pretrain.gradient_steps == 4
    assert config_for_strategy(config, "single:pbe0+mbd").finetune.training.learning_rate == config.finetune.training.learning_rate
    bad = write_config(tmp_path, data_dir, "bad", strategy_settings={"joint": {"finetune.seeds": 5}})
    assert main(["experiment", str(bad)]) == 2
    assert "finetune.seeds" in capsys.readouterr().err
    unknown = write_config(tmp_path, data_dir, "unknown", strategy_settings={"joint": {"finetune.training.learning_rat": 0.1}})
    assert main(["experiment", str(unknown)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_experiment_reports_pretraining_cost_per_seed_values_and_paired_comparisons(tmp_path, data_dir):
    path = write_config(tmp_path, data_dir, "stats", strategies=["joint", "reptile", "single:pbe0+mbd"])
    results = run_experiment(load_config(path, ExperimentConfig))
    assert set(results["pretraining"]) == {"joint", "reptile", "single:pbe0+mbd"}
    for summary in results["pretraining"].values():
        assert summary["gradient_steps"] == 8 and summary["wall_seconds"] > 0 and summary["validation"]
    assert len([run for run in results["runs"] if run["strategy"] == "reptile"]) == 3
    pairs = {(c["strategy"], c["against"], c["metric"]) for c in results["comparisons"]}
    assert ("joint", "reptile", "energy_mae_ev") in pairs and ("joint", "reptile", "force_mae_ev_per_angstrom") in pairs
    claim = [c for c in results["claim"] if c["metric"] == "energy_mae_ev"]
    assert claim[0]["meta_learner"] == "reptile" and claim[0]["baseline"] in ("joint", "single:pbe0+mbd")
    report = (Path(results_dir := load_config(path, ExperimentConfig).output_dir) / "report.md").read_text()
    assert "## Pre-training" in report and "## Paired comparisons" in report and "single:pbe0+mbd" in report


def test_selection_chooses_on_proxies_and_never_reads_the_target(tmp_path, data_dir, monkeypatch):
    corrupt = tmp_path / "target.npz"
    corrupt.write_bytes(b"not an npz file: reading it would fail")
    path = write_config(tmp_path, data_dir, "select", target_path=corrupt)
    import metamlip.data.batching as batching

    levels_seen: set[str] = set()
    original = batching.StructureBatcher.__init__

    def recording_init(self, dataset, *args, **kwargs):
        levels_seen.add(dataset.level)
        original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(batching.StructureBatcher, "__init__", recording_init)
    results = run_selection(load_config(path, ExperimentConfig), tmp_path / "selection")
    assert "pbe+vdw-ts" not in levels_seen and levels_seen == {"pbe0+mbd", "wb97x/6-31g(d)"}
    assert results["proxy_levels"] == ["pbe0+mbd", "wb97x/6-31g(d)"]
    scores = [item for item in results["scores"] if item["strategy"] == "reptile"]
    assert len(scores) == 2 and all(len(item["runs"]) == 2 * 2 for item in scores)  # 2 proxies x 2 seeds
    for item in scores:
        assert item["score_energy_mae_ev"] == pytest.approx(np.exp(np.mean(np.log([run["energy_mae_ev"] for run in item["runs"]]))))
    best = min(scores, key=lambda item: item["score_energy_mae_ev"])
    assert results["chosen"] == {"reptile": best["settings"]}
    selected = yaml.safe_load((tmp_path / "selection" / "selected.yaml").read_text())
    assert selected == {"strategy_settings": results["chosen"]}
    assert json.loads((tmp_path / "selection" / "selection.json").read_text())["chosen"] == results["chosen"]


def test_a_diverging_grid_point_is_recorded_never_chosen_and_results_are_reused(tmp_path, data_dir):
    grid = {"joint": {"finetune.training.learning_rate": [0.001, 1.0e6]}}
    path = write_config(tmp_path, data_dir, "diverge", selection={"n_finetune": [4], "seeds": 2, "n_test": 10, "grid": grid}, strategies=["joint"])
    config = load_config(path, ExperimentConfig)
    results = run_selection(config, tmp_path / "selection")
    diverged = [item for item in results["scores"] if item["settings"]["finetune.training.learning_rate"] == 1.0e6]
    assert diverged[0]["score_energy_mae_ev"] is None and "diverged" in diverged[0]["diverged"]
    assert results["chosen"] == {"joint": {"finetune.training.learning_rate": 0.001}}
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "selection" / "scores").glob("*.json"))
    assert len(stamps) == 2 and run_selection(config, tmp_path / "selection")["scores"] == results["scores"]
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "selection" / "scores").glob("*.json")) == stamps


def test_selection_scores_are_kept_by_the_contents_of_the_data_not_its_path(tmp_path, data_dir):
    grid = {"joint": {"finetune.training.learning_rate": [0.001]}}
    selection = {"n_finetune": [4], "seeds": 1, "n_test": 10, "grid": grid}
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(data_dir / "qm7x_226_raw.npz", moved / "qm7x_226_raw.npz")
    first = write_config(tmp_path, data_dir, "first", selection=selection, strategies=["joint"])
    run_selection(load_config(first, ExperimentConfig), tmp_path / "selection")
    scores = tmp_path / "selection" / "scores"
    kept = {path.name: path.stat().st_mtime_ns for path in scores.glob("*.json")}
    assert len(kept) == 1

    def config_with_qm7x(name: str):
        config = yaml.safe_load(first.read_text())
        config["datasets"][0]["path"] = str(moved / "qm7x_226_raw.npz")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return load_config(path, ExperimentConfig)

    run_selection(config_with_qm7x("same_contents"), tmp_path / "selection")  # same bytes, other folder: reused
    assert {path.name: path.stat().st_mtime_ns for path in scores.glob("*.json")} == kept
    qm7x = dict(np.load(data_dir / "qm7x_226_raw.npz"))
    qm7x["ePBE0+MBD"] = qm7x["ePBE0+MBD"] + 0.01  # eV, one number changed in every structure
    np.savez(moved / "qm7x_226_raw.npz", **qm7x)
    run_selection(config_with_qm7x("changed_contents"), tmp_path / "selection")
    assert len(list(scores.glob("*.json"))) == 2  # scored again, not read from the stale file


@pytest.mark.parametrize(
    "name",
    [
        "demo_ethanol.yaml", "demo_ethanol_mace.yaml", "ethanol_study.yaml", "methyl_formate_study.yaml",
        "methyl_formate_mace_study.yaml", "methyl_formate_ccsdt_study.yaml", "organic_paracetamol_study.yaml",
    ],
)
def test_shipped_experiment_configs_are_valid_and_declare_their_target(name):
    from metamlip.experiment.run import check_strategies, read_selection
    from metamlip.experiment.run import non_target_sources

    path = Path(__file__).parents[1] / "metamlip" / "configs" / name
    config, selection = read_selection(load_config(path, ExperimentConfig))
    check_strategies(config)
    assert len(non_target_sources(config)) == len(config.datasets) - 1  # select never opens the target's file
    assert selection["target_level_read"] is False and selection["proxy_levels"] == ["hf/6-31g(d)", "b3lyp/6-31g(d)"]
    assert config.strategy_settings["reptile"]["pretrain.reptile.inner_steps"] == 3  # the choice of the shipped selection


@pytest.mark.parametrize(
    ("mace_name", "hipnn_name"), [("demo_ethanol_mace.yaml", "demo_ethanol.yaml"), ("methyl_formate_mace_study.yaml", "methyl_formate_study.yaml")]
)
def test_mace_comparison_configs_differ_from_their_hipnn_runs_only_in_the_model(mace_name, hipnn_name):
    """The strategies x backbones table pairs the two runs draw by draw: same data, strategies,
    selected settings, budgets and fine-tuning protocol; only the model (and the demo's number of
    draws, and the output folder) may differ."""
    import dataclasses

    configs = Path(__file__).parents[1] / "metamlip" / "configs"
    mace = load_config(configs / mace_name, ExperimentConfig)
    hipnn = load_config(configs / hipnn_name, ExperimentConfig)
    assert mace.model.backbone == "mace" and hipnn.model.backbone == "hipnn"
    for field in dataclasses.fields(ExperimentConfig):
        if field.name not in ("model", "finetune", "output_dir"):
            assert getattr(mace, field.name) == getattr(hipnn, field.name), field.name
    assert dataclasses.replace(mace.finetune, seeds=hipnn.finetune.seeds) == hipnn.finetune
    assert mace.model.dtype == hipnn.model.dtype and mace.model.seed == hipnn.model.seed


def test_a_proxy_that_anchors_other_levels_takes_them_out_of_its_pretraining(tmp_path):
    """On the organic study, four levels' references are anchored to wB97X/6-31G(d): with that level as
    a proxy target they leave its pre-training (their references would be fitted on its energies), and
    no anchor names a level that is not pre-trained; other proxies keep every anchor they can."""
    from metamlip.experiment.selection import proxy_config
    from metamlip.levels import normalise_level
    from metamlip.pretrain import checked_reference_anchors

    config = load_config(Path(__file__).parents[1] / "metamlip" / "configs" / "organic_paracetamol_study.yaml", ExperimentConfig)
    anchored = {"wb97x/def2-tzvpp", "hf/cc-pvdz", "mp2/cc-pvdz", "ccsd(t)/cbs"}
    proxy = proxy_config(config, "wb97x/6-31g(d)", "joint", {}, tmp_path)
    assert set(proxy.pretrain_levels) == set(config.pretrain_levels) - anchored - {"wb97x/6-31g(d)"}
    assert proxy.pretrain.reference_anchors == {}
    proxy = proxy_config(config, "mp2/cc-pvdz", "joint", {}, tmp_path)  # an anchored level as the proxy: its own anchor goes
    assert set(proxy.pretrain.reference_anchors) == anchored - {"mp2/cc-pvdz"}
    assert set(proxy.pretrain_levels) == set(config.pretrain_levels) - {"mp2/cc-pvdz"}
    proxy = proxy_config(config, "pbe0+mbd", "joint", {}, tmp_path)
    assert proxy.pretrain.reference_anchors == config.pretrain.reference_anchors
    for level in ("wb97x/6-31g(d)", "mp2/cc-pvdz", "pbe0+mbd"):  # every anchor of a proxy run names two of its levels
        proxy = proxy_config(config, level, "joint", {}, tmp_path)
        checked_reference_anchors(proxy.pretrain.reference_anchors, {normalise_level(name): None for name in proxy.pretrain_levels})


def spawned_workers(parent_pid: int, count: int = 2, timeout_s: float = 120.0) -> list[int]:
    """Process ids of the multiprocessing spawn workers of `parent_pid`, once `count` of them run."""
    import time

    deadline = time.time() + timeout_s
    workers: list[int] = []
    while time.time() < deadline and len(workers) < count:
        time.sleep(0.5)
        workers = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent_pid:
                    if "spawn_main" in (entry / "cmdline").read_text(errors="ignore"):
                        workers.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    assert len(workers) >= count, "the experiment never started its worker processes"
    return workers


def still_running(workers: list[int], timeout_s: float = 15.0) -> list[int]:
    """The workers still alive after up to `timeout_s` (killed before returning, so no test leaves orphans)."""
    import os
    import signal
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.5)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def long_two_worker_experiment(tmp_path: Path, data_dir: Path, name: str) -> Path:
    return write_config(tmp_path, data_dir, name, workers=2, strategies=["joint", "multihead"],
                        pretrain={"gradient_steps": 100000, "steps_per_epoch": 50, "training": {"batch_size": 4, "progress": False}})


def test_experiment_workers_end_when_the_parent_is_killed(tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = long_two_worker_experiment(tmp_path, data_dir, "orphans")
    parent = subprocess.Popen([sys.executable, "-m", "metamlip", "experiment", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = spawned_workers(parent.pid)
    time.sleep(2)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert not still_running(workers)


def test_training_interrupted_survives_pickling_from_a_worker():
    import pickle

    from metamlip.training.signals import TrainingInterrupted

    copy = pickle.loads(pickle.dumps(TrainingInterrupted("SIGTERM: stopped after epoch 3", 15)))
    assert isinstance(copy, TrainingInterrupted) and str(copy) == "SIGTERM: stopped after epoch 3" and copy.exit_code == 143


def test_ctrl_c_stops_a_two_worker_experiment_and_says_what_is_kept(tmp_path, data_dir):
    """A terminal's Ctrl-C (SIGINT to the whole process group) used to leave the experiment hanging."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = long_two_worker_experiment(tmp_path, data_dir, "ctrl_c")
    parent = subprocess.Popen([sys.executable, "-m", "metamlip", "experiment", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    workers = spawned_workers(parent.pid)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "ctrl_c" / "runs").glob("pretrain-*/log.jsonl")):
        time.sleep(0.5)  # interrupt pre-training itself, after its first epoch
    os.killpg(parent.pid, signal.SIGINT)
    try:
        code = parent.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        still_running(workers, 0.0)
        pytest.fail("the experiment did not stop within 90 s of Ctrl-C")
    error = parent.stderr.read().decode()
    assert code == 130, error
    assert "SIGINT: stopped; finished pre-trainings are cached in" in error and "--resume" not in error
    assert not still_running(workers)


def test_experiment_takes_settings_and_scores_from_a_selection_file(tmp_path, data_dir, capsys):
    chosen = {"reptile": {"pretrain.reptile.inner_steps": 1}, "joint": {"finetune.training.learning_rate": 0.002},
              "fomaml": {"finetune.training.learning_rate": 0.003}}
    scores = [{"strategy": name, "settings": settings, "score_energy_mae_ev": 0.05, "diverged": None, "runs": []} for name, settings in chosen.items()]
    scores.append({"strategy": "reptile", "settings": {"pretrain.reptile.inner_steps": 2}, "score_energy_mae_ev": None, "diverged": "diverged at epoch 1"})
    (tmp_path / "picked.json").write_text(json.dumps({"proxy_levels": ["pbe0+mbd"], "target_level_read": False, "chosen": chosen, "scores": scores}))
    path = write_config(tmp_path, data_dir, "from_file", selection_file="picked.json",
                        strategy_settings={"joint": {"finetune.training.learning_rate": 0.005}})
    config = load_config(path, ExperimentConfig)
    assert config.selection_file == str(tmp_path / "picked.json")  # relative to the config file
    results = run_experiment(config)
    # chosen settings apply to strategies the config leaves open; the config's own entry wins; fomaml is not run
    assert results["strategy_settings"] == {"joint": {"finetune.training.learning_rate": 0.005}, "reptile": {"pretrain.reptile.inner_steps": 1}}
    assert set(results["selection"]["chosen"]) == {"joint", "reptile"} and len(results["selection"]["scores"]) == 3
    report = (Path(config.output_dir) / "report.md").read_text()
    assert "## Settings chosen on proxy tasks" in report and "diverged" in report and "picked.json" in report
    (tmp_path / "broken.json").write_text('{"chosen": {}}')
    broken = write_config(tmp_path, data_dir, "broken", selection_file="broken.json")
    assert main(["experiment", str(broken)]) == 2
    error = capsys.readouterr().err
    assert "selection_file" in error and "broken.json" in error
    missing = write_config(tmp_path, data_dir, "missing", selection_file="nowhere.json")
    assert main(["experiment", str(missing)]) == 2
    assert "nowhere.json" in capsys.readouterr().err
