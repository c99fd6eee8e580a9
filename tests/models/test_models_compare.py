"""models.compare: its significance verdict, 001's speed comparison, its CLI and its report,
on hand-made inputs (the full comparison trains every head: far too slow for a test)."""

import json
import math

import pytest
import torch

from models.experiments import compare

# All-correct predictions of the best head, and a rival wrong on the first k of 10 samples.
LABELS = [0] * 10


def _wrong_on(k: int) -> list[int]:
    return [1] * k + [0] * (10 - k)


def test_significance_picks_the_best_head_and_tests_each_rival():
    accuracy = {
        "cbp": {0: 0.90, 1: 0.80, 2: 0.70},
        "early": {0: 0.60, 1: 0.49, 2: 0.41},  # differences 0.30, 0.31, 0.29
        "lmf": {0: 0.90, 1: 0.80, 2: 0.69},
    }
    predictions = {
        "cbp": {s: LABELS for s in range(3)},
        "early": {0: _wrong_on(6), 1: _wrong_on(7), 2: _wrong_on(8)},
        "lmf": {0: LABELS, 1: LABELS, 2: _wrong_on(1)},
    }
    result = compare.significance(accuracy, predictions, LABELS)
    assert result["best"] == "cbp" and set(result["against"]) == {"early", "lmf"}
    early = result["against"]["early"]
    assert early["mean_difference"] == pytest.approx(0.30)
    # t = 0.30 / (0.01 / sqrt 3) on 2 degrees of freedom: two-sided p = 1 - t / sqrt(2 + t^2)
    t = 0.30 / (0.01 / math.sqrt(3))
    assert early["t_p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    assert early["significant"]
    # McNemar exact with b = k discordant samples all one way: p = 2 / 2^k
    assert early["mcnemar_p_values"] == pytest.approx({"0": 2 / 2**6, "1": 2 / 2**7, "2": 2 / 2**8})
    lmf = result["against"]["lmf"]
    # differences 0, 0, 0.01: t = (0.01/3) / (sd / sqrt 3), sd = 0.01 / sqrt 3 -> t = 1
    assert lmf["t_p_value"] == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-6)
    assert not lmf["significant"]
    assert lmf["mcnemar_p_values"] == pytest.approx({"0": 1.0, "1": 1.0, "2": 1.0})


def test_equal_differences_on_every_seed_need_mcnemar_too():
    # 0.1 better on both seeds: t is infinite, its p 0; but one discordant sample a seed is no evidence
    accuracy = {"a": {0: 1.0, 1: 1.0}, "b": {0: 0.9, 1: 0.9}}
    predictions = {"a": {0: LABELS, 1: LABELS}, "b": {0: _wrong_on(1), 1: _wrong_on(1)}}
    row = compare.significance(accuracy, predictions, LABELS)["against"]["b"]
    assert row["t_p_value"] == pytest.approx(0.0, abs=1e-12)
    assert row["mcnemar_p_values"] == pytest.approx({"0": 1.0, "1": 1.0})
    assert not row["significant"]


def test_significance_with_one_seed_has_no_t_test():
    result = compare.significance({"a": {0: 1.0}, "b": {0: 0.4}}, {"a": {0: LABELS}, "b": {0: _wrong_on(6)}}, LABELS)
    row = result["against"]["b"]
    assert row["t_p_value"] is None and not row["significant"]
    assert row["mcnemar_p_values"] == pytest.approx({"0": 2 / 2**6})


def test_published_speed_ratios():
    papers = compare.paper_ratios()
    assert list(papers) == ["001 (Table 4)", "LMF paper"]  # 001's own table first
    seed = papers["001 (Table 4)"]
    assert seed["setting"] == "audio + video"
    assert (seed["tfn"]["train"], seed["tfn"]["test"]) == (321.67, 1138.33)
    assert (seed["lmf"]["train"], seed["lmf"]["test"]) == (1153.54, 2232.82)
    assert seed["lmf_over_tfn"]["train"] == pytest.approx(3.586, abs=1e-3)
    assert seed["lmf_over_tfn"]["test"] == pytest.approx(1.961, abs=1e-3)


def test_sequence_rows_time_001s_audio_video_setting():
    settings = compare.Settings(num_train=1, num_test=1, epochs=1, seeds=(0,), reference_seeds=(0,), batch_size=4,
                                timing_budget_s=0.02)
    rows = compare.sequence_rows(settings, torch.device("cpu"), lambda _: None)
    assert len(rows["setup"]["in_dims"]) == 2  # audio and video, no text
    for name in ("lmf", "tfn"):
        for requested in (compare.REFERENCE, compare.FUSED):
            speeds = rows["models"][name]["backends"][requested]["samples_per_s"]
            assert speeds["train"] > 0 and speeds["test"] > 0
    ratio = rows["lmf_over_tfn"][compare.REFERENCE]["train"]
    lmf, tfn = (rows["models"][n]["backends"][compare.REFERENCE]["samples_per_s"]["train"] for n in ("lmf", "tfn"))
    assert ratio == pytest.approx(lmf / tfn)
    # TFN fuses (32 + 1) x (32 + 1) features: its fusion layer is a 1089 x 128 linear map, with bias
    assert rows["models"]["tfn"]["fusion_params"] >= 1089 * 128


