"""Artifact file names: model and job, in characters every file system and HTTP header takes."""

from __future__ import annotations

import pytest

from workers.packaging import artifact_name


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2-job_1"),
        ("My model/v2 (final)", "My-model-v2-final-job_1"),
        ('../"quoted"\r\nname', "quoted-name-job_1"),
        ("modèle", "mod-le-job_1"),
        ("...", "job_1"),
        ("x" * 300, "x" * 80 + "-job_1"),
    ],
)
def test_artifact_names_are_safe_and_name_model_and_job(model_name, expected):
    assert artifact_name(model_name, "job_1") == expected
