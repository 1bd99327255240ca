"""`largebatch report`: plots and one self-contained HTML page from real run directories, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import metrics, train
from matplotlib import image

from largebatch import report
from largebatch.errors import UserError
from largebatch.sweep import summarise

TINY = [
    "data.size=512",
    "data.eval_size=256",
    "data.shape=[16]",
    "model.width=32",
    "train.steps=20",
    "train.log_every=2",
    "train.eval_every=10",
]
STANDARD_PANELS = {"loss", "lr", "grad_norm", "throughput", "eval_accuracy"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real training runs of the same task at global batch 64 and 256."""
    root = tmp_path_factory.mktemp("runs")
    for batch in (64, 256):
        train(root / f"gb{batch}", *TINY, f"batch.global_size={batch}")
    return [root / "gb64", root / "gb256"]


def copy_runs(runs: list[Path], into: Path) -> list[Path]:
    return [Path(shutil.copytree(run, into / run.name)) for run in runs]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = image.imread(path).shape
    assert height > 200 and width > 300 and channels in (3, 4)


def test_report_writes_one_png_per_panel_and_the_html_page(runs: list[Path], tmp_path: Path):
    written = report.write_report(runs, tmp_path / "out")
    assert written[-1] == tmp_path / "out" / "report.html"
    assert {p.stem for p in written[:-1]} == STANDARD_PANELS
    for png in written[:-1]:
        assert_png(png)


def test_html_is_self_contained_and_tabulates_every_run(runs: list[Path], tmp_path: Path):
    written = report.write_report(runs, tmp_path / "out")
    page = written[-1].read_text()
    assert page.count('src="data:image/png;base64,') == len(written) - 1
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r"\bsrc=(\S+)", page)
    assert len(sources) == len(written) - 1 and all(
        s.startswith('"data:image/png;base64,') for s in sources
    )
    assert "href=" not in page and "<script" not in page
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        row = re.search(rf"<tr><td>{run.name}</td>(.*?)</tr>", page).group(1)
        assert f"<td>{summary['global_batch']}</td>" in row
        assert "<td>1 × " in row and summary["params_sha256"][:12] in row
        assert f"{summary['final_loss']:.4f}" in row and f"{summary['eval']['accuracy']:.4f}" in row


def test_noise_scale_and_trust_ratio_panels_appear_when_metrics_have_them(
    runs: list[Path], tmp_path: Path
):
    copies = copy_runs(runs, tmp_path)
    for run in copies:
        records = metrics(run)
        for r in records:
            r.update(
                {
                    "gns": 50.0 + r["step"],
                    "trust_ratio/fc1.weight": 0.002 * r["step"],
                    "trust_ratio/fc1.bias": 0.5,
                }
            )
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = report.write_report(copies, tmp_path / "out")
    assert {p.stem for p in written[:-1]} == STANDARD_PANELS | {"noise_scale", "trust_ratio"}
    assert_png(tmp_path / "out" / "noise_scale.png")
    assert_png(tmp_path / "out" / "trust_ratio.png")


def test_a_run_still_in_progress_is_reported_from_metrics_alone(runs: list[Path], tmp_path: Path):
    (run,) = copy_runs(runs[:1], tmp_path)
    (run / "summary.json").unlink()
    (run / "config.yaml").unlink()
    page = report.write_report([run], tmp_path / "out")[-1].read_text()
    assert f"<tr><td>{run.name}</td>" in page


def test_cli_writes_to_report_in_the_current_directory(
    runs: list[Path], tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert report.main([str(r) for r in runs]) == 0
    assert (tmp_path / "report" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def _empty(run: Path) -> None:
    (run / "metrics.jsonl").write_text("")


def _truncated(run: Path) -> None:
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[:-20])


def _blank_line(run: Path) -> None:
    (run / "metrics.jsonl").write_text("\n" + (run / "metrics.jsonl").read_text())


def _no_step(run: Path) -> None:
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')


def _no_metrics(run: Path) -> None:
    (run / "metrics.jsonl").unlink()


def _missing(run: Path) -> None:
    shutil.rmtree(run)


def _bad_summary(run: Path) -> None:
    (run / "summary.json").write_text("{not json")


@pytest.mark.parametrize(
    "damage, says",
    [
        (_missing, "does not exist"),
        (_no_metrics, "has no metrics.jsonl"),
        (_empty, "is empty"),
        (_truncated, "line 10 is not valid JSON"),
        (_blank_line, "line 1 is not valid JSON"),
        (_no_step, "has no step, samples"),
        (_bad_summary, "summary.json is unreadable"),
    ],
)
def test_a_broken_run_directory_is_a_one_line_user_error(
    runs: list[Path], tmp_path: Path, damage, says: str
):
    (run, other) = copy_runs(runs, tmp_path)
    damage(run)
    with pytest.raises(UserError) as error:
        report.write_report([other, run], tmp_path / "out")
    message = str(error.value)
    assert says in message and str(run) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_cli_without_run_directories_is_a_user_error():
    with pytest.raises(UserError, match="RUN_DIR"):
        report.main([])


def test_two_target_sweeps_also_get_their_frontiers_on_one_plot(tmp_path: Path):
    """Each target sweep keeps its own plot; together they get frontiers.png, one fitted curve and B_crit each."""
    batches = [32, 64, 128, 256]
    for name, s_min, e_min in (("muon", 20, 800), ("adamw", 30, 3200)):
        points = [
            {
                "global_batch": b,
                "lr": None,
                "optimizer": None,
                "steps": s_min + e_min / b,
                "examples": b * s_min + e_min,
                "reached": True,
                "noise_scale": None,
                "run_dir": f"{name}/b{b}",
            }
            for b in batches
        ]
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(
            json.dumps(
                {
                    "target": {"key": "eval/loss", "value": 2.5},
                    "points": points,
                    **summarise(points),
                }
            )
        )
    sweeps = [tmp_path / "muon", tmp_path / "adamw"]
    written = report.write_sweeps(sweeps, tmp_path / "out")
    assert [p.name for p in written] == ["muon.png", "adamw.png", "frontiers.png"]
    assert_png(written[-1])
    results = {d.name: json.loads((d / "sweep.json").read_text()) for d in sweeps}
    labels = [t.get_text() for t in report.frontiers_figure(results).axes[0].get_legend().texts]
    assert [label.split(":")[0] for label in labels] == ["muon", "adamw"]
    assert "B_crit 40" in labels[0] and "B_crit 107" in labels[1]