def test_settings_from_the_command_line():
    settings = compare.settings_from_args(compare.parse_args(["--quick", "--difficulty", "hard", "--seeds", "3",
                                                              "--epochs", "2", "--num-test", "16"]))
    assert settings.difficulty == "hard" and settings.seeds == (0, 1, 2) and settings.reference_seeds == (0,)
    assert (settings.epochs, settings.num_test, settings.num_train) == (2, 16, compare.QUICK.num_train)
    assert compare.settings_from_args(compare.parse_args([])) == compare.FULL
    for bad in (["--difficulty", "extreme"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)


def _report() -> dict:
    backends = {
        compare.REFERENCE: {"backend": "eager", "model_samples_per_s": {"train": 100.0, "test": 200.0},
                            "head_samples_per_s": {"train": 1000.0, "test": 2000.0},
                            "accuracy": {"mean": 0.9, "sd": 0.01, "n": 2}, "trained_separately": True},
        compare.FUSED: {"backend": "cpp", "model_samples_per_s": {"train": 110.0, "test": 220.0},
                        "head_samples_per_s": {"train": 1500.0, "test": 2500.0},
                        "accuracy": {"mean": 0.91, "sd": 0.02, "n": 2}, "trained_separately": True},
    }
    speeds = {"lmf": {"train": 400.0, "test": 800.0}, "tfn": {"train": 100.0, "test": 400.0}}
    return {
        "schema": compare.SCHEMA,
        "quick": True,
        "environment": {"device": "cpu", "device_name": "test cpu", "threads": 1, "load_average_1min": 0.5,
                        "torch": "x", "fastfusion": "y", "available_backends": ["torch"], "git_commit": "abc",
                        "date": "today"},
        "settings": {"num_train": 8, "num_test": 4, "epochs": 1, "batch_size": 4, "lr": 1e-3, "seeds": [0, 1],
                     "difficulty": "hard"},
        "heads": [{"head": "cbp", "kind": "multiplicative", "params": 1000, "head_params": 10, "flops": 5000,
                   "head_flops": 50, "backends": backends}],
        "bilinear_vs_concat": {"additive_mean": 0.7, "multiplicative_mean": 0.9, "additive_ceiling": 0.825,
                               "every_pair": True},
        "significance": {"best": "cbp", "alpha": 0.05, "against": {
            "early": {"mean_difference": 0.2, "seeds": [0, 1], "t_p_value": 0.0123,
                      "mcnemar_p_values": {"0": 0.001, "1": 0.04}, "significant": True}}},
        "lmf_vs_tfn": {
            "setup": {"in_dims": [74, 35], "steps": 20, "hidden_dims": [32, 32], "rank": 4, "post_fusion_dim": 128,
                      "batch": 4},
            "models": {name: {"params": 10, "fusion_params": 5, "fusion_flops": 7, "backends": {
                requested: {"backend": requested, "samples_per_s": speeds[name]}
                for requested in (compare.REFERENCE, compare.FUSED)}} for name in ("lmf", "tfn")},
            "lmf_over_tfn": {requested: {"train": 4.0, "test": 2.0} for requested in (compare.REFERENCE, compare.FUSED)},
            "papers": compare.paper_ratios(),
        },
    }


def test_report_names_the_best_head_and_both_published_speed_tables():
    text = compare.render_markdown(_report())
    assert "difficulty `hard`" in text
    assert "**Best head: cbp**" in text
    assert "| early | +0.200 | 0.0123 | 0.04 | yes |" in text
    assert "| this run, eager | audio + video, batch 4 | 400 / 800 | 100 / 400 | 4.00x | 2.00x |" in text
    assert "| 001 (Table 4) | audio + video | 1,153.54 / 2,232.82 | 321.67 / 1,138.33 | 3.59x | 1.96x |" in text
    assert "| LMF paper | CMU-MOSI, audio + video + text | 1,134.82 / 2,249.90 | 340.74 / 1,177.17 | 3.33x | 1.91x |" in text


def test_render_writes_the_difficulty_block_and_refuses_old_reports(tmp_path):
    (tmp_path / "compare-cpu-hard.json").write_text(json.dumps(_report()))
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    compare.main(["--render", "--device", "cpu", "--difficulty", "hard", "--out-dir", str(tmp_path), "--no-readme"])
    assert "**Best head: cbp**" in (tmp_path / "compare-cpu-hard.md").read_text()
    compare.update_readme("block\n", "cpu-hard", readme)
    assert "<!-- compare:cpu-hard:start -->\nblock\n<!-- compare:cpu-hard:end -->" in readme.read_text()
    old = {key: value for key, value in _report().items() if key != "schema"}
    (tmp_path / "compare-cpu.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="older models.compare"):
        compare.main(["--render", "--device", "cpu", "--out-dir", str(tmp_path), "--no-readme"])
