"""The two commands exactly as the README gives them: prepare-training, train, then colorize with the run's release."""
from __future__ import annotations

import json

from colorflow_core.cli import build_parser, main

from .conftest import write_chapters


def test_prepare_train_colorize_from_the_command_line(prepared, tmp_path, capsys):
    _, release, base, _ = prepared
    chapters = write_chapters(tmp_path / "chapters", (5,))
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare-training", str(chapters), "--out", str(data), "--colorflow", str(release), "--width", "64",
                 "--height", "96", "--styles", "gray,screen", "--pool-size", "20", "--top-k", "12", "--seed", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 2
    args = ["train", str(data), "--out", str(run), "--colorflow", str(release), "--base", str(base), "--target", "all",
            "--steps", "1", "--width", "32", "--height", "48", "--lr", "1e-4", "--batch-size", "1", "--seed", "0",
            "--device", "cpu"]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(m["step"], m["target"]) for m in metrics} == {(1, "icp"), (1, "gsrp")}
    assert main(args) == 1 and "--resume" in capsys.readouterr().err  # a run is never overwritten
    assert main(args[:-2] + ["--steps", "2", "--resume", "--device", "cpu"]) == 0
    assert [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 1, 2, 2]
    page = next((data / "frames" / "ch5").iterdir()) / "gray.png"
    code = main(["colorize", "--colorflow", str(run / "release"), "--base", str(base), "--refs", str(chapters / "ch5"),
                 "--out", str(tmp_path / "out"), "--width", "64", "--height", "96", "--steps", "1", "--preprocess", "gray",
                 "--device", "cpu", str(page)])
    assert code == 0 and (tmp_path / "out" / "gray.png").is_file()


def test_train_help_documents_every_option():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    for action in train._actions:
        assert action.help, action.dest
    for option in ("--colorflow", "--base", "--target", "--steps", "--width", "--height", "--lr", "--batch-size",
                   "--seed", "--resume"):
        assert option in text
