"""Model validation reports progress (issue 13, "Progress that never looks stuck": upload
validation): the real MiniLM, re-saved as three safetensors shards and uploaded as a .tar.gz, is
validated by the worker's own function against a real (SQLite) database and file store. Every
phase shows up in order with steps inside it (MiB, shards), the fraction never goes back and ends
at 1.0, and the model row keeps the last progress for the API's `Model.progress`."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.migrate import upgrade
from app.db.session import session_scope
from app.db.tables import Model, Project
from app.models.service import to_out
from app.settings import get_settings
from app.storage import get_store
from tests.service.conftest import TOKENIZER_FILES, minilm_folder
from workers.model_files import validate_model


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("SLIMFORMER_DATA_DIR", str(tmp_path / "data"))
    for name in ("SLIMFORMER_DATABASE_URL", "SLIMFORMER_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    with session_scope() as session:
        session.add(Project(id="prj_1", name="p"))
    yield settings
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def sharded_minilm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """MiniLM (90 MB of float32) in three safetensors shards with its index, as a .tar.gz."""
    import shutil

    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("minilm-sharded")
    AutoModel.from_pretrained(minilm_folder()).save_pretrained(folder, max_shard_size="35MB")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, folder / name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"minilm/{path.name}")
    return buffer.getvalue()


def upload(model_id: str, archive: bytes) -> None:
    key = f"uploads/{model_id}.archive"
    get_store().put_bytes(key, archive)
    with session_scope() as session:
        session.add(
            Model(
                id=model_id,
                project_id="prj_1",
                name="minilm",
                status="validating",
                source={"type": "upload"},
                storage_key=key,
                size_bytes=len(archive),
            )
        )


def stored(model_id: str) -> Model:
    with session_scope() as session:
        model = session.scalar(select(Model).where(Model.id == model_id))
        session.expunge(model)
        return model


def test_upload_validation_reports_each_phase_with_steps(settings, sharded_minilm) -> None:
    upload("mdl_sharded", sharded_minilm)
    seen: list[dict] = []
    validate_model("mdl_sharded", listener=seen.append)

    model = stored("mdl_sharded")
    assert model.status == "ready", model.error
    stages = [update["stage"] for update in seen]
    order = [stage for i, stage in enumerate(stages) if i == 0 or stages[i - 1] != stage]
    assert order == ["fetch", "scan", "extract", "headers", "shapes", "done"]
    fractions = [update["fraction"] for update in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert 0 < seen[stages.index("headers")]["fraction"] < 1
    # Steps inside the long phases: MiB of the archive and of the extracted files, then shards.
    extract = [update for update in seen if update["stage"] == "extract"]
    assert extract[-1]["total_steps"] >= 85 and len(extract) > 10  # 90 MB, in 1 MiB chunks
    assert extract[-1]["label"] == (
        f"extracting · {extract[-1]['total_steps']}/{extract[-1]['total_steps']} MiB"
    )
    labels = [update["label"] for update in seen if update["stage"] == "headers"]
    assert labels[1].startswith("reading the weight headers · shard 2/3 · model-00002-of-00003")
    assert all(update["num_stages"] == 6 for update in seen)  # fetch … convert, headers, shapes
    assert seen[-1]["label"] == "ready" and seen[-1]["eta_s"] == 0

    # The row keeps the last progress beside what validation learned; the API shows it.
    assert model.details["progress"]["stage"] == "done"
    assert model.details["linear_shapes"]["encoder.layer.0.attention.self.query"] == [384, 384]
    out = to_out(model)
    assert out.progress is not None and out.progress.fraction == 1.0
    assert out.progress.label == "ready"


def test_a_rejected_upload_keeps_where_it_stopped(settings, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("config.json", "pytorch_model.bin"):
            data = (minilm_folder() / "config.json").read_bytes()
            info = tarfile.TarInfo(f"m/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    upload("mdl_pickled", buffer.getvalue())
    seen: list[dict] = []
    validate_model("mdl_pickled", listener=seen.append)

    model = stored("mdl_pickled")
    assert model.status == "rejected" and model.error["code"] == "unsafe_model"
    progress = to_out(model).progress
    assert progress is not None and progress.stage == "rejected"
    assert progress.label == "rejected while checking the archive"
    assert progress.fraction < 1 and progress.eta_s is None
