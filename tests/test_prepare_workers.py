"""data/prepare.py as users stop and misuse it (issue 22): its workers end with it however it ends, a
signal ends it with its summary, a file counts as a crop only when prepare.py wrote it, and every refusal
comes before the work."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from data import prepare
from photo_kit import fundus_photo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is pid, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def photos(folder: Path, n: int, size=(144, 96)) -> Path:  # 96 px: the smallest the check judges
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fundus_photo(seed=i).resize(size).save(folder / f"{i}_left.jpeg")
    return folder


# prepare.py with every photo taking a second: the workers are busy when the signal comes
SLOW_PREPARE = textwrap.dedent("""
    import sys, time
    import fundus
    real = fundus.prepare_photo
    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)
    fundus.prepare_photo = slow
    from data import prepare
    sys.exit(prepare.main(sys.argv[1:]))
""")


def end(proc, workers=()) -> tuple[str, str]:
    """Whatever is left of a test's processes ended (on the code before issue 22, workers outlive their
    parent for good and hold its output pipes open), and the parent's output."""
    for pid in [proc.pid, *children(proc.pid), *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate(timeout=30)


def start_slow(repo_root, src, dst, workers=2):
    env = {**os.environ, "PYTHONPATH": f"{repo_root}{os.pathsep}{repo_root / 'tests'}"}
    return subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, str(src), str(dst), "--size", "32",
                             "--workers", str(workers)], cwd=repo_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_workers_end_within_seconds_when_prepare_is_killed(tmp_path, repo_root):
    src = photos(tmp_path / "raw", 24)
    proc, workers = start_slow(repo_root, src, tmp_path / "out"), []
    try:
        assert wait_for(lambda: len(children(proc.pid)) == 2, 60), proc.pid
        workers = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        started = time.monotonic()
        assert wait_for(lambda: not any(alive(w) for w in workers), 5), "workers outlived a SIGKILLed prepare.py"
        print(f"workers gone {time.monotonic() - started:.2f} s after the SIGKILL")
    finally:
        end(proc, workers)


