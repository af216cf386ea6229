"""teachers/train_teachers.sh, the prepared teacher run of issue 13 (GPU or CPU), rehearsed on the CPU (SMOKE=1): it must train, build a
cache that holds the trained teacher's embeddings, pack it into parts the device tool brings back, and unpack it
into a zoo that distill.run reads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "teachers" / "train_teachers.sh"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "ZOO": str(tmp_path / "zoo"), "WORK": str(tmp_path / "work"),
            "OMP_NUM_THREADS": "1", **extra}


def test_unpack_without_parts_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = subprocess.run(["bash", str(SCRIPT), "--unpack", str(tmp_path / "empty")], cwd=ROOT, env=_env(tmp_path),
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: no *.tar.part00 in {tmp_path / 'empty'}"


@pytest.mark.slow
def test_smoke_rehearsal_packs_a_cache_that_unpacks_and_matches_the_teacher(tmp_path: Path) -> None:
    import facedata
    from evaluate.embed import load_embedder
    from teachers.cache import TeacherCache

    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=_env(tmp_path, SMOKE="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["logs.tar.part00", "r18-synthfaces.tar.part00"]
    assert all(p.stat().st_size <= 15 * 2 ** 20 for p in out.iterdir())
    forecast = [line for line in r.stderr.splitlines() if line.startswith("[r18] ")]
    assert len(forecast) == 1 and " steps x 8 = " in forecast[0] and "images/s on cpu" in forecast[0], r.stderr[-2000:]

    # started again (as after a kill), it keeps the measured rate, so the schedule and the checkpoint still match
    again = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=_env(tmp_path, SMOKE="1"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert [line for line in again.stderr.splitlines() if line.startswith("[r18] ")] == forecast

    # unpack into a fresh zoo, as on the CPU machine after the device tool fetched the parts
    unpacked = tmp_path / "here"
    r = subprocess.run(["bash", str(SCRIPT), "--unpack", str(out)], cwd=ROOT,
                       env=_env(unpacked), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "is intact" in r.stdout
    cache = TeacherCache.open(unpacked / "zoo" / "r18-synthfaces", {"teacher_arch": "r18"})
    assert (unpacked / "work" / "r18" / "teacher" / "metrics.json").is_file()  # training logs came back too

    # the cache holds the trained teacher's embeddings (int8: cosine to the float embedding near 1)
    dataset = facedata.open_train_set("synthfaces:tiny")
    embed = load_embedder(str(tmp_path / "work" / "r18" / "teacher" / "model.safetensors"), arch="r18")
    idx = np.array([0, 1, len(dataset) - 1])
    images = np.stack([np.asarray(dataset[i][0]) for i in idx]).transpose(0, 2, 3, 1).copy()
    e = embed(images)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    cached = cache.lookup(idx, np.zeros(len(idx), dtype=np.int64)).numpy()
    assert np.all((e * cached).sum(axis=1) > 0.999)
