"""Every number tied to the weights and data that made it (issue 31, family 4): an exported file is reported
under the digest of the graph that ran, --images and the predictions tables name the checkpoint, its weights
and the check that judged the photos, a run fine-tuned from one of the project's checkpoints says so, and an
external dataset that holds the run's training photos (by name or renamed) is evaluated without them."""
import json
import shutil

import pandas as pd
import pytest
import torch

import evaluate
import fundus
import plot
import train
from runtime import checkpoint_digest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import dataloader  # noqa: E402
import deploy  # noqa: E402
import export  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory):
    """One ResNet18 trained 1 epoch on the tiny demo set (no validation split: the reference split is train)."""
    ws = tmp_path_factory.mktemp("provenance_outputs")
    train.main(["--data-root", str(tiny_demo), "--image-size", "32", "--batch-size", "8", "--workers", "0",
                "--epochs", "1", "--checkpoint-dir", str(ws / "checkpoints"), "--log-dir", str(ws / "logs"),
                "--quiet"])
    return {"ws": ws, "demo": tiny_demo, "best": ws / "checkpoints" / "resnet18_scratch" / "best.pt"}


def evaluate_quietly(*argv):
    evaluate.main([*map(str, argv), "--workers", "0", "--quiet"])


def read(path):
    return json.loads(path.read_text())


def zero_fc(source, target, keep_graph_digest=True):
    """A copy of an exported file with the classifier's weights zeroed, its metadata untouched (or without the
    graph digest, as a file exported before export.py wrote one)."""
    proto = onnx.load(str(source))
    (fc,) = [t for t in proto.graph.initializer if "fc" in t.name and "weight" in t.name]
    fc.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(fc) * 0, fc.name))
    if not keep_graph_digest:
        kept = [(e.key, e.value) for e in proto.metadata_props if e.key != "graph_weights_digest"]
        del proto.metadata_props[:]
        for key, value in kept:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(proto, str(target))
    return target


def test_an_onnx_file_with_changed_weights_is_not_reported_as_the_checkpoint(run, tmp_path, capsys):
    ws, best = run["ws"], run["best"]
    logs, figures = ws / "logs", tmp_path / "figures"
    export.main([str(best), "--check-images", "8"])
    exported = best.with_suffix(".onnx")
    meta = deploy.read_metadata(exported)
    checkpoint = torch.load(best, weights_only=True)
    assert meta["graph_weights_digest"] == deploy.graph_digest(exported) != checkpoint_digest(checkpoint)  # BN folded
    evaluate_quietly(exported, "--figure-dir", figures)
    honest = read(logs / "resnet18_scratch_onnx_eval.json")
    assert honest["weights_digest"] == checkpoint["best_weights_digest"] and honest["claimed_weights_digest"] is None
    assert honest["graph_weights_digest"] == meta["graph_weights_digest"]
    plot.main([str(logs), "--out", str(tmp_path / "plots")])
    assert "| resnet18_scratch (ONNX fp32) |" in (tmp_path / "plots" / "summary.md").read_text()

    for keep in (True, False):  # a graph digest that differs, and none recorded at all
        capsys.readouterr()
        changed = zero_fc(exported, tmp_path / f"changed_{keep}.onnx", keep)
        evaluate_quietly(changed, "--figure-dir", figures)
        printed = capsys.readouterr().out
        result = read(logs / "resnet18_scratch_onnx_eval.json")
        assert result["weights_digest"] == deploy.graph_digest(changed) != checkpoint["best_weights_digest"]
        assert result["claimed_weights_digest"] == checkpoint["best_weights_digest"]
        assert "is not taken: reported under the graph's own digest" in printed
        predictions = pd.read_csv(result["predictions"])
        assert set(predictions["weights_digest"]) == {result["weights_digest"]}
        plot.main([str(logs), "--out", str(tmp_path / "plots")])
        printed = capsys.readouterr().out
        assert f"skipping {logs / 'resnet18_scratch_onnx_eval.json'}" in printed
        assert "not those export.py wrote" in printed
        assert "(ONNX" not in (tmp_path / "plots" / "summary.md").read_text()


def test_images_output_names_the_checkpoint_its_weights_and_the_quality_check(run, tmp_path, capsys):
    best = run["best"]
    photos = sorted((run["demo"] / "images").glob("*.jpeg"))[:2]
    csv = tmp_path / "grades.csv"
    capsys.readouterr()
    evaluate_quietly(best, "--images", *photos, "--out", csv)
    printed = capsys.readouterr().out
    digest = checkpoint_digest(torch.load(best, weights_only=True))
    table = pd.read_csv(csv)
    assert list(table.columns) == evaluate.PHOTO_COLUMNS
    assert set(table["checkpoint"]) == {str(best)} and set(table["weights_digest"]) == {digest}
    assert set(table["quality_check"]) == {fundus.check_version()}
    assert table["min_quality"].tolist() == pytest.approx([fundus.quality_model()["min_quality"]] * 2, abs=1e-6)
    first = printed.splitlines()[0]
    assert str(best) in first and digest[:12] in first and f"quality check {fundus.check_version()}" in first


def test_the_predictions_tables_name_checkpoint_weights_split_and_dataset(run):
    ws, best = run["ws"], run["best"]
    evaluate_quietly(best, "--figure-dir", ws / "figures")
    result = read(ws / "logs" / "resnet18_scratch_eval.json")
    for key, split in (("predictions", "test"), ("reference_predictions", "train")):
        table = pd.read_csv(result[key], dtype={"image": str})
        assert list(table.columns) == evaluate.PREDICTION_COLUMNS
        for column, value in (("checkpoint", str(best)), ("weights_digest", result["weights_digest"]),
                              ("split", split), ("dataset", "demo")):
            assert set(table[column].astype(str)) == {value}, column