def test_pool_workers_of_any_caller_end_with_it(tmp_path, repo_root):
    """runtime.map_in_processes, which the demo-set generator shares, ends its workers too."""
    script = textwrap.dedent("""
        import time
        from runtime import map_in_processes
        for _ in map_in_processes(time.sleep, [30.0] * 4, workers=2):
            pass
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo_root,
                            env={**os.environ, "PYTHONPATH": str(repo_root)}, stdout=subprocess.PIPE)
    workers = []
    try:
        assert wait_for(lambda: len(children(proc.pid)) == 2, 60)
        workers = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: not any(alive(w) for w in workers), 5)
    finally:
        end(proc, workers)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_prepare_with_its_summary_and_a_rerun_finishes(tmp_path, repo_root, signum):
    src, dst = photos(tmp_path / "raw", 12), tmp_path / "out"
    proc = start_slow(repo_root, src, dst)
    assert wait_for(lambda: (dst / prepare.PREPARED_FILE).is_file()
                    and (dst / prepare.PREPARED_FILE).read_text().count("\n") >= 2, 60)
    workers = children(proc.pid)
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out, err = end(proc, workers)
    assert proc.returncode == 128 + signum, err
    assert "written" in out and "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name}" in err and "run the same command again" in err
    recorded = set((dst / prepare.PREPARED_FILE).read_text().split())
    present = {p.name for p in (dst / "images").iterdir()}
    assert present <= recorded and len(recorded - present) <= 1  # no stray file; at most one recorded, not renamed
    assert prepare.main([str(src), str(dst), "--size", "32", "--workers", "1"]) == 0
    assert len(list((dst / "images").iterdir())) == 12


def test_a_killed_run_leaves_no_crop_that_is_not_recorded(tmp_path, repo_root):
    src, dst = photos(tmp_path / "raw", 12), tmp_path / "out"
    proc = start_slow(repo_root, src, dst)
    assert wait_for(lambda: (dst / prepare.PREPARED_FILE).is_file(), 60)
    workers = children(proc.pid)
    time.sleep(0.5)
    proc.kill()
    end(proc, workers)
    time.sleep(1.0)  # the workers' death
    recorded = set((dst / prepare.PREPARED_FILE).read_text().split())
    visible = {p.name for p in (dst / "images").iterdir() if not p.name.startswith(".")}
    assert visible <= recorded
    assert prepare.main([str(src), str(dst), "--size", "32", "--workers", "1"]) == 0
    assert not [p for p in (dst / "images").iterdir() if p.name.startswith(".")]
    assert len(list((dst / "images").iterdir())) == 12


# --------------------------------------------------------------------------- refused before the work
def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("where", ["is", "inside", "same"])
def test_a_source_in_the_destination_images_or_the_destination_itself_is_refused(tmp_path, capsys, where):
    dst = tmp_path / "out"
    src = {"is": dst / "images", "inside": dst / "images" / "more", "same": dst}[where]
    photos(src, 2)
    before = sorted(p for p in tmp_path.rglob("*"))
    err = refused([str(src), str(dst), "--size", "32", "--workers", "1"], capsys)
    assert {"is": "is DST_DIR's images folder", "inside": "lies inside DST_DIR's images folder",
            "same": f"DST_DIR {dst} is SRC_DIR"}[where] in err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_a_destination_inside_the_source_is_fine(tmp_path):
    # SRC_DIR's subfolders are not searched, so its own out/ folder is a safe DST_DIR
    src = photos(tmp_path / "raw", 2)
    assert prepare.main([str(src), str(src / "out"), "--size", "32", "--workers", "1"]) == 0
    assert len(list((src / "out" / "images").glob("*.jpeg"))) == 2


def test_files_prepare_did_not_write_are_never_taken_for_crops(tmp_path, capsys):
    src, dst = photos(tmp_path / "raw", 3), tmp_path / "out"
    photos(dst / "images", 1, size=(32, 32))  # the user's own photo, of the very size asked for
    err = refused([str(src), str(dst), "--size", "32", "--workers", "1"], capsys)
    assert "holds 1 files that prepare.py did not write (first: 0_left.jpeg" in err
    assert not (dst / prepare.OPTIONS_FILE).exists()


def test_crops_of_a_folder_made_before_the_record_are_adopted(tmp_path, capsys):
    src, dst = photos(tmp_path / "raw", 3), tmp_path / "out"
    assert prepare.main([str(src), str(dst), "--size", "32", "--workers", "1"]) == 0
    (dst / prepare.PREPARED_FILE).unlink()  # as an earlier prepare.py left the folder
    capsys.readouterr()
    assert prepare.main([str(src), str(dst), "--size", "32", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 crops made before" in out and "0 written, 3 skipped" in out


@pytest.mark.parametrize("kind", ["dst_file", "images_file", "read_only"])
def test_a_destination_that_cannot_take_files_is_one_sentence(tmp_path, capsys, monkeypatch, kind):
    src, dst = photos(tmp_path / "raw", 2), tmp_path / "out"
    if kind == "dst_file":
        dst.write_text("a file")
    elif kind == "images_file":
        dst.mkdir()
        (dst / "images").write_text("a file")
    else:
        dst.mkdir()
        dst.chmod(0o555)
        if os.access(dst, os.W_OK):  # root writes into a read-only folder: simulate the file system's answer
            import tempfile

            def read_only(*args, dir=None, **kwargs):
                raise PermissionError(30, "Read-only file system")
            monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    err = refused([str(src), str(dst), "--size", "32", "--workers", "1"], capsys)
    expected = {"dst_file": f"DST_DIR {dst} is a file, expected a folder",
                "images_file": f"DST_DIR {dst / 'images'} is a file, expected a folder",
                "read_only": "is not writable"}[kind]
    assert expected in err


def test_labels_that_cannot_be_split_are_refused_before_any_crop(tmp_path, capsys):
    src = photos(tmp_path / "raw", 3)
    (tmp_path / "one.csv").write_text("image,level\n0_left,1\n0_right,2\n9_left,0\n")  # one patient has photos
    err = refused([str(src), str(tmp_path / "out"), "--size", "32", "--workers", "1",
                   "--labels", str(tmp_path / "one.csv")], capsys)
    assert "needs at least two patients" in err and "holds 1" in err
    (tmp_path / "two.csv").write_text("image,level\n0_left,1\n1_left,2\n2_left,0\n")
    err = refused([str(src), str(tmp_path / "out"), "--size", "32", "--workers", "1", "--test-fraction", "0.9",
                   "--labels", str(tmp_path / "two.csv")], capsys)
    assert "--test-fraction 0.9 of the 3 patients" in err and "leaves 0 to train on" in err
    assert not (tmp_path / "out").exists()


def test_labels_left_without_two_patients_by_the_quality_check_keep_the_crops(tmp_path, capsys):
    src = photos(tmp_path / "raw", 1)
    Image.new("RGB", (144, 96)).save(src / "1_left.jpeg")  # too dark: ungradable, known only when assessed
    (tmp_path / "t.csv").write_text("image,level\n0_left,1\n1_left,2\n")
    dst = tmp_path / "out"
    err = refused([str(src), str(dst), "--size", "32", "--workers", "1", "--labels", str(tmp_path / "t.csv")],
                  capsys)
    assert "CSVs were not written" in err and "the 1 crops are kept" in err
    assert [p.name for p in (dst / "images").iterdir()] == ["0_left.jpeg"]
