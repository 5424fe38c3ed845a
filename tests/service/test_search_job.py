"""A job with targets searches over HTTP, on the real MiniLM with a real worker; without a recipe it
starts from the default space (workers/compression/search/defaults.py)."""

from __future__ import annotations

import pytest

from tests.conftest import Service, builtin_id, wait_for

pytestmark = [pytest.mark.service, pytest.mark.real_model]

TRIAL_KEYS = {
    "index", "kind", "recipe", "metrics", "size_bytes", "bits_per_weight", "seconds", "held",
    "pareto",
}  # fmt: skip


def test_minilm_search_holds_a_cosine_floor_over_http(service: Service) -> None:
    with service.client() as client:
        model_id = builtin_id(client, "models", "all-MiniLM-L6-v2")
        sentences_id = builtin_id(client, "datasets", "lee-sentences")
        request = {
            "model_id": model_id,
            "evaluation": {
                "dataset_id": sentences_id,
                "metrics": ["embedding_cosine", "size"],
                "max_samples": 48,
                "seq_len": 128,
            },
            "targets": {"min_metric": {"embedding_cosine": 0.99}, "budget": {"max_trials": 6}},
        }
        # A target the model's task cannot measure, and targets with nothing to hold: 422.
        wrong = {**request, "targets": {"max_metric_drop": {"perplexity": 0.05}}}
        refused = client.post("/v1/jobs", json=wrong)
        assert refused.status_code == 422 and "perplexity" in refused.text
        empty = client.post("/v1/jobs", json={**request, "targets": {"objective": "size"}})
        assert empty.status_code == 422
        atoms = {**request["targets"], "granularity": "atom"}
        refused = client.post("/v1/jobs", json={**request, "targets": atoms})
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "targets.granularity"
        # Neither a recipe nor targets: nothing says what to do.
        bare = {k: v for k, v in request.items() if k != "targets"}
        refused = client.post("/v1/jobs", json=bare)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "recipe"

        response = client.post("/v1/jobs", json=request)
        assert response.status_code == 202, response.text
        assert response.json()["targets"]["budget"] == {"max_trials": 6, "max_seconds": None}
        # No recipe: the default space's starting point, its group size fitted to MiniLM's widths.
        (stage,) = response.json()["recipe"]["stages"]
        assert (stage["method"], stage["bits"], stage["group_size"]) == ("rtn", 3, 64)
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=900)
        assert job["status"] == "succeeded", (job, service.logs())
        metrics = job["metrics"]
        trials = metrics["trials"]
        assert 1 <= len(trials) <= 6
        assert all(trial.keys() >= TRIAL_KEYS for trial in trials)
        search = metrics["search"]
        assert search["granularity"] == response.json()["targets"]["granularity"] == "block"
        chosen = trials[search["chosen_trial"]]
        assert chosen["held"] and chosen["pareto"] and search["stopped"] == "held"
        # The reported numbers come from texts the search never read, and hold the floor there too.
        assert search["search_split"]["first_text"] == 48
        assert metrics["compressed"]["embedding_cosine"] >= 0.99 and metrics["targets_met"]
        assert metrics["compressed"]["size_bytes"] < metrics["baseline"]["size_bytes"]
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
        streamed = [e["data"]["trial"] for e in events if (e["data"] or {}).get("trial")]
        assert [t["index"] for t in streamed] == [t["index"] for t in trials]

        # Per layer: each Linear layer is a unit of its own (its sensitivities are measured anew).
        per_layer = {**request["targets"], "granularity": "layer", "budget": {"max_trials": 4}}
        response = client.post("/v1/jobs", json={**request, "targets": per_layer})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=900)
        assert job["status"] == "succeeded", (job, service.logs())
        search = job["metrics"]["search"]
        assert search["granularity"] == "layer" and len(job["metrics"]["trials"]) <= 4
        units = search["sensitivity"]["units"]  # the ladder's 3 rungs, then the mixed step
        assert len(units) == 36  # 6 blocks x (query, key, value, 3 dense)
        assert all(name.endswith(("query", "key", "value", "dense")) for name in units), units
