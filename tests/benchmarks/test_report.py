"""BENCHMARKS.md's side-by-side sections: each goal's verdict follows the measured ratios and qualities."""

from benchmarks.report import sharded_section, trainer_section


def trainer_record(variant: str, speed: float, ftlab_acc: list[float], hf_acc: list[float]) -> dict:
    return {"benchmark": "hf_trainer", "policy": "full", "variant": variant, "rows": 480, "seeds": [0, 1, 2],
            "ftlab_train_s": [10.0] * 3, "hf_train_s": [10.0 * speed] * 3, "speed_ratios": [speed] * 3,
            "ftlab_speed_vs_hf": speed, "ftlab_samples_per_s": 48.0, "hf_samples_per_s": 48.0 / speed,
            "ftlab_accuracy": ftlab_acc, "hf_accuracy": hf_acc, "accuracy_noise": 0.005,
            "ftlab_real_token_fraction": 0.96, "hf_real_token_fraction": 0.94, "hf_optim": "adamw_torch_fused",
            "hf_sampler": "group_by_length"}


def trl_record(speed: float, ftlab_loss: float) -> dict:
    return {"benchmark": "trl_sft", "rows": 48, "rounds": 2, "seed": 0, "real_tokens": 2500,
            "ftlab_train_s": [100.0, 110.0], "trl_train_s": [100.0 * speed, 110.0 * speed],
            "ftlab_tokens_per_s": 25.0, "trl_tokens_per_s": 25.0 / speed, "speed_ratios": [speed, speed],
            "ftlab_speed_vs_trl": speed, "ftlab_heldout_loss": [ftlab_loss] * 2, "trl_heldout_loss": [2.0, 2.0],
            "ftlab_steps": 3, "trl_steps": 3, "ftlab_packed_rows": 11, "trl_packed_rows": 11, "ftlab_row_fill": 0.9,
            "trl_row_fill": 0.9, "ftlab_real_token_fraction": 0.9, "trl_real_token_fraction": 1.0}


def goals(md: list[str]) -> list[str]:
    """The goal cell of each table row that has one."""
    return [line.rsplit("|", 2)[1].strip() for line in "\n".join(md).splitlines()
            if line.startswith("| ") and line.rstrip().endswith("|") and ("met" in line.rsplit("|", 2)[1] or
                                                                           "not a goal" in line)]


def test_trainer_goal_needs_both_speed_and_accuracy():
    md = trainer_section([trainer_record("best", 1.05, [0.80, 0.81, 0.80], [0.80, 0.80, 0.81]),
                          trainer_record("best", 0.95, [0.80] * 3, [0.80] * 3),
                          trainer_record("best", 1.20, [0.70] * 3, [0.80] * 3),
                          trainer_record("default", 1.60, [0.80] * 3, [0.80] * 3)], [])
    assert goals(md) == ["met", "**not met**", "**not met**", "(not a goal)"]
    text = "\n".join(md)
    assert "**1.05x**" in text and "**out of the box**" in text and "0.960 / 0.940" in text


def test_trl_goal_needs_speed_and_the_same_heldout_loss():
    assert goals(trainer_section([], [trl_record(1.10, 2.01)])) == ["met"]
    assert goals(trainer_section([], [trl_record(0.90, 2.00)])) == ["**not met**"]
    assert goals(trainer_section([], [trl_record(1.10, 2.30)])) == ["**not met**"]


def test_sharded_goal_is_097_of_the_plain_loop():
    records = [{"benchmark": "sharded_overhead", "strategy": s, "ranks": 2, "steps": 12, "rounds": 2,
                "ftlab_step_s": 1.0, "plain_step_s": r, "ratios": [r, r], "ftlab_speed_vs_plain": r}
               for s, r in (("fsdp", 0.98), ("deepspeed_stage_3", 0.95))]
    md = sharded_section(records)
    assert goals(md) == ["met", "**not met**"]
    assert "**0.980x**" in "\n".join(md)


def test_scale_section_shows_the_load_without_its_forward_beside_the_goal():
    """The sharded load alone is reported as a ratio of one process's load phase; the goal's verdict stays on
    the load phase as measured (with its forward)."""
    from benchmarks.report import scale_section

    model = {"params": 358e6, "layers": 20, "hidden": 1024, "vocab": 49152, "checkpoint_mb": 1364}
    records = [{"phase": "load", "strategy": "single", "ranks": 1, "peak_private_mb": [2000.0]},
               {"phase": "load", "strategy": "fsdp", "ranks": 2, "peak_private_mb": [1600.0, 1500.0],
                "load_alone_peak_mb": [1200.0, 1100.0]}]
    md = "\n".join(scale_section(records, model))
    assert "| load, no forward | fsdp, 2 ranks | 1,200 / 1,100 | 0.60x / 0.55x |" in md, md
    assert "| load | fsdp, 2 ranks | 1,600 / 1,500 | **0.80x** / **0.75x** |" in md and "**not met**" in md, md
    assert "fsdp: 0.60x / 0.55x" in md and "14% of the model" in md, md