def test_fine_tuning_from_a_checkpoint_of_this_project_says_so(run, capsys):
    ws, best = run["ws"], run["best"]
    capsys.readouterr()
    train.main(["--data-root", str(run["demo"]), "--image-size", "32", "--batch-size", "8", "--workers", "0",
                "--epochs", "1", "--weights", str(best), "--checkpoint-dir", str(ws / "checkpoints"),
                "--log-dir", str(ws / "logs"), "--quiet"])
    printed = capsys.readouterr().out
    source = torch.load(best, weights_only=True)
    tuned = torch.load(ws / "checkpoints" / "resnet18_finetuned" / "last.pt", weights_only=True)
    started = tuned["config"]["started_from"]
    assert started["kind"] == "checkpoint" and started["path"] == str(best.absolute())
    assert started["checkpoint_digest"] == checkpoint_digest(source) == source["best_weights_digest"]
    assert started["run_name"] == "resnet18_scratch" and started["epoch"] == source["epoch"]
    assert read(ws / "logs" / "resnet18_finetuned.json")["config"]["started_from"] == started
    assert "ImageNet weights:" not in printed
    assert f"started from checkpoint {best.absolute()}" in printed and "its head kept" in printed
    assert not (ws / "checkpoints" / "resnet18_pretrained").exists()


def test_an_external_set_holding_the_runs_training_photos_is_evaluated_without_them(run, tmp_path, capsys):
    ws, best = run["ws"], run["best"]
    own = dataloader.load_fundus_data(run["demo"], log=lambda *a, **k: None)
    other = tmp_path / "clinic"
    (other / "train_images").mkdir(parents=True)
    rows = []
    train_paths, test_paths = list(own.train.paths), list(own.test.paths)
    for path, grade in zip(train_paths[:3], own.train.grades[:3]):  # the same photos, the same names
        shutil.copy(path, other / "train_images" / f"{dataloader.Path(path).stem}.jpeg")
        rows.append((dataloader.Path(path).stem, grade))
    for k, (path, grade) in enumerate(zip(train_paths[3:5], own.train.grades[3:5])):  # renamed
        shutil.copy(path, other / "train_images" / f"clinic{k:03d}.jpeg")
        rows.append((f"clinic{k:03d}", grade))
    # a photo under a training photo's name that is another photo (the run's test photo): kept, and noted
    shutil.copy(test_paths[0], other / "train_images" / f"{dataloader.Path(train_paths[5]).stem}.jpeg")
    rows.append((dataloader.Path(train_paths[5]).stem, own.test.grades[0]))
    for k, (path, grade) in enumerate(zip(test_paths[1:7], own.test.grades[1:7])):  # photos the run never trained on
        shutil.copy(path, other / "train_images" / f"new{k:03d}.jpeg")
        rows.append((f"new{k:03d}", grade))
    (other / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{n},{g}\n" for n, g in rows))
    capsys.readouterr()
    evaluate_quietly(best, "--data-root", other, "--split", "all", "--figure-dir", tmp_path / "figures")
    printed = capsys.readouterr().out
    result = read(ws / "logs" / "resnet18_scratch_on_aptos_eval.json")
    overlap = result["training_overlap"]
    assert overlap["checked"] and overlap["against"] == ["train"]
    assert (overlap["by_name"], overlap["by_content"], overlap["left_out"]) == (3, 2, 5)
    assert overlap["same_name_other_bytes"] == 1 and overlap["of_own_test"] == 7
    assert result["num_images"] == len(rows) - 5 and result["excluded"]["in the run's training data"] == 5
    assert "left out 5 of 12 photos of aptos, the run's own train photos (3 by name and content, 2 by content" \
        in printed
    assert "left out: 5 in the run's training data" in printed
    assert "1 photos of aptos share a name with a photo of the run's train split but not its bytes: kept" in printed
    predictions = pd.read_csv(result["predictions"], dtype={"image": str})
    assert not set(predictions["image"]) & {n for n, _ in rows[:5]}


def test_an_external_set_of_training_photos_only_is_one_sentence_and_exit_2(run, tmp_path, capsys):
    own = dataloader.load_fundus_data(run["demo"], log=lambda *a, **k: None)
    other = tmp_path / "copy"
    (other / "train_images").mkdir(parents=True)
    for k, path in enumerate(own.train.paths[:4]):  # two by name, two renamed
        shutil.copy(path, other / "train_images" / (f"{dataloader.Path(path).stem}.jpeg" if k < 2 else f"r{k}.jpeg"))
    names = [dataloader.Path(p).stem for p in own.train.paths[:2]] + ["r2", "r3"]
    (other / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{n},{g}\n" for n, g in
                                                                    zip(names, own.train.grades[:4])))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_quietly(run["best"], "--data-root", other, "--split", "all", "--figure-dir", tmp_path / "figures")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "is a photo the run trained or chose on; there is nothing external to evaluate" in err
    assert not (tmp_path / "figures").exists()


def test_a_graph_whose_weights_cannot_be_read_is_one_sentence_and_exit_2(run, tmp_path, monkeypatch, capsys):
    exported = run["best"].with_suffix(".onnx")
    if not exported.exists():
        export.main([str(run["best"]), "--check-images", "8"])

    def unreadable(model):
        raise ValueError("external data file not found")
    monkeypatch.setattr(deploy, "graph_digest", unreadable)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_quietly(exported, "--figure-dir", tmp_path / "figures")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot read the weights of {exported}'s graph" in err and "external data file not found" in err
