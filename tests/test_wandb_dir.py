"""A wandb folder that cannot take files is one line, not a run whose offline wandb data lands in node-local /tmp."""

from __future__ import annotations

from pathlib import Path

import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/inpaint.yaml")


def test_unwritable_wandb_save_dir_is_one_line_before_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "a_file").write_text("")  # a folder below a file: unwritable even for root (read-only mounts alike)
    bad = tmp_path / "a_file/wandb"
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path / "logs"), "lightning.trainer.max_steps=1",
                    "lightning.loggers.wandb.params.project=p", f"lightning.loggers.wandb.params.save_dir={bad}"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"lightning.loggers.wandb.params.save_dir={bad}: cannot write")
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
